#!/usr/bin/env bash
# `serve` under load: requests/s and time to the first token for 1 and 8 concurrent clients
# (benches/serve_load.py, streamed chat completions, greedy, 32 new tokens, 4 requests per
# client), on the tiny fixture model and on the bench configuration (random weights, written by
# benches/random_phi.py: needs numpy and safetensors). CPU, release build.
#   PYTHON=/path/to/python benches/serve.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
THREADS=${1:-2}
BENCH_DIR=${BENCH_MODEL_DIR:-target/bench-model}
cargo build --release -q
[ -f "$BENCH_DIR/model.safetensors" ] || "$PY" benches/random_phi.py "$BENCH_DIR" >/dev/null
for model in tests/fixtures/tiny-phi "$BENCH_DIR"; do
  LOG=$(mktemp)
  RAYON_NUM_THREADS=$THREADS ./target/release/phitune serve --model "$model" --port 0 \
    --max-queue 64 2>"$LOG" &
  PID=$!
  URL=""
  for _ in $(seq 600); do
    URL=$(grep -o 'http://[0-9.:]*' "$LOG" | head -1 || true)
    [ -n "$URL" ] && break
    sleep 0.1
  done
  [ -n "$URL" ] || { cat "$LOG"; kill $PID; exit 1; }
  for clients in 1 8; do
    echo "{\"model\": \"$model\", \"threads\": $THREADS, \"load\": $("$PY" benches/serve_load.py "$URL" --clients "$clients" --requests 4 --max-tokens 32)}"
  done
  kill -INT $PID
  wait $PID || true
  rm -f "$LOG"
done
