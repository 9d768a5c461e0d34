#!/usr/bin/env bash
# Greedy generation with the KV cache on the CPU: phitune (ndarray, release) vs HF transformers,
# same random weights (the bench config: phi-2's vocab and head geometry, hidden 640, 8 heads,
# 4 layers, intermediate 2560), same thread count, run alternately.
#   PYTHON=/path/to/python benches/generate_vs_hf.sh [threads] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
THREADS=${1:-2}
ROUNDS=${2:-2}
DIR=${BENCH_MODEL_DIR:-target/bench-model}
cargo build --release -q
[ -f "$DIR/model.safetensors" ] || "$PY" benches/hf_generate.py --save-dir "$DIR" --threads "$THREADS" --repeats 1 >/dev/null
for i in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=$THREADS ./target/release/phitune bench --device cpu --model "$DIR" --prompt-len 32 --new-tokens 128 --repeats 3 2>/dev/null
  "$PY" benches/hf_generate.py --threads "$THREADS" --prompt-len 32 --new-tokens 128 --repeats 3 2>/dev/null
done
