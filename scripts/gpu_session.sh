#!/usr/bin/env bash
# Everything only a GPU can show, sized for a lent device (15 device-minutes a session, one
# command <= 10 minutes, at most 8 files back from $OUT): CPU tests are CI's job, so only the
# `gpu`-marked tests run here, and everything written goes into one $OUT/results.tgz plus
# $OUT/summary.txt.
#
#   build    : the extension with its CUDA kernels (no registry on the device: --no-deps)
#   tests    : python -m pytest tests -m gpu (bf16, autotuned configs, CUDA graphs, CUDA ext)
#   sanitize : compute-sanitizer memcheck over the CUDA extension's GPU tests
#              (SANITIZE_FULL=1: also racecheck and initcheck, ~10x slower)
#   bench    : python -m fused_lora.bench $BENCH_SUITES --quick (default: linear multi dispatch;
#              JSON/CSV/PNG with GPU name and versions; the dispatch suite also rewrites
#              fused_lora/dispatch_table.json) — commit bench/results/ and the table
#
# Two calls fit the budget: STAGES="build tests sanitize" (about 8 minutes), then, while the
# machine is still warm (30 s), STAGES="bench" (the build is kept between warm calls).
# Each stage has a time limit (STAGE_TIMEOUT, default 280 s) so that one slow stage cannot
# spend the whole command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fused_lora_gpu}"
mkdir -p "$OUT"
WORK="$OUT/work"  # everything but the summary; tarred at the end
mkdir -p "$WORK"
STAGES="${STAGES:-build tests sanitize bench}"
LIMIT="${STAGE_TIMEOUT:-280}"
export PYTHONUNBUFFERED=1
rc=0
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/summary.txt"
for stage in $STAGES; do
  case "$stage" in
    build)
      log "build"
      # The device image has no registry: --no-deps; if pip's editable install is not possible
      # there (old setuptools), build the extension in place instead.
      MAX_JOBS="${MAX_JOBS:-16}" timeout "$LIMIT" pip install --no-build-isolation --no-deps -e . \
          > "$WORK/build.log" 2>&1 \
        || MAX_JOBS="${MAX_JOBS:-16}" timeout "$LIMIT" python setup.py build_ext --inplace \
          >> "$WORK/build.log" 2>&1 \
        || { rc=1; tail -40 "$WORK/build.log" | tee -a "$OUT/summary.txt"; }
      python -m fused_lora info --json > "$WORK/info.json" 2>&1
      grep -E '"(gpu|torch|triton|extension|extension_cuda_kernels)"' "$WORK/info.json" | tee -a "$OUT/summary.txt"
      ;;
    tests)
      log "tests: python -m pytest tests -m gpu"
      timeout "$LIMIT" python -m pytest tests -m gpu -q -rs --durations=15 \
          --junitxml="$WORK/junit.xml" > "$WORK/tests.log" 2>&1 || rc=1
      tail -25 "$WORK/tests.log" | tee -a "$OUT/summary.txt"
      ;;
    sanitize)
      log "sanitize: bash tests/run_sanitizer.sh"
      SANITIZER_LOG_DIR="$WORK/sanitizer" timeout "$LIMIT" bash tests/run_sanitizer.sh \
          > "$WORK/sanitizer.log" 2>&1 || rc=1
      grep -hE "ERROR SUMMARY|== compute-sanitizer|passed|failed" "$WORK/sanitizer.log" | tee -a "$OUT/summary.txt"
      ;;
    bench)
      suites="${BENCH_SUITES:-linear multi dispatch}"
      log "bench: python -m fused_lora.bench $suites --quick"
      # shellcheck disable=SC2086
      timeout "$LIMIT" python -m fused_lora.bench $suites --quick --out "$WORK/results" \
          > "$WORK/bench.log" 2>&1 || rc=1
      mkdir -p bench/results && cp "$WORK"/results/* bench/results/ 2>/dev/null
      cp fused_lora/dispatch_table.json "$WORK/dispatch_table.json"
      tail -60 "$WORK/bench.log" | tee -a "$OUT/summary.txt"
      ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
done
log "done rc=$rc"
tar czf "$OUT/results.tgz" -C "$OUT" work && rm -rf "$WORK"
exit $rc
