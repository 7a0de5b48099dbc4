#!/usr/bin/env bash
# Everything only a GPU can show, in one call (a lent device's 10-minute command limit: run the
# stages separately with STAGES="build tests" etc. if one call is not enough).
#   build   : the extension with its CUDA kernels (no registry on the device: --no-deps)
#   tests   : the whole suite on CUDA tensors (bf16, autotuned configs, CUDA graphs, CUDA ext)
#   sanitize: compute-sanitizer memcheck over the CUDA extension's GPU tests
#   bench   : python -m fused_lora.bench --quick (JSON/CSV/PNG with GPU name and versions;
#             its dispatch suite also rewrites fused_lora/dispatch_table.json, copied to $OUT)
# Logs and results go to $OUT (the device tool brings that folder back); bench results also to
# bench/results/ in the working copy.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fused_lora_gpu}"
mkdir -p "$OUT"
STAGES="${STAGES:-build tests sanitize bench}"
rc=0
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for stage in $STAGES; do
  case "$stage" in
    build)
      log "build"
      # The device image has no registry: --no-deps; if pip's editable install is not possible
      # there (old setuptools), build the extension in place instead.
      MAX_JOBS="${MAX_JOBS:-8}" pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
        || MAX_JOBS="${MAX_JOBS:-8}" python setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 \
        || { rc=1; tail -40 "$OUT/build.log"; }
      python -m fused_lora info --json | tee "$OUT/info.json"
      ;;
    tests)
      log "tests: python -m pytest tests"
      python -m pytest tests -q -rs --durations=20 --junitxml="$OUT/junit.xml" > "$OUT/tests.log" 2>&1 || rc=1
      tail -25 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
      ;;
    sanitize)
      log "sanitize: bash tests/run_sanitizer.sh"
      SANITIZER_LOG_DIR="$OUT/sanitizer" bash tests/run_sanitizer.sh > "$OUT/sanitizer.log" 2>&1 || rc=1
      grep -hE "ERROR SUMMARY|== compute-sanitizer|passed|failed" "$OUT/sanitizer.log" | tee -a "$OUT/summary.txt"
      ;;
    bench)
      log "bench: python -m fused_lora.bench --quick"
      python -m fused_lora.bench --quick --out "$OUT/results" > "$OUT/bench.log" 2>&1 || rc=1
      mkdir -p bench/results && cp "$OUT"/results/* bench/results/ 2>/dev/null
      # The dispatch suite folded its Triton-vs-CUDA timings into the table "auto" follows:
      # bring it back with the results (commit both).
      cp fused_lora/dispatch_table.json "$OUT/dispatch_table.json"
      tail -60 "$OUT/bench.log"
      ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
done
log "done rc=$rc"
exit $rc
