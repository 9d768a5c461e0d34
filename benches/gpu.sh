#!/usr/bin/env bash
# The one-call GPU measurement (NVIDIA), for whoever has a GPU at hand. In this order:
#   0. the kernel checks (tests/cuda_kernels.rs) on the GPU, when KERNELS_TEST is given;
#   1. smoke: `score` on the tiny fixture against expected.json (HF), and a 4-step NF4
#      fine-tune on the GPU against the same run on the CPU (per-step losses, f32);
#   2. the NF4 product paths (decode GEMV vs dequantize + matmul) at 1..64 rows on phi-2's fc1:
#      where the GEMV stops winning is what DEFAULT_NF4_GEMV_MAX_ROWS should be;
#   3. QLoRA training, phitune `bench --train` and transformers + PEFT + bitsandbytes
#      (benches/hf_train.py), alternately, on phi-2's real configuration with random weights,
#      bf16 compute, gradient checkpointing on for both, at micro-batch 2 x 128 (the seed's) and
#      16 x 512: tokens/s, peak device memory, forward/backward/optimizer time, MFU
#      (4 x 2.78e9 x tokens/s over the card's dense bf16 peak), and phitune's NF4 + LoRA decode
#      speed from the trained model;
#   4. one table, printed last and written to $OUT/gpu.md (raw JSON lines in $OUT/gpu.jsonl).
#
# The GPU machine needs no Rust and no network: build here (CUDARC_CUDA_VERSION names the GPU
# machine's CUDA, 13000 for 13.0, when this machine has none) and send the binaries along,
#   export CUDARC_CUDA_VERSION=13000
#   cargo build --release --features cuda && gzip -kf target/release/phitune
#   cargo test --release --features cuda --test cuda_kernels --no-run   # prints the test binary
#   gzip -c target/release/deps/cuda_kernels-<hash> > cuda_kernels.gz
# then, there (torch, transformers and peft installed; bitsandbytes from a wheel, or unpacked
# on PYTHONPATH):
#   OUT=/tmp/out BNB_WHEEL=bitsandbytes-....whl KERNELS_TEST=cuda_kernels benches/gpu.sh
# DRY_RUN=1 benches/gpu.sh runs every step here on the CPU at toy sizes (checks the script).
# BUDGET_S (default 900) bounds the whole script: each step gets at most its own cap and what is
# left of the budget, and a step that fails or runs out of time is recorded as such (with the
# end of its log) while the next one runs. The raw files are packed into $OUT/gpu-files.tgz.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: > "$OUT/gpu.jsonl"
log() { echo "== $*" >&2; }

BIN=${PHITUNE:-target/release/phitune}
if [ ! -x "$BIN" ] && [ -f "$BIN.gz" ]; then
  gunzip -c "$BIN.gz" > "$OUT/phitune" && chmod +x "$OUT/phitune" && BIN="$OUT/phitune"
fi
[ -x "$BIN" ] || { echo "no phitune binary at $BIN (or $BIN.gz)" >&2; exit 1; }
# CubeCL's CUDA runtime loads NVRTC at run time: find it where the CUDA image keeps it.
if [ -z "${DRY_RUN:-}" ] && ! ldconfig -p 2>/dev/null | grep -q libnvrtc; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $("$PY" -c 'import glob, os, nvidia; print(" ".join(sorted({os.path.dirname(p) for r in nvidia.__path__ for p in glob.glob(r + "/**/libnvrtc.so*", recursive=True)})))' 2>/dev/null); do
    if compgen -G "$d/libnvrtc.so*" >/dev/null; then
      LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  done
  export LD_LIBRARY_PATH
fi
"$BIN" --version >&2

BUDGET_S=${BUDGET_S:-900}
# Seconds a step may take: its cap, or what is left of the budget (less a reserve for the table).
allow() { local left=$((BUDGET_S - SECONDS - 15)); echo $(( $1 < left ? $1 : left )); }
fail_record() {
  "$PY" - "$1" "$2" "$3" >> "$OUT/gpu.jsonl" <<'EOF'
import json, sys
tail = open(sys.argv[3], errors="replace").read().strip().splitlines()[-4:]
print(json.dumps({"step_name": sys.argv[1], "failed": sys.argv[2], "log_tail": tail}))
EOF
}
# step NAME CAP LOG CMD...: runs CMD within its allowance, its stderr to LOG; on failure or
# timeout, records the step as failed (with the end of LOG) and returns non-zero.
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local t; t=$(allow "$cap")
  if [ "$t" -lt 10 ]; then
    echo "skipped: out of budget" > "$log"; fail_record "$name" skipped "$log"; return 1
  fi
  local status=0
  timeout -k 5 "$t" "$@" 2> "$log" || status=$?
  if [ $status -ne 0 ]; then
    local why="exit $status"; [ $status -eq 124 ] && why="timed out after $t s"
    log "$name: $why"; fail_record "$name" "$why" "$log"; return 1
  fi
}

if [ -n "${DRY_RUN:-}" ]; then
  DEVICE=cpu DTYPE=f32 CONFIG=bench QUANT_HF=none STEPS=2 WARMUP=1
  SETTINGS="2x32 4x64" ROWS=1,2,8 HF_DEVICE=cpu GC_HF=""
else
  DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bf16} CONFIG=phi-2 QUANT_HF=nf4 STEPS=${STEPS:-10}
  WARMUP=${WARMUP:-3} SETTINGS=${SETTINGS:-"2x128 16x512"} ROWS=1,2,4,8,16,32,64 HF_DEVICE=cuda
  GC_HF=--grad-checkpointing
  if [ -n "${BNB_WHEEL:-}" ] && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    log "installing $BNB_WHEEL"
    "$PY" -m pip install --no-index --no-deps -q "$BNB_WHEEL"
  fi
fi

# Peak device memory of a command: nvidia-smi sampled every 100 ms (the whole device, so the
# CUDA context counts for both sides alike); empty without nvidia-smi.
run_sampled() {
  local mem="$OUT/mem.txt"
  : > "$mem"
  local sampler=""
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$mem" &
    sampler=$!
  fi
  local status=0
  "$@" || status=$?
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null || true
  PEAK_MIB=$(sort -n "$mem" | tail -1)
  return $status
}

record() { # name, json line, peak MiB
  "$PY" - "$1" "$2" "${3:-}" >> "$OUT/gpu.jsonl" <<'EOF'
import json, sys
v = json.loads(sys.argv[2])
v["step_name"] = sys.argv[1]
if sys.argv[3]:
    v["device_peak_mib"] = float(sys.argv[3])
print(json.dumps(v))
EOF
}

# The kernel checks (tests/kernels/checks.rs) on the GPU, from the test binary built with
#   cargo test --release --features cuda --test cuda_kernels --no-run
# (cargo prints its path; gzip it beside the phitune binary as KERNELS_TEST=...gz).
KERNELS_RESULT="not run (no KERNELS_TEST binary)"
KT=${KERNELS_TEST:-}
if [ -n "$KT" ] && [ ! -x "$KT" ] && [ -f "$KT.gz" ]; then
  gunzip -c "$KT.gz" > "$OUT/cuda_kernels" && chmod +x "$OUT/cuda_kernels" && KT="$OUT/cuda_kernels"
fi
if [ -z "${DRY_RUN:-}" ] && [ -n "$KT" ] && [ -x "$KT" ]; then
  log "kernel checks on $DEVICE"
  step kernels 240 "$OUT/kernels.log" "$KT" --test-threads 1 > "$OUT/kernels.txt" || true
  KERNELS_RESULT=$(grep -E "^test .* (ok|FAILED|ignored)$|^test result" "$OUT/kernels.txt" | sed 's/^/    /' || true)
fi

log "smoke: score on $DEVICE against HF"
TEXTS=()
while IFS= read -r -d '' t; do TEXTS+=(--text "$t"); done < <("$PY" -c '
import json, sys; e = json.load(open("tests/fixtures/expected.json"))
sys.stdout.write("".join(c["text"] + "\0" for c in e["tiny-phi"]["score"]))')
SMOKE_SCORE="FAILED: score did not run (see the failures below)"
if step smoke-score 180 "$OUT/score.log" "$BIN" score --device "$DEVICE" --dtype f32 \
  --model tests/fixtures/tiny-phi "${TEXTS[@]}" > "$OUT/score.jsonl"; then
SMOKE_SCORE=$("$PY" - "$OUT/score.jsonl" <<'EOF'
import json, sys
exp = json.load(open("tests/fixtures/expected.json"))["tiny-phi"]["score"]
got = [json.loads(l) for l in open(sys.argv[1])]
worst = max(abs(a - b) if a is not None else float("inf") for g, e in zip(got, exp) for a, b in zip(g["nll"], e["nll"]))
same = all(g["tokens"] == e["tokens"] for g, e in zip(got, exp))
print(f"{'ok' if same and worst < 1e-3 else 'FAILED'}: max |NLL - HF| {worst:.2e}")
EOF
)
fi
log "smoke: 4-step NF4 fine-tune, $DEVICE vs cpu"
SMOKE_TRAIN="FAILED: the fine-tune did not run (see the failures below)"
trained=0
for d in "$DEVICE" cpu; do
  rm -rf "$OUT/train-$d"
  # On the GPU, CubeCL logs what it compiles and autotunes (where the first steps' time goes).
  debug=()
  [ -z "${DRY_RUN:-}" ] && [ "$d" = "$DEVICE" ] && debug=(env "CUBECL_DEBUG_LOG=$OUT/cubecl-train.log")
  if step "smoke-train-$d" 150 "$OUT/train-$d.log" "${debug[@]}" "$BIN" train --device "$d" --dtype f32 \
    --model tests/fixtures/tiny-phi \
    --data data/samples/persona_chat_sample.jsonl --out "$OUT/train-$d" --max-steps 4 \
    --micro-batch 2 --grad-accum 2 --lr 1e-3 --lora-dropout 0.1 --quant nf4 \
    --valid-fraction 0.1 --eval-rows 4 --eval-every 4 --save-every 4 --no-dashboard \
    > /dev/null; then
    trained=$((trained + 1))
  fi
done
[ $trained -eq 2 ] && SMOKE_TRAIN=$("$PY" - "$OUT/train-$DEVICE" "$OUT/train-cpu" <<'EOF'
import json, sys
def losses(d):
    return [r["loss"] for r in map(json.loads, open(d + "/metrics.jsonl")) if r["split"] == "train"]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
worst = max(abs(x - y) for x, y in zip(a, b))
print(f"{'ok' if len(a) == 4 and worst < 2e-3 else 'FAILED'}: max |loss - cpu| {worst:.2e} over {len(a)} steps")
EOF
)

log "NF4 paths at $ROWS rows"
if step nf4-rows 120 "$OUT/nf4-rows.log" "$BIN" bench --device "$DEVICE" --dtype "$DTYPE" \
  --config "$CONFIG" --nf4-rows "$ROWS" --repeats 5 > "$OUT/nf4-rows.json"; then
  record nf4-rows "$(cat "$OUT/nf4-rows.json")"
fi

for setting in $SETTINGS; do
  B=${setting%x*} S=${setting#*x}
  log "training $B x $S: phitune"
  if run_sampled step "phitune $setting" "${CAP_PHITUNE:-240}" "$OUT/phitune-$setting.log" \
    "$BIN" bench --train --device "$DEVICE" --dtype "$DTYPE" --config "$CONFIG" \
    --quant nf4 --grad-checkpointing true --micro-batch "$B" --seq-len "$S" --steps "$STEPS" \
    --warmup-steps "$WARMUP" --prompt-len 32 --new-tokens 64 --repeats 2 \
    > "$OUT/phitune-$setting.json"; then
    record "phitune $setting" "$(cat "$OUT/phitune-$setting.json")" "$PEAK_MIB"
  fi
  log "training $B x $S: transformers + PEFT + bitsandbytes"
  if run_sampled step "hf $setting" "${CAP_HF:-180}" "$OUT/hf-$setting.log" \
    "$PY" benches/hf_train.py --config "$CONFIG" --device "$HF_DEVICE" --dtype "$DTYPE" \
    --quant "$QUANT_HF" $GC_HF --micro-batch "$B" --seq-len "$S" --steps "$STEPS" \
    --warmup-steps "$WARMUP" --weights-dir "$OUT/hf-weights" > "$OUT/hf-$setting.json"; then
    record "hf $setting" "$(cat "$OUT/hf-$setting.json")" "$PEAK_MIB"
  fi
done

"$PY" - "$OUT/gpu.jsonl" "$SMOKE_SCORE" "$SMOKE_TRAIN" "${PEAK_TFLOPS:-}" "$KERNELS_RESULT" > "$OUT/gpu.md" <<'EOF'
import json, subprocess, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
failed = [r for r in rows if "failed" in r]
rows = [r for r in rows if "failed" not in r]
gpu = "cpu (dry run)"
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
except Exception:
    pass
# Dense bf16 peak of the card, FLOP/s (PEAK_TFLOPS overrides).
peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
peak = float(sys.argv[4]) * 1e12 if sys.argv[4] else next((v for k, v in peaks.items() if k in gpu), None)
out = [f"GPU: {gpu}", "", "kernel checks:", sys.argv[5], "", f"smoke score: {sys.argv[2]}",
       f"smoke fine-tune: {sys.argv[3]}", ""]
out += ["| setting | impl | tokens/s | vs HF | step s | fwd s | bwd s | opt s | peak device MiB | reported peak GiB | MFU | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
hf = {r["step_name"].split()[1]: r["report"]["tokens_per_s"] for r in rows if r["step_name"].startswith("hf ")}
for r in rows:
    if r["step_name"] == "nf4-rows":
        continue
    impl, setting = r["step_name"].split()
    rep = r["report"]
    tps = rep["tokens_per_s"]
    mfu = f"{4 * 2.78e9 * tps / peak:.1%}" if peak else "-"
    reported = rep.get("peak_memory_gib") or rep.get("peak_device_gib") or rep.get("peak_rss_gib")
    dec = rep.get("generation", {}).get("decode_tokens_per_s")
    out.append("| {} | {} | {:.0f} | {} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {} | {} | {} | {} |".format(
        setting, r.get("impl", impl), tps, f"{tps / hf[setting]:.2f}x" if setting in hf else "-",
        rep["step_s"], rep["forward_s"], rep["backward_s"], rep["optimizer_s"],
        f"{r['device_peak_mib']:.0f}" if "device_peak_mib" in r else "-",
        f"{reported:.2f}" if reported else "-", mfu, f"{dec:.1f}" if dec else "-"))
nf4 = next((r for r in rows if r["step_name"] == "nf4-rows"), None)
if nf4:
    rep = nf4["report"]
    out += ["", f"NF4 product on fc1 {rep['shape']} (default GEMV below {rep['default_gemv_max_rows']} rows):", "",
            "| rows | GEMV us | dequantize + matmul us | GEMV weight GB/s |", "|---|---|---|---|"]
    out += [f"| {t['m']} | {t['gemv_us']:.1f} | {t['dequantize_matmul_us']:.1f} | {t['gemv_weight_gb_s']:.0f} |" for t in rep["rows"]]
if failed:
    out += ["", "Steps that did not finish:", ""]
    out += [f"- {r['step_name']}: {r['failed']}: " + " / ".join(r["log_tail"]) for r in failed]
print("\n".join(out))
EOF
cat "$OUT/gpu.md"
# CubeCL's log can be long: keep its first and last 8 MB so that the archive stays small.
for f in "$OUT"/cubecl-*.log; do
  if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 16000000 ]; then
    { head -c 8000000 "$f"; echo; echo "[... cut ...]"; tail -c 8000000 "$f"; } > "$f.cut" && mv "$f.cut" "$f"
  fi
done
tar czf "$OUT/gpu-files.tgz" -C "$OUT" --exclude=./gpu-files.tgz --exclude=./hf-weights \
  --exclude=./phitune --exclude='*.safetensors' --exclude='*.mpk' . 2>/dev/null || true
