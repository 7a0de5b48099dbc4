#!/usr/bin/env bash
# compute-sanitizer over the CUDA extension's GPU tests (issue 4: tests/test_cuda_ext.py and the
# cuda* backends of tests/ops/test_<op>.py): memcheck for out-of-bounds /
# misaligned accesses; with SANITIZE_FULL=1 also racecheck and initcheck on a short subset
# (they are ~10-100x slower). Run from the repository root on a GPU machine after building the extension:
#
#     MAX_JOBS=4 pip install --no-build-isolation -e .   # or: python setup.py build_ext --inplace
#     bash tests/run_sanitizer.sh  [extra pytest args]
#
# Exit status is non-zero if the sanitizer reports any error or a test fails; the summary line
# ("ERROR SUMMARY: 0 errors") of each run is what to record in the issue.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
SAN="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}"
if [ ! -x "$SAN" ]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 2
fi
LOG_DIR="${SANITIZER_LOG_DIR:-${TMPDIR:-/tmp}/fused_lora-sanitizer}"
mkdir -p "$LOG_DIR"
# uncached=1: PYTORCH_NO_CUDA_MEMORY_CACHING=1, so every tensor is its own cudaMalloc and memcheck
# sees each tensor's real bounds (the caching allocator's pooled blocks hide overruns). CUDA-graph
# capture needs the caching allocator, so the graph tests run with it on.
run() {
  local uncached="$1" tool="$2" log="$3"; shift 3
  local envs=()
  [ "$uncached" = 1 ] && envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  echo "== compute-sanitizer --tool $tool $*"
  env "${envs[@]}" "$SAN" --tool "$tool" --error-exitcode 1 --log-file "$LOG_DIR/$log" \
    python -m pytest tests/test_cuda_ext.py tests/ops -m gpu -q -p no:cacheprovider "$@"
  grep -h "ERROR SUMMARY" "$LOG_DIR/$log" || true
}
# EXT: the extension's tests, not the Triton backend's GPU tests in tests/ops (their ids start
# "[triton"; the CUDA backends' ids "[cuda-", "[cuda_mma-", ...).
EXT='(test_cuda_ext or [cuda)'
# The training-sized GEMM case (2048x4096x4096) is left to the plain GPU run: under memcheck its
# fp64 reference and kernels take minutes; the other GEMM shapes cover the same code paths.
run 1 memcheck memcheck.log -k "$EXT and not graph and not 2048x4096x4096" "$@"
run 0 memcheck memcheck-graphs.log -k "$EXT and graph" "$@"
if [ "${SANITIZE_FULL:-0}" = 1 ]; then  # ~10-100x slower than memcheck: opt-in on a short lease
  run 1 racecheck racecheck.log -k "test_raw_fwd_bwd and [cuda- and 130x264x200x16" "$@"
  run 1 initcheck initcheck.log -k "test_raw_fwd_bwd and [cuda- and 130x264x200x16 and float16" "$@"
  # both tensor-core GEMMs where their pipelines reuse every stage slot (11 k-stages)
  run 1 racecheck racecheck-gemms.log \
    -k "(test_raw_gemm_variants or test_raw_multi_fwd_bwd) and [cuda_ and 257x700x256 and f" "$@"
fi
echo "sanitizer logs in $LOG_DIR/"
