#!/usr/bin/env bash
# Training speed of the QLoRA setup (LoRA r=4 on q/k/v/dense, AdamW, micro-batch x seq-len random
# tokens per step): phitune `bench --train` vs transformers + PEFT (benches/hf_train.py), same
# configuration and thread count, run alternately.
#   PYTHON=/path/to/python benches/train_vs_hf.sh [threads] [rounds] [extra args for both...]
# CPU (default): the bench config, f32; phitune on an NF4 base and on a float base, PyTorch on a
# float base (bitsandbytes' 4-bit training path is CUDA-only).
# GPU: DEVICE=cuda benches/train_vs_hf.sh 16 1 --config phi-2 --micro-batch 2 --seq-len 128
#   (phitune needs a `--features cuda` build: CARGO_FEATURES=cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
THREADS=${1:-2}
ROUNDS=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
DEVICE=${DEVICE:-cpu}
cargo build --release -q ${CARGO_FEATURES:+--features $CARGO_FEATURES}
for i in $(seq "$ROUNDS"); do
  if [ "$DEVICE" = cpu ]; then
    RAYON_NUM_THREADS=$THREADS ./target/release/phitune bench --train --device cpu --quant nf4 "$@" 2>/dev/null
    RAYON_NUM_THREADS=$THREADS ./target/release/phitune bench --train --device cpu --quant none "$@" 2>/dev/null
    "$PY" benches/hf_train.py --device cpu --threads "$THREADS" "$@" 2>/dev/null
  else
    ./target/release/phitune bench --train --device "$DEVICE" --dtype bf16 --quant nf4 "$@" 2>/dev/null
    "$PY" benches/hf_train.py --device "$DEVICE" --dtype bf16 --quant nf4 "$@" 2>/dev/null
  fi
done
