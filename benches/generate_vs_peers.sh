#!/usr/bin/env bash
# Greedy generation with the KV cache on the CPU: phitune (ndarray, release) vs candle
# (candle-transformers' Phi, benches/candle_phi) vs HF transformers, same random weights (the
# bench config: phi-2's vocab and head geometry, hidden 640, 8 heads, 4 layers, intermediate
# 2560), same thread count, run alternately (one of each per round), one JSON line each.
#   PYTHON=/path/to/python benches/generate_vs_peers.sh [threads] [rounds]
# phitune and candle report prefill/decode/generate tokens/s with the same definitions;
# HF's `decode_tokens_per_s` is new tokens / whole generate call, i.e. their `generate_tokens_per_s`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
THREADS=${1:-2}
ROUNDS=${2:-2}
DIR=${BENCH_MODEL_DIR:-target/bench-model}
cargo build --release -q
cargo build --release --manifest-path benches/candle_phi/Cargo.toml -q
[ -f "$DIR/model.safetensors" ] || "$PY" benches/hf_generate.py --save-dir "$DIR" --threads "$THREADS" --repeats 1 >/dev/null
for i in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=$THREADS ./target/release/phitune bench --device cpu --model "$DIR" --prompt-len 32 --new-tokens 128 --repeats 3 2>/dev/null
  RAYON_NUM_THREADS=$THREADS ./benches/candle_phi/target/release/candle-phi-bench --model "$DIR" --prompt-len 32 --new-tokens 128 --repeats 3 2>/dev/null
  "$PY" benches/hf_generate.py --threads "$THREADS" --prompt-len 32 --new-tokens 128 --repeats 3 2>/dev/null
done
