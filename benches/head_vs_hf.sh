#!/usr/bin/env bash
# Training speed on real rows: the bundled sample through the persona template (loss on the reply
# only), on the very same micro-batches of examples, run alternately with the same threads:
#   1. phitune, padded, full head (logits at every position, as transformers computes them);
#   2. phitune, padded, target-only head (what `train` runs);
#   3. phitune, packed (`--packing`: rows of up to --max-len tokens), target-only head;
#   4. transformers + PEFT (benches/hf_train.py), padded (labels -100 outside the reply, as TRL);
#   5. transformers + PEFT, packed as TRL's padding-free collator feeds it (position ids).
# The bench config, float base.
#   PYTHON=/path/to/python benches/head_vs_hf.sh [threads] [rounds] [extra args for all...]
# e.g. `benches/head_vs_hf.sh 2 2 --micro-batch 8 --steps 4 --warmup-steps 1`.
# DATA (default: the bundled sample) and TOKENIZER (a model directory; default: tiny-phi's, whose
# ids fit the bench config's vocabulary) pick the rows and their tokenization.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
THREADS=${1:-2}
ROUNDS=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
DATA=${DATA:-data/samples/persona_chat_sample.jsonl}
TOKENIZER=${TOKENIZER:-tests/fixtures/tiny-phi}
PADDED=$(mktemp --suffix=.jsonl)
PACKED=$(mktemp --suffix=.jsonl)
trap 'rm -f "$PADDED" "$PACKED"' EXIT
cargo build --release -q
bench() {
  echo -n "phitune $* "
  RAYON_NUM_THREADS=$THREADS ./target/release/phitune bench --train --device cpu --quant none \
    --data "$DATA" --tokenizer "$TOKENIZER" --new-tokens 8 --repeats 1 "$@" 2>/dev/null
}
hf() {
  echo -n "hf $1 "
  "$PY" benches/hf_train.py --device cpu --threads "$THREADS" --batches "$@" 2>/dev/null
}
for i in $(seq "$ROUNDS"); do
  bench --head full --batches-out "$PADDED" "$@"
  bench --head targets "$@"
  bench --head targets --packing --batches-out "$PACKED" "$@"
  hf "$PADDED" "$@"
  hf "$PACKED" "$@"
done
