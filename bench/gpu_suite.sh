#!/usr/bin/env bash
# GPU evidence run (../shared/GPU.md): one command on the GPU machine that always returns every
# target number, in timed stages whose output is written as it is produced.
#
#   bash bench/gpu_suite.sh OUTDIR COMMIT      on the GPU machine (16 cores, H100/H200, no internet)
#   bash bench/gpu_suite.sh --rehearse OUTDIR  the same orchestration on a CPU machine, in seconds
#                                              (tests/bench/test_gpu_suite.py runs it in CI)
#
# Order (target numbers first, nothing timed while anything else runs):
#   setup      wheels in .whl/ (peers such as liger-kernel), `pip install --no-deps
#              --no-build-isolation -e .` WITHOUT the CUDA extension, system.txt
#   bench      python -m bench at the target shapes: the ceilings, then the cases the targets read
#              (Triton kernels, eager, SDPA and the other peers), then every other case, then the
#              torch.compile providers (compile, then compile-max); each row written as its case
#              ends; a case past its share (--case-timeout, or the stage's end) is cut and recorded
#              as `cut`. The CUDA extension's cases are left for bench-cuda: the build never holds
#              the benchmarks up, and a failed build costs their rows only.
#   build      the CUDA extension for sm_90, 12+ small translation units compiled in parallel by
#              ninja over every core (setup.py build_ext --inplace), in the background while ...
#   tests      ... the curated GPU tests that need no extension run (bench/gpu_tests.py: each op's
#              GPU launch configurations in bf16, one fp32 case, the real model shapes once;
#              pytest-xdist over 6 workers and pytest-timeout per test where installed). Nothing is
#              timed during this phase.
#   bench-cuda the CUDA extension's benchmark cases (python -m bench --merge: rows added to the
#              same bench.json), whether or not the build succeeded (rows then say why)
#   tests-cuda which backends the build gave, then the curated cuda-backend and extension tests
#   memcheck / racecheck   compute-sanitizer on the tiny cuda cases (skipped if the build failed)
#
# Worst case, stage by stage (seconds; each stage is under `timeout` with a KILL s grace, and
# build and tests run side by side so that phase costs the larger of the two):
#   setup 30 + bench 145 + max(build 115, tests 115) + bench-cuda 35 + tests-cuda 25
#   + memcheck 30 + racecheck 20 = 400; 7 phases x KILL 2 = 14; unstaged lines (mkdir, summary) < 6
#   => <= 420 s = 7 minutes, installs included. The script checks this sum before it starts.
#
# Files (8, all directly in OUTDIR, no folders): system.txt (environment, installs), stages.txt
# (each stage's seconds and exit status, appended as it ends), build.log, tests.log,
# sanitizer.log, bench.log, bench.csv, bench.json. Copy them to
# bench/results/<device>/<date>-<short commit>/, commit them as produced and run
# `python -m bench report` (plots + docs/performance.md) and `python -m bench dispatch DIR` (the
# measured backend order into fcot_kernels/dispatch_table.json, which the run itself does not
# touch: only OUTDIR comes back). Exit status: 0 when every stage exited 0 (cut benchmark cases
# are rows, not failures), else 1.
#
# Environment: PYTHON (default python3); FCOT_BENCH_SHAPES=target|all (default target);
# FCOT_REHEARSE_BUILD=ok|fail|timeout and FCOT_REHEARSE_SLOW_TEST=1 choose what --rehearse simulates.
set -uo pipefail

REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
OUT=${1:?usage: bash bench/gpu_suite.sh OUTDIR COMMIT | bash bench/gpu_suite.sh --rehearse OUTDIR}
if [ $REHEARSE = 0 ]; then
  COMMIT=${2:?usage: bash bench/gpu_suite.sh OUTDIR COMMIT (the tree on the GPU machine may have no .git)}
else
  COMMIT=${2:-$(git rev-parse HEAD 2>/dev/null || echo rehearsal)}
fi
mkdir -p "$OUT"
export FCOT_GIT_COMMIT=$COMMIT PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$SECONDS
STAGES="$OUT/stages.txt"
status=0
: > "$STAGES"
for f in system.txt build.log tests.log sanitizer.log bench.log; do : > "$OUT/$f"; done
rm -f "$OUT/bench.csv" "$OUT/bench.json"

# Stage budgets (seconds). --rehearse keeps the orchestration and shrinks what it waits for.
B_SETUP=30 B_BENCH=145 B_BUILD=115 B_TESTS=115 B_BENCH_CUDA=35 B_TESTS_CUDA=25 B_MEMCHECK=30 B_RACECHECK=20 KILL=2
BENCH_CASE=30 BENCH_CUDA_CASE=15 TEST_TIMEOUT=60
WORST=$(( B_SETUP + B_BENCH + (B_BUILD > B_TESTS ? B_BUILD : B_TESTS) + B_BENCH_CUDA + B_TESTS_CUDA + B_MEMCHECK
          + B_RACECHECK + 7 * KILL + 6 ))
if [ $WORST -gt 420 ]; then echo "gpu_suite.sh: stage budgets add up to ${WORST}s > 420s (7 min)" >&2; exit 2; fi
if [ $REHEARSE = 1 ]; then
  # What is simulated to hang gets 3 s; stages doing real work get room for a loaded CI machine.
  B_SETUP=120 B_BENCH=120 B_BUILD=3 B_TESTS=120 B_BENCH_CUDA=120 B_TESTS_CUDA=120 B_MEMCHECK=120 B_RACECHECK=120
  BENCH_CASE=3 BENCH_CUDA_CASE=3 TEST_TIMEOUT=3
fi

# stage NAME BUDGET_S LOGFILE COMMAND...: COMMAND under `timeout`, its output streamed into LOGFILE,
# then "NAME seconds exit" appended to stages.txt. Returns COMMAND's status (124: timed out).
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  echo "== $name (budget ${limit}s) $(date -u +%T)" >> "$log"
  # `bash -c` runs the exported functions below as well as plain commands; timeout signals the
  # whole process group (pytest workers, ninja, nvcc), not just its child.
  timeout --kill-after=$KILL "$limit" bash -c '"$@"' "$name" "$@" >> "$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "== $name: TIMED OUT after ${limit}s" >> "$log"
  printf '%-10s %4ds  exit %d%s\n' "$name" $((SECONDS - start)) $rc "$([ $rc -eq 124 ] && echo ' (timed out)')" >> "$STAGES"
  return $rc
}

# skipped NAME WHY: a stage that did not run, said so in stages.txt (and the exit status).
skipped() { printf '%-10s %4ds  skipped: %s\n' "$1" 0 "$2" >> "$STAGES"; }

have() { $PY -c "import $1" > /dev/null 2>&1; }

# -- what each stage runs (the rehearsal substitutes the GPU-only parts) ----------------------------
setup_cmd() {
  echo "commit: $COMMIT"; date -u
  if [ $REHEARSE = 1 ]; then
    echo "rehearsal on $(uname -m): the project is already installed (CI ran make install)"
  else
    # Peers carried as wheels (no package index there): .whl/*.whl, e.g. liger-kernel.
    if compgen -G ".whl/*.whl" > /dev/null; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fcot-site .whl/*.whl
    fi
    FCOT_SKIP_CUDA=1 $PY -m pip install -q --no-deps --no-build-isolation -e . || return 1
    nvidia-smi
    nvcc --version | tail -2
  fi
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  for m in xdist pytest_timeout liger_kernel; do have $m && echo "$m: installed" || echo "$m: not installed"; done
}

build_cmd() {
  if [ $REHEARSE = 1 ]; then
    case "${FCOT_REHEARSE_BUILD:-timeout}" in
      ok) echo "rehearsal: simulated build succeeded" ;;
      fail) echo "rehearsal: simulated nvcc error: csrc/smn_fwd_bf16_vec8.cu(1): error"; return 1 ;;
      timeout) echo "rehearsal: simulated build that outlasts its budget"; sleep 600 ;;
    esac
  else
    env FCOT_REQUIRE_CUDA=1 FCOT_CUDA_ARCHS=90 $PY setup.py build_ext --inplace
  fi
}

# pytest over the curated subset (FCOT_GPU_TESTS=kernels|cuda), parallel where xdist is installed;
# SANITIZER=memcheck|racecheck runs it under compute-sanitizer (one process: no xdist).
tests_cmd() {
  local part=$1 workers=$2; shift 2
  local args=(-q -rfEs -p no:cacheprovider -p bench.gpu_tests) prefix=()
  [ "$workers" -gt 1 ] && have xdist && args+=(-n "$workers")
  export FCOT_GPU_TESTS="$part" FCOT_GPU_TEST_TIMEOUT=$TEST_TIMEOUT
  export FCOT_REQUIRE_CUDA=$([ "$part" = cuda ] && echo 1 || echo 0)
  if [ -n "${SANITIZER:-}" ]; then
    if [ $REHEARSE = 1 ]; then
      echo "rehearsal: compute-sanitizer --tool $SANITIZER stands aside"
    else
      prefix=(compute-sanitizer --tool "$SANITIZER" --error-exitcode 9)
    fi
  fi
  ${prefix[@]+"${prefix[@]}"} $PY -m pytest "${args[@]}" "$@"
}

# The cuda part starts by saying which backends this build gave (e.g. why the extension is missing).
tests_cuda_cmd() {
  $PY -c "import fcot_kernels as fk; [print('backend', n, s.available, s.reason) for n, s in fk.backends().items()]"
  tests_cmd cuda "$@"
}

export REHEARSE PY COMMIT TEST_TIMEOUT
export -f setup_cmd build_cmd tests_cmd tests_cuda_cmd have

TEST_PATHS=(tests/fcot_kernels)
if [ $REHEARSE = 1 ]; then
  # Stand-ins named like the kernel tests, so that bench/gpu_tests.py's selection runs as on the GPU.
  FAKE=$(mktemp -d)
  trap 'rm -rf "$FAKE"' EXIT
  mkdir -p "$FAKE/ops"
  cat > "$FAKE/ops/test_shuffle_merge_norm.py" <<'PYTEST'
import os, time
import pytest, torch

@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_and_grads_match_reference(backend, dtype):
    assert torch.ones(3, dtype=dtype).sum().item() == 3

def test_bf16_activations_with_fp32_parameters():
    if os.environ.get("FCOT_REHEARSE_SLOW_TEST") == "1":
        time.sleep(600)  # past FCOT_GPU_TEST_TIMEOUT: the per-test limit must fail it

def test_not_curated():
    raise AssertionError("bench/gpu_tests.py should have deselected this test")
PYTEST
  TEST_PATHS=("$FAKE/ops")
  BENCH_ARGS=(--rehearse)
else
  BENCH_ARGS=(--shapes "${FCOT_BENCH_SHAPES:-target}")
fi

# -- the run -----------------------------------------------------------------------------------------
stage setup $B_SETUP "$OUT/system.txt" setup_cmd || status=1
[ $REHEARSE = 0 ] && [ -d /tmp/fcot-site ] && export PYTHONPATH=/tmp/fcot-site${PYTHONPATH:+:$PYTHONPATH}

stage bench $B_BENCH "$OUT/bench.log" $PY -m bench "${BENCH_ARGS[@]}" --no-progress --dispatch-table none \
  --exclude-provider cuda --time-budget $((B_BENCH - 15)) --case-timeout $BENCH_CASE --out "$OUT" || status=1

( stage build $B_BUILD "$OUT/build.log" build_cmd ) &
build_pid=$!
stage tests $B_TESTS "$OUT/tests.log" tests_cmd kernels 6 "${TEST_PATHS[@]}" || status=1
wait $build_pid
build_rc=$?
[ $build_rc -ne 0 ] && status=1

stage bench-cuda $B_BENCH_CUDA "$OUT/bench.log" $PY -m bench "${BENCH_ARGS[@]}" --no-progress --dispatch-table none \
  --provider cuda --merge --time-budget $((B_BENCH_CUDA - 10)) --case-timeout $BENCH_CUDA_CASE --out "$OUT" || status=1
stage tests-cuda $B_TESTS_CUDA "$OUT/tests.log" tests_cuda_cmd 4 "${TEST_PATHS[@]}" || status=1

if [ $build_rc -eq 0 ]; then
  # Tiny cases only: memcheck for every CUDA kernel, racecheck for those with shared memory.
  SANITIZER=memcheck stage memcheck $B_MEMCHECK "$OUT/sanitizer.log" tests_cmd cuda 1 "${TEST_PATHS[@]}" -x \
    -k "not real and not fuzz" || status=1
  SANITIZER=racecheck stage racecheck $B_RACECHECK "$OUT/sanitizer.log" tests_cmd cuda 1 "${TEST_PATHS[@]}" -x \
    -k "(shuffle_merge_norm or tome) and not real and not fuzz" || status=1
else
  skipped memcheck "the CUDA extension did not build (build.log)"
  skipped racecheck "the CUDA extension did not build (build.log)"
fi

printf '%-10s %4ds  exit %d\n' total $((SECONDS - START)) $status >> "$STAGES"
echo "stages:"; cat "$STAGES"
tail -3 "$OUT/bench.log"
exit $status
