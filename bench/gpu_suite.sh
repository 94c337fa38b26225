#!/usr/bin/env bash
# GPU evidence run (../shared/GPU.md): environment, sm_90 build, the whole test suite on the GPU,
# CUDA tests under compute-sanitizer, benchmarks with the measured ceilings.
#
#   bash bench/gpu_suite.sh OUTDIR [COMMIT]
#
# Writes at most 6 files into OUTDIR: system.txt, build.log, tests.log, sanitizer.log, bench.log,
# bench.csv + bench.json. Copy them to bench/results/<device>/<date>-<short commit>/ and commit.
# FCOT_BENCH_SHAPES=target|all (default target) picks the benchmark shapes.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_suite.sh OUTDIR [COMMIT]}
mkdir -p "$OUT"
export FCOT_GIT_COMMIT=${2:-${FCOT_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

{
  echo "commit: $FCOT_GIT_COMMIT"; date -u
  nvidia-smi
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
} > "$OUT/system.txt" 2>&1

# 1. Build for sm_90 with the installed torch (no network, no build isolation).
FCOT_REQUIRE_CUDA=1 FCOT_CUDA_ARCHS=90 $PY -m pip install -v --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 \
  || { echo "build failed"; tail -30 "$OUT/build.log"; exit 1; }
$PY -c "import fcot_kernels as fk; [print(n, s.available, s.reason) for n, s in fk.backends().items()]" >> "$OUT/system.txt" 2>&1

# 2. The whole suite on the GPU (every backend), then the CUDA kernels under compute-sanitizer.
FCOT_REQUIRE_CUDA=1 $PY -m pytest tests -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
tail -3 "$OUT/tests.log"
{
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    compute-sanitizer --tool $tool --error-exitcode 9 $PY -m pytest tests -q -x -p no:cacheprovider \
      -k "cuda and not fuzz and not real_shapes" || status=1
  done
} > "$OUT/sanitizer.log" 2>&1
grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log"

# 3. Benchmarks and ceilings (device copy bandwidth, bf16 matmul) in the same run.
$PY -m bench.run --shapes "${FCOT_BENCH_SHAPES:-target}" --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
tail -5 "$OUT/bench.log"
exit $status
