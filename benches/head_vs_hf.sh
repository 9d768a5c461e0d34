#!/usr/bin/env bash
# Training speed on real rows: the bundled sample through the persona template (loss on the reply
# only, each micro-batch padded to its longest row), phitune's full head (logits at every
# position, as transformers computes them) vs its target-only head (what `train` runs), and
# transformers + PEFT (benches/hf_train.py) on the very same micro-batches (labels -100 outside
# the reply, as TRL sets them). The bench config, float base, same threads, run alternately.
#   PYTHON=/path/to/python benches/head_vs_hf.sh [threads] [rounds] [extra args for all...]
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
BATCHES=$(mktemp --suffix=.jsonl)
trap 'rm -f "$BATCHES"' EXIT
cargo build --release -q
bench() {
  RAYON_NUM_THREADS=$THREADS ./target/release/phitune bench --train --device cpu --quant none \
    --data "$DATA" --tokenizer "$TOKENIZER" "$@" 2>/dev/null
}
for i in $(seq "$ROUNDS"); do
  bench --head full --batches-out "$BATCHES" "$@"
  bench --head targets "$@"
  "$PY" benches/hf_train.py --device cpu --threads "$THREADS" --batches "$BATCHES" "$@" 2>/dev/null
done
