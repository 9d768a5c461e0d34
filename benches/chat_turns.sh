#!/usr/bin/env bash
# Per-turn latency of `chat` on the bench-config model (f32, random weights, 2 threads by default):
# 8 scripted turns, greedy, 32 new tokens each, with the KV cache reused across turns and with
# every prompt recomputed (--no-cache-reuse), alternately. Prints, per mode, the reused prompt
# tokens, the time to the first reply token and the whole turn, per turn.
#   PYTHON=/path/to/python benches/chat_turns.sh [threads] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
THREADS=${1:-2}
ROUNDS=${2:-2}
DIR=${BENCH_MODEL_DIR:-target/bench-model}
cargo build --release -q
[ -f "$DIR/model.safetensors" ] || "$PY" benches/hf_generate.py --save-dir "$DIR" --threads "$THREADS" --repeats 1 >/dev/null
TURNS=$(mktemp)
trap 'rm -f "$TURNS"' EXIT
printf '%s\n' "hi! how are you today?" "what do you do for a living?" \
  "that sounds interesting. do you like it?" "what do you do on weekends?" \
  "do you have any pets at home?" "what is your favorite food?" "where did you grow up?" \
  "what music do you listen to?" > "$TURNS"
for i in $(seq "$ROUNDS"); do
  for mode in reuse --no-cache-reuse; do
    RAYON_NUM_THREADS=$THREADS ./target/release/phitune chat --model "$DIR" \
      --persona "i run marathons." --persona "i listen to jazz while i work." \
      --persona "i am saving up to buy a boat." --temperature 0 --max-new-tokens 32 --json \
      $([ "$mode" = reuse ] || echo "$mode") < "$TURNS" 2>/dev/null |
      "$PY" -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin]
later = rows[1:]
print(json.dumps({
    "mode": sys.argv[1],
    "prompt_tokens": [r["prompt_tokens"] for r in rows],
    "reused_tokens": [r["reused_tokens"] for r in rows],
    "first_token_s": [round(r["first_token_s"], 4) for r in rows],
    "turn_s": [round(r["seconds"], 4) for r in rows],
    "mean_first_token_s_turns_2_on": round(sum(r["first_token_s"] for r in later) / len(later), 4),
    "mean_turn_s_turns_2_on": round(sum(r["seconds"] for r in later) / len(later), 4),
}))' "$mode"
  done
done
