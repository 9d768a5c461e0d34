#!/usr/bin/env bash
# The one-call GPU measurement (NVIDIA), for whoever has a GPU at hand. GPU time is rare, so
# this one call must both localise what is wrong and measure. In this order:
#   0. the kernel checks (tests/cuda_kernels.rs: each CubeCL kernel of ours and the Burn ops the
#      model leans on against the CPU, f32 products' precision, padded rows, mixed dtypes,
#      tiny-phi's score, one QLoRA step), when KERNELS_TEST is given;
#   1. score diagnostics: `score --dtype f32` on tests/fixtures/tiny-phi (4 texts) against HF
#      (tests/fixtures/expected.json), once per variant below; each records max |NLL - HF|,
#      whether the tokens are HF's, the (text, position) pairs that are NaN or off by more than
#      1e-3 (position: index into the `nll` list, the NLL of token position+1), and the lines of
#      its stdout/stderr mentioning out-of-bounds / OOB / validation / panicked:
#        default        as a user runs it (f32 products exact, no TF32): the baseline;
#        tf32           --tf32: if default is now within 1e-3 and this one is ~1e-3 off, TF32
#                       was the small errors of the first run;
#        validate       cubecl.toml check_mode = "validate": every launch bounds-checked, and the
#                       unchecked kernels report each out-of-bounds access by kernel name
#                       ("[VALIDATION <kernel>]: Encountered OOB ..." via device printf, stdout);
#        enforce        check_mode = "enforce": bounds checks on every launch; NaN gone here
#                       (and in validate) = an out-of-bounds read of an unchecked launch;
#        one-stream     [streaming] max_streams = 1: fixed here = a race between streams;
#        reference-all  PHITUNE_REFERENCE_OPS=all (nf4, matmul, cross_entropy, gelu, rope,
#                       dropout on their tensor-op references): fixed here = one of our CubeCL
#                       kernels; still wrong = Burn / CubeCL / fusion;
#        nofusion       the PHITUNE_NOFUSION binary: fixed here = Burn's kernel fusion;
#        autotune-checks the PHITUNE_AUTOTUNE_CHECKS binary: every autotune candidate checked
#                       against a reference; a mismatch panics/prints (a bad matmul candidate);
#        wgpu           --device wgpu through NVIDIA's Vulkan driver (only when its ICD,
#                       nvidia_icd*.json, is installed): fixed here = CUDA-specific code;
#      then, only when default is wrong and reference-all is right (or DRY_RUN_BISECT=1), one run
#      per op with PHITUNE_REFERENCE_OPS=<op> (ref-<op>): an op whose reference alone fixes the
#      score names the culprit kernel;
#   2. smoke fine-tune: 4 NF4 QLoRA steps of tiny-phi, twice on the GPU (same kernel cache: the
#      second run's time to its first step shows what the cache saves; the first one already
#      finds the forward kernels the scores compiled) and once on the CPU,
#      per-step losses compared (f32, LoRA dropout on: both pad rows to a multiple of 64, so
#      both draw the same dropout masks); the time from start to the first
#      "step 1/4" line and CubeCL's "GPU kernels: N compiled, ..." line of each run;
#   3. the NF4 product paths (decode GEMV vs dequantize + matmul) at 1..64 rows on phi-2's fc1:
#      where the GEMV stops winning is what DEFAULT_NF4_GEMV_MAX_ROWS should be;
#   4. QLoRA training, phitune `bench --train` and transformers + PEFT + bitsandbytes
#      (benches/hf_train.py), alternately, on phi-2's real configuration with random weights,
#      bf16 compute, gradient checkpointing on for both, at micro-batch 2 x 128 (the seed's) and
#      16 x 512: tokens/s, peak device memory, forward/backward/optimizer time, MFU
#      (4 x 2.78e9 x tokens/s over the card's dense bf16 peak), and phitune's NF4 + LoRA decode
#      speed from the trained model;
#   5. one table, printed last and written to $OUT/gpu.md (raw JSON lines in $OUT/gpu.jsonl, one
#      per step with its status, wall time and "GPU kernels" line, one per score variant); logs,
#      outputs, stack dumps and CubeCL logs packed into $OUT/gpu-files.tgz (not the kernel
#      cache $OUT/cache, the weights or the binaries).
#
# Time: BUDGET_S (default 540) bounds the whole script. A step gets at most its cap and what is
# left of the budget less RESERVE_S (30: the table, a last stack dump, the archive); one that
# fails or runs out of time is recorded as such (with the end of its log) and the next one runs.
# A step about to hit its limit first has what its threads are doing saved to <its log>.stacks:
# from /proc each thread's name, state, wchan, kernel stack (when readable) and CPU use over one
# second (busy threads = compiling or spinning; all asleep = a hang), gdb's backtraces of every
# thread when gdb is installed (py-spy's for Python), the GPU's utilisation, the end of its log
# and of its CUBECL_DEBUG_LOG; gpu.jsonl records it as timed out with the dump's path (its wall
# time includes the dump). Caps, seconds (each overridable by the variable of that name):
#   CAP_KERNELS 150 (the kernel checks)   CAP_SCORE_FIRST 120 (default: pays the cold compile)
#   CAP_SCORE 45 (every other variant)    CAP_WGPU 60       CAP_BISECT 40 (each ref-<op> run)
#   CAP_TRAIN 150 (first GPU fine-tune)   CAP_TRAIN_AGAIN 90 (second)   CAP_TRAIN_CPU 60
#   CAP_NF4_ROWS 60    CAP_PHITUNE 180 (each bench --train)    CAP_HF 150 (each hf_train.py)
# The diagnostics have first claim: the score variants and the bisection start only while more
# than TRAIN_RESERVE_S (150) is left for the smoke fine-tunes; the training comparisons get what
# remains after the fine-tunes. All GPU commands share one kernel cache, PHITUNE_CACHE
# (default $OUT/cache: compiled PTX and autotune results), so later steps reuse what earlier
# ones compiled and tuned.
#
# The GPU machine needs no Rust and no network: build here (CUDARC_CUDA_VERSION names the GPU
# machine's CUDA, 13000 for 13.0, when this machine has none) and send the binaries along
# gzipped; the main binary last, since every one of these builds (the test one too) writes
# target/release/phitune:
#   export CUDARC_CUDA_VERSION=13000
#   cargo build --release --no-default-features --features cuda-nofusion     # optional
#   gzip -c target/release/phitune > phitune-nofusion.gz
#   cargo build --release --features cuda,cuda-autotune-checks               # optional
#   gzip -c target/release/phitune > phitune-autotune-checks.gz
#   cargo test --release --features cuda --test cuda_kernels --no-run        # prints the test binary
#   gzip -c target/release/deps/cuda_kernels-<hash> > cuda_kernels.gz
#   cargo build --release --features cuda,wgpu && gzip -kf target/release/phitune
# then, there, from the repository's copy (torch, transformers and peft installed; bitsandbytes
# from a wheel, or unpacked on PYTHONPATH; a path X, relative to the repository's root, stands
# for X or X.gz; leave out target/release/phitune itself or make sure it is the main build):
#   OUT=/tmp/out BNB_WHEEL=bitsandbytes-....whl KERNELS_TEST=cuda_kernels \
#     PHITUNE_NOFUSION=phitune-nofusion PHITUNE_AUTOTUNE_CHECKS=phitune-autotune-checks \
#     benches/gpu.sh
# Knobs: OUT, PHITUNE (default target/release/phitune), PHITUNE_NOFUSION,
# PHITUNE_AUTOTUNE_CHECKS, KERNELS_TEST, BNB_WHEEL, PYTHON, PHITUNE_CACHE, BUDGET_S, RESERVE_S,
# TRAIN_RESERVE_S, the CAP_* above, GDB_TIMEOUT_S (20), DEVICE (cuda), DTYPE (bf16), STEPS (10),
# WARMUP (3), SETTINGS ("2x128 16x512"), PEAK_TFLOPS, DRY_RUN, DRY_RUN_BISECT, LAVAPIPE.
# DRY_RUN=1 benches/gpu.sh runs every step here on the CPU at toy sizes (checks the script; the
# cubecl.toml variants, --tf32 and PHITUNE_REFERENCE_OPS run too, which the CPU backend ignores;
# hf_train.py fails there without torch and is recorded as failed); DRY_RUN_BISECT=1 forces
# the bisection, LAVAPIPE=1 runs the wgpu variant on Mesa's lavapipe (never in a real run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-target/gpu-bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/gpu.jsonl"
log() { echo "== [${SECONDS}s] $*" >&2; }
abspath() { case $1 in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
# unpack PATH DEST: the absolute path of PATH when it is an executable, else PATH.gz (or PATH
# itself when it ends in .gz) unpacked to DEST; nothing when there is neither.
unpack() {
  local p=$1 dest=$2 gz
  [ -n "$p" ] || return 0
  if [ -x "$p" ] && [ "${p%.gz}" = "$p" ]; then abspath "$p"; return 0; fi
  gz=$p; [ "${p%.gz}" = "$p" ] && gz=$p.gz
  if [ -f "$gz" ]; then gunzip -c "$gz" > "$dest" && chmod +x "$dest" && echo "$dest"; fi
}

BIN=$(unpack "${PHITUNE:-target/release/phitune}" "$OUT/phitune")
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
  echo "no phitune binary at ${PHITUNE:-target/release/phitune} (or .gz)" >&2; exit 1
fi
BIN_NOFUSION=$(unpack "${PHITUNE_NOFUSION:-}" "$OUT/phitune-nofusion") || BIN_NOFUSION=""
BIN_CHECKS=$(unpack "${PHITUNE_AUTOTUNE_CHECKS:-}" "$OUT/phitune-autotune-checks") || BIN_CHECKS=""
KT=$(unpack "${KERNELS_TEST:-}" "$OUT/cuda_kernels") || KT=""
# One kernel cache for every GPU command of this script (not packed into the archive).
export PHITUNE_CACHE=${PHITUNE_CACHE:-$OUT/cache}
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
if command -v nvidia-smi >/dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; fi

BUDGET_S=${BUDGET_S:-540} RESERVE_S=${RESERVE_S:-30} TRAIN_RESERVE_S=${TRAIN_RESERVE_S:-150}
CAP_KERNELS=${CAP_KERNELS:-150} CAP_SCORE_FIRST=${CAP_SCORE_FIRST:-120} CAP_SCORE=${CAP_SCORE:-45}
CAP_WGPU=${CAP_WGPU:-60} CAP_BISECT=${CAP_BISECT:-40} CAP_TRAIN=${CAP_TRAIN:-150}
CAP_TRAIN_AGAIN=${CAP_TRAIN_AGAIN:-90} CAP_TRAIN_CPU=${CAP_TRAIN_CPU:-60}
CAP_NF4_ROWS=${CAP_NF4_ROWS:-60} CAP_PHITUNE=${CAP_PHITUNE:-180} CAP_HF=${CAP_HF:-150}
GDB_TIMEOUT_S=${GDB_TIMEOUT_S:-20}

ms() { date +%s%3N; }
secs() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }
# The descendants of a process, deepest first.
descendants() {
  local c
  for c in $(pgrep -P "$1" 2>/dev/null); do descendants "$c"; echo "$c"; done
}
# The threads of some processes from /proc: name, state, wchan, CPU ticks used over one second
# (busy: compiling or spinning; none anywhere: waiting, a hang), kernel stack when readable.
proc_threads() {
  local p task tid s f comm wchan
  local -A before=()
  for task in $(for p in "$@"; do echo /proc/"$p"/task/*; done); do
    s=$(cat "$task/stat" 2>/dev/null) || continue
    read -ra f <<< "${s##*) }"
    before[${task##*/}]=$((f[11] + f[12]))
  done
  sleep 1
  for p in "$@"; do
    echo "## process $p: $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null)"
    echo "tid name state wchan ticks-in-the-last-1s(of $(getconf CLK_TCK 2>/dev/null || echo 100)) ticks"
    for task in /proc/"$p"/task/*; do
      tid=${task##*/}
      s=$(cat "$task/stat" 2>/dev/null) || continue
      read -ra f <<< "${s##*) }"
      comm=$(cat "$task/comm" 2>/dev/null || echo '?')
      wchan=$(cat "$task/wchan" 2>/dev/null || echo '?')
      echo "$tid ${comm// /_} ${f[0]} ${wchan:-0} $((f[11] + f[12] - ${before[$tid]:-0})) $((f[11] + f[12]))"
      if [ -r "$task/stack" ]; then sed 's/^/    /' "$task/stack" 2>/dev/null || true; fi
    done
  done
}
# dump_stacks PID LOG OUT CMD...: what a step about to be stopped is doing, into OUT: /proc for
# the process and its descendants, gdb's (and py-spy's, for Python) stacks of the process itself.
dump_stacks() {
  local pid=$1 log=$2 out=$3 a pids f
  shift 3
  pids="$pid $(descendants "$pid")"
  {
    echo "# $(date -u +%FT%TZ): the step hit its time limit; command: $*"
    # shellcheck disable=SC2086
    proc_threads $pids
    if command -v nvidia-smi >/dev/null; then
      echo "## nvidia-smi"
      nvidia-smi --query-gpu=utilization.gpu,memory.used,power.draw,clocks.sm --format=csv 2>&1
    fi
    if command -v gdb >/dev/null; then
      echo "## gdb: thread apply all bt, process $pid"
      timeout -k 2 "$GDB_TIMEOUT_S" gdb -p "$pid" -batch -nx -ex "set pagination off" \
        -ex "thread apply all bt" 2>&1 | grep -vE '^\[New LWP|^\[Thread debugging' || true
    else
      echo "## no gdb"
    fi
    if command -v py-spy >/dev/null && grep -q python "/proc/$pid/comm" 2>/dev/null; then
      echo "## py-spy dump, process $pid"
      timeout -k 2 "$GDB_TIMEOUT_S" py-spy dump --pid "$pid" 2>&1 || true
    fi
    echo "## the last 40 lines of $log"
    tail -n 40 "$log"
    for a in "CUBECL_DEBUG_LOG=${CUBECL_DEBUG_LOG:-}" "$@"; do
      case $a in
        CUBECL_DEBUG_LOG=?*)
          f=${a#CUBECL_DEBUG_LOG=}
          echo "## the last 100 lines of $f"
          tail -n 100 "$f" 2>&1 || true ;;
      esac
    done
  } > "$out" 2>&1 || true
}
# TERM to a process and its descendants, KILL 5 s later.
stop_tree() {
  local pids k=0
  pids="$1 $(descendants "$1")"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  while kill -0 "$1" 2>/dev/null && [ $k -lt 20 ]; do sleep 0.25; k=$((k + 1)); done
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
}
STEP_PID=""
trap '[ -n "$STEP_PID" ] && stop_tree "$STEP_PID"; exit 130' INT TERM

# One JSON line per step into gpu.jsonl: status, wall time, the "GPU kernels: ..." line of its
# log, the seconds to the first STEP_MARK line, the stack dump; the end of its log if it failed.
step_record() { # NAME LOG WALL_MS [STACKS]
  "$PY" - "$1" "$STEP_STATUS" "$3" "$2" "${4:-}" "$STEP_MARK_S" >> "$OUT/gpu.jsonl" <<'EOF'
import json, sys
name, status, wall_ms, log, stacks, mark = sys.argv[1:7]
try:
    lines = open(log, errors="replace").read().splitlines()
except OSError:
    lines = []
r = {"kind": "step", "step_name": name, "status": status, "wall_s": int(wall_ms) / 1000}
k = [l for l in lines if l.startswith("GPU kernels:")]
if k:
    r["gpu_kernels"] = k[-1]
if mark:
    r["first_mark_s"] = float(mark)
if stacks:
    r["stacks"] = stacks
if status != "ok":
    r["failed"] = status + (f" (stacks saved in {stacks.rsplit('/', 1)[-1]})" if stacks else "")
    r["log_tail"] = [l for l in lines if l.strip()][-4:]
print(json.dumps(r))
EOF
}
# step NAME CAP LOG CMD...: runs CMD (an executable, never a shell function: it is exec'd, so
# the process watched is CMD itself) within its allowance, its stderr to LOG and its stdout
# where the caller's stdout goes; records the step (step_record) and returns non-zero when it
# failed or ran out of time. Optional, as assignments before the call: STEP_CWD (the directory
# to run in), STEP_MARK (an extended regex: STEP_MARK_S gets the seconds until the first line
# of LOG matching it), STEP_RESERVE (seconds of the budget to leave untouched).
# Sets STEP_STATUS (ok, exit N, timed out after T s, skipped: out of budget).
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET_S - SECONDS - RESERVE_S - ${STEP_RESERVE:-0}))
  STEP_STATUS="" STEP_MARK_S=""
  if [ "$left" -lt 10 ]; then
    echo "skipped: out of budget" > "$log"
    STEP_STATUS="skipped: out of budget"; log "$name: $STEP_STATUS"
    step_record "$name" "$log" 0; return 1
  fi
  local t=$((cap < left ? cap : left)) t0 now status=0 stacks=""
  t0=$(ms)
  (if [ -n "${STEP_CWD:-}" ]; then cd "$STEP_CWD" || exit 126; fi; exec "$@") 2> "$log" &
  STEP_PID=$!
  while kill -0 "$STEP_PID" 2>/dev/null; do
    now=$(ms)
    if [ -n "${STEP_MARK:-}" ] && [ -z "$STEP_MARK_S" ] && grep -qE -- "$STEP_MARK" "$log" 2>/dev/null; then
      STEP_MARK_S=$(secs $((now - t0)))
    fi
    if [ $((now - t0)) -ge $((t * 1000)) ]; then
      stacks="$log.stacks"
      log "$name: $t s are up: saving its threads' stacks to $stacks, then stopping it"
      dump_stacks "$STEP_PID" "$log" "$stacks" "$@"
      stop_tree "$STEP_PID"
      status=124
      break
    fi
    sleep 0.25
  done
  local waited=0
  wait "$STEP_PID" 2>/dev/null || waited=$?
  [ $status -ne 0 ] || status=$waited
  STEP_PID=""
  now=$(ms)
  if [ -n "${STEP_MARK:-}" ] && [ -z "$STEP_MARK_S" ] && grep -qE -- "$STEP_MARK" "$log" 2>/dev/null; then
    STEP_MARK_S=$(secs $((now - t0)))
  fi
  STEP_STATUS=ok
  if [ $status -eq 124 ]; then STEP_STATUS="timed out after $t s"
  elif [ $status -ne 0 ]; then STEP_STATUS="exit $status"; fi
  [ $status -eq 0 ] || log "$name: $STEP_STATUS"
  step_record "$name" "$log" $((now - t0)) "$stacks"
  [ $status -eq 0 ]
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
if [ -z "${DRY_RUN:-}" ] && [ -n "$KT" ] && [ -x "$KT" ]; then
  log "kernel checks on $DEVICE"
  step kernels "$CAP_KERNELS" "$OUT/kernels.log" "$KT" --test-threads 1 > "$OUT/kernels.txt" || true
  KERNELS_RESULT=$(grep -E "^test .* (ok|FAILED|ignored)$|^test result" "$OUT/kernels.txt" | sed 's/^/    /' || true)
  [ -n "$KERNELS_RESULT" ] || KERNELS_RESULT="    no test finished: $STEP_STATUS"
fi

# --- 1. score diagnostics ---------------------------------------------------------------------
TEXTS=()
while IFS= read -r -d '' t; do TEXTS+=(--text "$t"); done < <("$PY" -c '
import json, sys; e = json.load(open("tests/fixtures/expected.json"))
sys.stdout.write("".join(c["text"] + "\0" for c in e["tiny-phi"]["score"]))')
SCORE=(score --dtype f32 --model "$ROOT/tests/fixtures/tiny-phi" "${TEXTS[@]}")

# score_check VARIANT JSONL LOG STATUS: compares a variant's output with HF's, appends its row
# to gpu.jsonl, and returns 0 when it is right (every text, HF's tokens, no NaN, |NLL - HF| <
# 1e-3). JSONL empty: the variant did not run, STATUS says why.
score_check() {
  "$PY" - "$@" >> "$OUT/gpu.jsonl" <<'EOF'
import json, math, re, sys
variant, out, log, status = sys.argv[1:5]
exp = json.load(open("tests/fixtures/expected.json"))["tiny-phi"]["score"]
r = {"kind": "score", "variant": variant, "step_name": "score " + variant, "status": status}
pat = re.compile(r"out[ -]of[ -]bounds|\boob\b|validation|panicked", re.I)
got, distinct, kernels, n_flagged = [], {}, set(), 0
def flag(l):
    global n_flagged
    if pat.search(l):
        n_flagged += 1
        if len(distinct) < 5:
            distinct[l.strip()[:300]] = 1
        m = re.search(r"\[VALIDATION ([^\]]+)\]", l)
        if m:
            kernels.add(m.group(1))
for path in [p for p in (out, log) if p]:
    try:
        f = open(path, errors="replace")
    except OSError:
        continue
    for l in f:
        i = l.find('{"') if path == out else -1  # device printf (validate) shares stdout
        if i >= 0:
            try:
                got.append(json.loads(l[i:]))
                l = l[:i]
            except ValueError:
                pass
        flag(l)
kernels = sorted(kernels)
r.update(flagged=list(distinct), n_flagged=n_flagged, oob_kernels=kernels[:10])
if not got:
    r.update(ran=False, ok=False, verdict=status if status.startswith("not run") else f"did not run: {status}")
else:
    nan, off, worst = [], [], 0.0
    for i, (g, e) in enumerate(zip(got, exp)):
        for j, (a, b) in enumerate(zip(g.get("nll", []), e["nll"])):
            if a is None or not math.isfinite(a):
                nan.append([i, j])
            else:
                worst = max(worst, abs(a - b))
                if abs(a - b) > 1e-3:
                    off.append([i, j, round(abs(a - b), 6)])
    same = len(got) == len(exp) and all(g.get("tokens") == e["tokens"] for g, e in zip(got, exp))
    ok = same and not nan and worst < 1e-3 and all(len(g.get("nll", [])) == len(e["nll"]) for g, e in zip(got, exp))
    parts = []
    if nan:
        parts.append(f"{len(nan)} NaN at " + " ".join(f"({i},{j})" for i, j in nan[:5]))
    if off:
        parts.append(f"{len(off)} > 1e-3")
    if len(got) != len(exp):
        parts.append(f"{len(got)} of {len(exp)} texts")
    elif not same:
        parts.append("tokens differ from HF's")
    if status != "ok":
        parts.append(status)
    if kernels:
        parts.append("OOB in " + ", ".join(kernels[:3]))
    elif n_flagged:
        parts.append(f"{n_flagged} flagged lines")
    r.update(ran=True, ok=ok, verdict="; ".join(["ok" if ok else "WRONG"] + parts),
             max_abs_err=worst, tokens_equal=same, texts=len(got),
             nan_at=nan[:20], n_nan=len(nan), off_at=off[:20], n_off=len(off))
print(json.dumps(r))
err = f", max |NLL - HF| {r['max_abs_err']:.2e}" if r["ran"] else ""
print(f"== score {variant}: {r['verdict']}{err}", file=sys.stderr)
sys.exit(0 if r["ok"] else 1)
EOF
}
# score_variant NAME CAP CMD...: one bounded run of CMD (a `score` command line) and its
# comparison with HF; 0 when right. STEP_CWD and the like pass through to step.
score_variant() {
  local name=$1 cap=$2
  shift 2
  STEP_RESERVE=$TRAIN_RESERVE_S step "score $name" "$cap" "$OUT/score-$name.log" "$@" \
    > "$OUT/score-$name.jsonl" || true
  score_check "$name" "$OUT/score-$name.jsonl" "$OUT/score-$name.log" "$STEP_STATUS"
}
score_skip() { score_check "$1" "" "" "$2" || true; }
# A scratch directory holding a cubecl.toml (CubeCL reads the one of the working directory).
cubecl_dir() {
  local d="$OUT/cfg-$1"
  shift
  mkdir -p "$d"
  printf '%s\n' "$@" > "$d/cubecl.toml"
  echo "$d"
}

log "score diagnostics on $DEVICE against HF"
DEFAULT_OK=0 REFERENCE_OK=0
RUN=("${SCORE[@]}" --device "$DEVICE")
score_variant default "$CAP_SCORE_FIRST" env "CUBECL_DEBUG_LOG=$OUT/cubecl-score.log" \
  "$BIN" "${RUN[@]}" && DEFAULT_OK=1
score_variant tf32 "$CAP_SCORE" "$BIN" "${RUN[@]}" --tf32 || true
STEP_CWD=$(cubecl_dir validate '[compilation]' 'check_mode = "validate"') \
  score_variant validate "$CAP_SCORE" "$BIN" "${RUN[@]}" || true
STEP_CWD=$(cubecl_dir enforce '[compilation]' 'check_mode = "enforce"') \
  score_variant enforce "$CAP_SCORE" "$BIN" "${RUN[@]}" || true
STEP_CWD=$(cubecl_dir one-stream '[streaming]' 'max_streams = 1') \
  score_variant one-stream "$CAP_SCORE" "$BIN" "${RUN[@]}" || true
score_variant reference-all "$CAP_SCORE" env PHITUNE_REFERENCE_OPS=all "$BIN" "${RUN[@]}" \
  && REFERENCE_OK=1
if [ -n "$BIN_NOFUSION" ]; then
  score_variant nofusion "$CAP_SCORE" "$BIN_NOFUSION" "${RUN[@]}" || true
else
  score_skip nofusion "not run: no PHITUNE_NOFUSION binary"
fi
if [ -n "$BIN_CHECKS" ]; then
  score_variant autotune-checks "$CAP_SCORE" "$BIN_CHECKS" "${RUN[@]}" || true
else
  score_skip autotune-checks "not run: no PHITUNE_AUTOTUNE_CHECKS binary"
fi
ICD=""
for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
  for f in "$d"/nvidia_icd*.json; do [ -f "$f" ] && [ -z "$ICD" ] && ICD=$f; done
done
if [ -z "$ICD" ] && [ -n "${DRY_RUN:-}" ] && [ -n "${LAVAPIPE:-}" ]; then
  for f in /usr/share/vulkan/icd.d/lvp_icd*.json; do [ -f "$f" ] && [ -z "$ICD" ] && ICD=$f; done
fi
if [ -n "$ICD" ]; then
  score_variant wgpu "$CAP_WGPU" env "VK_ICD_FILENAMES=$ICD" "$BIN" "${SCORE[@]}" --device wgpu || true
else
  score_skip wgpu "not run: no NVIDIA Vulkan ICD (nvidia_icd*.json)"
fi
BISECT="not needed (default is right, or reference-all is wrong too)"
if { [ $DEFAULT_OK -eq 0 ] && [ $REFERENCE_OK -eq 1 ]; } || [ -n "${DRY_RUN_BISECT:-}" ]; then
  log "bisection: one op at a time on its reference"
  fixes=()
  for op in nf4 matmul cross_entropy gelu rope dropout; do
    score_variant "ref-$op" "$CAP_BISECT" env "PHITUNE_REFERENCE_OPS=$op" "$BIN" "${RUN[@]}" \
      && fixes+=("$op")
  done
  BISECT="ops whose reference alone makes the score right: ${fixes[*]:-none (several ops at once, or not ours)}"
fi

# --- 2. smoke fine-tune ------------------------------------------------------------------------
log "smoke: 4-step NF4 fine-tune, twice on $DEVICE, then on the cpu"
SMOKE_TRAIN="FAILED: the fine-tune did not run (see the failures below)"
TRAIN=(train --dtype f32 --model "$ROOT/tests/fixtures/tiny-phi"
  --data "$ROOT/data/samples/persona_chat_sample.jsonl" --max-steps 4
  --micro-batch 2 --grad-accum 2 --lr 1e-3 --lora-dropout 0.1 --quant nf4
  --valid-fraction 0.1 --eval-rows 4 --eval-every 4 --save-every 4 --no-dashboard
  # GPUs widen micro-batches to multiples of 64 positions by default; the CPU run does the same
  # so that both draw the same dropout masks (they follow the layout).
  --pad-to-multiple 64)
for run in 1 2 cpu; do
  d=$DEVICE cap=$CAP_TRAIN name="smoke-train $DEVICE #1"
  [ $run = 2 ] && cap=$CAP_TRAIN_AGAIN name="smoke-train $DEVICE #2 (cached kernels)"
  [ $run = cpu ] && d=cpu cap=$CAP_TRAIN_CPU name="smoke-train cpu"
  rm -rf "$OUT/train-$run"
  # CubeCL logs what it compiles and autotunes (where the first steps' time goes).
  debug=()
  [ "$run" != cpu ] && debug=(env "CUBECL_DEBUG_LOG=$OUT/cubecl-train-$run.log")
  STEP_MARK='^step +1/' step "$name" "$cap" "$OUT/train-$run.log" "${debug[@]}" "$BIN" \
    "${TRAIN[@]}" --device "$d" --out "$OUT/train-$run" > /dev/null || true
done
SMOKE_TRAIN=$("$PY" - "$OUT/train-1" "$OUT/train-2" "$OUT/train-cpu" <<'EOF'
import json, sys
def losses(d):
    try:
        return [r["loss"] for r in map(json.loads, open(d + "/metrics.jsonl")) if r["split"] == "train"]
    except OSError:
        return None
ref = losses(sys.argv[3])
out = []
for n, d in (("#1", sys.argv[1]), ("#2", sys.argv[2])):
    a = losses(d)
    if not a or not ref:
        out.append(f"{n}: FAILED: {'no GPU losses' if not a else 'no CPU losses'}")
        continue
    worst = max(abs(x - y) for x, y in zip(a, ref))
    out.append(f"{n}: {'ok' if len(a) == 4 and worst < 2e-3 else 'FAILED'}: max |loss - cpu| {worst:.2e} over {len(a)} steps")
print("; ".join(out))
EOF
) || true

# --- 3. NF4 product paths ----------------------------------------------------------------------
log "NF4 paths at $ROWS rows"
if step nf4-rows "$CAP_NF4_ROWS" "$OUT/nf4-rows.log" "$BIN" bench --device "$DEVICE" --dtype "$DTYPE" \
  --config "$CONFIG" --nf4-rows "$ROWS" --repeats 5 > "$OUT/nf4-rows.json"; then
  record nf4-rows "$(cat "$OUT/nf4-rows.json")"
fi

# --- 4. training, phitune vs transformers + PEFT + bitsandbytes -------------------------------
for setting in $SETTINGS; do
  B=${setting%x*} S=${setting#*x}
  log "training $B x $S: phitune"
  if run_sampled step "phitune $setting" "$CAP_PHITUNE" "$OUT/phitune-$setting.log" \
    "$BIN" bench --train --device "$DEVICE" --dtype "$DTYPE" --config "$CONFIG" \
    --quant nf4 --grad-checkpointing true --micro-batch "$B" --seq-len "$S" --steps "$STEPS" \
    --warmup-steps "$WARMUP" --prompt-len 32 --new-tokens 64 --repeats 2 \
    > "$OUT/phitune-$setting.json"; then
    record "phitune $setting" "$(cat "$OUT/phitune-$setting.json")" "$PEAK_MIB"
  fi
  log "training $B x $S: transformers + PEFT + bitsandbytes"
  # shellcheck disable=SC2086
  if run_sampled step "hf $setting" "$CAP_HF" "$OUT/hf-$setting.log" \
    "$PY" benches/hf_train.py --config "$CONFIG" --device "$HF_DEVICE" --dtype "$DTYPE" \
    --quant "$QUANT_HF" $GC_HF --micro-batch "$B" --seq-len "$S" --steps "$STEPS" \
    --warmup-steps "$WARMUP" --weights-dir "$OUT/hf-weights" > "$OUT/hf-$setting.json"; then
    record "hf $setting" "$(cat "$OUT/hf-$setting.json")" "$PEAK_MIB"
  fi
done

# --- 5. the table --------------------------------------------------------------------------------
"$PY" - "$OUT/gpu.jsonl" "$SMOKE_TRAIN" "${PEAK_TFLOPS:-}" "$KERNELS_RESULT" "$BISECT" \
  "$SECONDS" "$BUDGET_S" > "$OUT/gpu.md" <<'EOF'
import json, subprocess, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = {r["step_name"]: r for r in rows if r.get("kind") == "step"}
failed = [r for r in rows if r.get("kind") == "step" and "failed" in r]
scores = [r for r in rows if r.get("kind") == "score"]
bench = [r for r in rows if "report" in r and r["step_name"] != "nf4-rows"]
gpu = "cpu (dry run)"
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
except Exception:
    pass
def kern(s):
    k = s.get("gpu_kernels", "-")
    return k.split(" (")[0].removeprefix("GPU kernels: ") if k != "-" else k
def pairs(v):
    return " ".join(f"({p[0]},{p[1]})" for p in v) or "-"
# Dense bf16 peak of the card, FLOP/s (PEAK_TFLOPS overrides).
peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
peak = float(sys.argv[3]) * 1e12 if sys.argv[3] else next((v for k, v in peaks.items() if k in gpu), None)
out = [f"GPU: {gpu}; {sys.argv[6]} s of a {sys.argv[7]} s budget", "", "kernel checks:", sys.argv[4], "",
       "score diagnostics (tiny-phi, f32, 4 texts against HF; right = HF's tokens, no NaN, |NLL - HF| < 1e-3;"
       " (text, position) pairs, position = index into nll):", "",
       "| variant | verdict | max \\|NLL - HF\\| | NaN at | > 1e-3 at (first 20) | flagged lines (first 5) | s | GPU kernels |",
       "|---|---|---|---|---|---|---|---|"]
for r in scores:
    s = steps.get(r["step_name"], {})
    err = f"{r['max_abs_err']:.2e}" if "max_abs_err" in r else "-"
    flagged = " / ".join(x[:160] for x in r["flagged"])
    if r["n_flagged"] > len(r["flagged"]):
        flagged += f" ({r['n_flagged']} in all)"
    cells = [r["variant"], r["verdict"], err, pairs(r.get("nan_at", [])), pairs(r.get("off_at", [])),
             flagged or "-", s.get("wall_s", "-"), kern(s)]
    out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
out += ["", f"bisection: {sys.argv[5]}", "", f"smoke fine-tune (GPU runs against the CPU's losses): {sys.argv[2]}", "",
        "| run | status | s | s to step 1 | GPU kernels |", "|---|---|---|---|---|"]
for n, s in steps.items():
    if n.startswith("smoke-train"):
        out.append(f"| {n} | {s['status']} | {s['wall_s']} | {s.get('first_mark_s', '-')} | {kern(s)} |")
out += ["", "| setting | impl | tokens/s | vs HF | step s | fwd s | bwd s | opt s | peak device MiB | reported peak GiB | MFU | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
hf = {r["step_name"].split()[1]: r["report"]["tokens_per_s"] for r in bench if r["step_name"].startswith("hf ")}
for r in bench:
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
nf4 = next((r for r in rows if r["step_name"] == "nf4-rows" and "report" in r), None)
if nf4:
    rep = nf4["report"]
    out += ["", f"NF4 product on fc1 {rep['shape']} (default GEMV below {rep['default_gemv_max_rows']} rows):", "",
            "| rows | GEMV us | dequantize + matmul us | GEMV weight GB/s |", "|---|---|---|---|"]
    out += [f"| {t['m']} | {t['gemv_us']:.1f} | {t['dequantize_matmul_us']:.1f} | {t['gemv_weight_gb_s']:.0f} |" for t in rep["rows"]]
out += ["", "Every step:", "", "| step | status | s | GPU kernels |", "|---|---|---|---|"]
out += [f"| {n} | {s['status']} | {s['wall_s']} | {kern(s)} |" for n, s in steps.items()]
if failed:
    out += ["", "Steps that did not finish:", ""]
    out += [f"- {r['step_name']}: {r['failed']}: " + " / ".join(r["log_tail"]) for r in failed]
print("\n".join(out))
EOF
cat "$OUT/gpu.md"
# CubeCL's log (and a validate run's stdout) can be long: keep the first and last 8 MB of each
# file over 16 MB so that the archive stays small.
for f in "$OUT"/*.log "$OUT"/score-*.jsonl; do
  if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 16000000 ]; then
    { head -c 8000000 "$f"; echo; echo "[... cut ...]"; tail -c 8000000 "$f"; } > "$f.cut" && mv "$f.cut" "$f"
  fi
done
tar czf "$OUT/gpu-files.tgz" -C "$OUT" --exclude=./gpu-files.tgz --exclude=./hf-weights \
  --exclude=./cache --exclude=./phitune --exclude=./phitune-nofusion \
  --exclude=./phitune-autotune-checks --exclude=./cuda_kernels --exclude='*.safetensors' \
  --exclude='*.mpk' . 2>/dev/null || true
