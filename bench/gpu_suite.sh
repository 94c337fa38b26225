#!/usr/bin/env bash
# GPU evidence run (../shared/GPU.md) in timed stages that fit one 15-minute GPU lease:
# at most 8 minutes in all on an H100, each stage capped by `timeout` and writing its file as it
# goes (a cut run still returns what the finished stages wrote).
#
#   bash bench/gpu_suite.sh OUTDIR [COMMIT]
#
# Afterwards, here: copy OUTDIR to bench/results/<device>/<date>-<short commit>/ and run
# `fcot bench report` (plots + docs/performance.md with every target's measured ratio).
#
# Files (8 at most, all in OUTDIR): system.txt, stages.txt (each stage's seconds and exit status,
# appended as it ends), build.log, tests.log, sanitizer.log, bench.log, bench.csv, bench.json.
# Copy them to bench/results/<device>/<date>-<short commit>/ and commit them as produced; the
# benchmark also folds the backend timings into fcot_kernels/dispatch_table.json (commit it too).
#
# Stage budgets (seconds; FCOT_STAGE_SCALE multiplies them all): build 120, tests 150,
# sanitizer 75, bench 135 -> 480 s = 8 min worst case. FCOT_BENCH_SHAPES=target|all (default target).
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_suite.sh OUTDIR [COMMIT]}
mkdir -p "$OUT"
export FCOT_GIT_COMMIT=${2:-${FCOT_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SCALE=${FCOT_STAGE_SCALE:-1}
STAGES="$OUT/stages.txt"
status=0
: > "$STAGES"

budget() { $PY -c "print(int($1 * $SCALE))"; }

# stage NAME BUDGET_S LOGFILE COMMAND...: run COMMAND under `timeout`, output streamed into
# LOGFILE as it is produced, then append "NAME seconds exit" to stages.txt.
stage() {
  local name=$1 limit; limit=$(budget "$2"); local log=$3; shift 3
  local start=$SECONDS
  echo "== $name (budget ${limit}s) $(date -u +%T)" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "== $name: TIMED OUT after ${limit}s" >> "$log"
  printf '%-10s %4ds  exit %d%s\n' "$name" $((SECONDS - start)) $rc "$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$STAGES"
  return $rc
}

# Peers carried as wheels (the GPU machine has no package index): .whl/*.whl, e.g. liger-kernel.
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fcot-site .whl/*.whl \
    && export PYTHONPATH=/tmp/fcot-site${PYTHONPATH:+:$PYTHONPATH}
fi

# 0. The environment and the commit (the tree on the GPU machine may have no .git).
{
  echo "commit: $FCOT_GIT_COMMIT"; date -u
  nvidia-smi
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
} > "$OUT/system.txt" 2>&1

# 1. Build the CUDA extension for sm_90 with the installed torch (no network, no build isolation).
: > "$OUT/build.log"
stage build 120 "$OUT/build.log" env FCOT_REQUIRE_CUDA=1 FCOT_CUDA_ARCHS=90 \
  $PY -m pip install -v --no-deps --no-build-isolation -e . || { tail -30 "$OUT/build.log"; exit 1; }
$PY -c "import fcot_kernels as fk; [print(n, s.available, s.reason) for n, s in fk.backends().items()]" >> "$OUT/system.txt" 2>&1

# 2. The GPU tests of every op (on a GPU the launchers use their GPU configurations; bf16 and
#    fp16 included), the slowest real-shape cases deselected to fit the budget.
: > "$OUT/tests.log"
stage tests 150 "$OUT/tests.log" env FCOT_REQUIRE_CUDA=1 \
  $PY -m pytest tests/fcot_kernels -q -rs -x -p no:cacheprovider -m "not slow" -k "not fuzz" || status=1
tail -3 "$OUT/tests.log"

# 3. compute-sanitizer on a few tiny cases per CUDA kernel: memcheck for all of them, racecheck
#    for the kernels with shared memory (shuffle_merge_norm's reductions, the ToMe match tiles).
: > "$OUT/sanitizer.log"
stage memcheck 45 "$OUT/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest tests/fcot_kernels/ops/test_shuffle_merge_norm.py tests/fcot_kernels/ops/test_tome_merge.py \
  -q -x -p no:cacheprovider -k "cuda and not fuzz and not real" || status=1
stage racecheck 30 "$OUT/sanitizer.log" compute-sanitizer --tool racecheck --error-exitcode 9 \
  $PY -m pytest tests/fcot_kernels/ops/test_shuffle_merge_norm.py tests/fcot_kernels/ops/test_tome_merge.py \
  -q -x -p no:cacheprovider -k "cuda and matches_reference and not fuzz and not real" || status=1
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer.log"

# 4. `fcot bench` at the target shapes: both ceilings (device copy bandwidth, bf16 matmul) measured
#    in the same run, every kernel and end-to-end case, the peers that import (Liger-Kernel when
#    carried as a wheel in .whl/); bench.csv/bench.json are rewritten after every op. compile-max
#    (max-autotune) is excluded unless FCOT_BENCH_MAX_AUTOTUNE=1: its autotuning does not fit the
#    budget. --time-budget ends the timing before the stage's timeout (the kernel ops run first;
#    cases left are rows that say so). The plots and docs/performance.md come afterwards from
#    `fcot bench report`.
: > "$OUT/bench.log"
exclude=(--exclude-provider compile-max)
[ "${FCOT_BENCH_MAX_AUTOTUNE:-0}" = 1 ] && exclude=()
stage bench 135 "$OUT/bench.log" $PY -m fcot bench --no-progress --shapes "${FCOT_BENCH_SHAPES:-target}" \
  "${exclude[@]}" --time-budget "$(budget 110)" --out "$OUT" || status=1
tail -5 "$OUT/bench.log"

echo "stages:"; cat "$STAGES"
exit $status
