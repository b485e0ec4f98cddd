#!/usr/bin/env bash
# One-command GPU verification, for a lent GPU machine (no network; torch, triton, nvcc,
# pytest and compute-sanitizer preinstalled). Builds the extension in place, runs the gpu and
# cuda_ext test tiers, compute-sanitizer (memcheck, racecheck) over every CUDA kernel path,
# and the quick benchmarks. Everything lands in one folder (default gpu_results/<time>).
#   usage: bash scripts/gpu_check.sh [RESULTS_DIR] [--full-bench]
# Environment:
#   GPU_CHECK_STEPS   space-separated subset of the steps, in the order to run them (default:
#                     all, in the order below). A lease is short: put what matters first.
#   GPU_CHECK_TIMEOUT seconds one step may take before it is stopped and counted failed (900).
#   PYTEST_WORKERS    pytest-xdist workers for the test tier (default 8 when xdist is installed):
#                     most of the tier's time is Triton compiling, which parallelises.
#   SAE_FAST_CUDA_ARCHS as for setup.py (this script defaults it to the GPU's own arch).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-gpu_results/$(date +%Y%m%d-%H%M%S)}
BENCH_ARGS=--quick
[ "${2:-}" = "--full-bench" ] && BENCH_ARGS=
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
STEP_TIMEOUT=${GPU_CHECK_TIMEOUT:-900}
ALL_STEPS="build tests bench-attention tune-attention bench-topk bench-jumprelu bench-integrations bench-prefill \
profile-prefill sanitizer-memcheck sanitizer-racecheck bench-decode regression kernel-report tune-topk tune-threshold"
STEPS=${GPU_CHECK_STEPS:-$ALL_STEPS}
failures=()
step() {  # step NAME LOGFILE CMD...: run, log, remember failures, never stop early
  local name=$1 log=$2; shift 2
  echo "== $name"
  local t0=$SECONDS
  if timeout "$STEP_TIMEOUT" "$@" >"$RESULTS/$log" 2>&1; then echo "   ok ($((SECONDS - t0)) s)"
  else echo "   FAILED ($((SECONDS - t0)) s), see $RESULTS/$log"; tail -n 25 "$RESULTS/$log"; failures+=("$name"); fi
}

{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; nvcc --version; git rev-parse HEAD 2>/dev/null || echo "git sha: ${SAE_FAST_GIT_SHA:-unknown (no .git; pass SAE_FAST_GIT_SHA)}"; } >"$RESULTS/env.txt" 2>&1
if [ -z "${SAE_FAST_CUDA_ARCHS:-}" ]; then
  SAE_FAST_CUDA_ARCHS=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "80;90")
  export SAE_FAST_CUDA_ARCHS
fi
XDIST=()
if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "${PYTEST_WORKERS:-8}"); fi

for s in $STEPS; do
  case $s in
    build) step build build.log env SAE_FAST_BUILD_CUDA=1 MAX_JOBS=$(nproc) SAE_FAST_PTXAS_VERBOSE=1 \
             $PY -m pip install --no-build-isolation --no-deps --no-index -v -e . ;;
    tests) step tests pytest.log $PY -m pytest tests -m "gpu or cuda_ext" -q -p no:cacheprovider "${XDIST[@]}" \
             -rfE --junitxml="$RESULTS/pytest.xml" ;;
    sanitizer-memcheck|sanitizer-racecheck)
      step "$s" "${s/-/_}.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool "${s#sanitizer-}" --error-exitcode 1 $PY scripts/sanitizer_driver.py ;;
    kernel-report) step kernel-report kernel_report.log $PY -m sae_fast.kernel_report --csrc --json "$RESULTS/kernel_report.json" ;;
    regression) step regression regression.log $PY -m pytest tests/test_benchmark_regression.py -q -p no:cacheprovider \
                  --benchmark-json="$RESULTS/regression.json" ;;
    bench-decode) step bench-decode bench_decode.log $PY benchmarks/bench_sparse_decode.py $BENCH_ARGS --out "$RESULTS/sparse_decode.jsonl" ;;
    bench-topk) step bench-topk bench_topk.log $PY benchmarks/bench_topk_encode.py $BENCH_ARGS --out "$RESULTS/topk_encode.jsonl" ;;
    bench-jumprelu) step bench-jumprelu bench_jumprelu.log $PY benchmarks/bench_jumprelu.py $BENCH_ARGS --out "$RESULTS/jumprelu_training.jsonl" ;;
    bench-attention)  # quick: 8K and 32K at 10% (the backward plan's cost shows at 32K)
      ATT_ARGS=$BENCH_ARGS; [ "$BENCH_ARGS" = --quick ] && ATT_ARGS="--T 8192,32768 --density 0.1"
      step bench-attention bench_attention.log $PY benchmarks/bench_block_sparse_attention.py $ATT_ARGS \
        --out "$RESULTS/block_sparse_attention.jsonl" ;;
    tune-attention)  # the attention launch defaults were read off the kernel report, never timed
      step tune-attention tune_attention.log $PY benchmarks/tune_block_sparse_attention.py --budget-s 120 \
        --out "$RESULTS/tune_block_sparse_attention.txt" ;;
    bench-prefill) step bench-prefill bench_prefill.log $PY benchmarks/bench_sparse_prefill.py $BENCH_ARGS \
                     --out "$RESULTS/sparse_prefill.jsonl" ;;
    profile-prefill) step profile-prefill profile_prefill.log $PY benchmarks/profile_sparse_prefill.py ;;
    # Needs sae-lens / eai-sparsify / dictionary-learning: on an offline box, carry the wheels of
    # scripts/fetch_integration_wheels.sh in .whl and install them to PYTHONPATH first.
    bench-integrations) step bench-integrations bench_integrations.log $PY benchmarks/bench_integrations.py $BENCH_ARGS \
                          --out "$RESULTS/integrations.jsonl" ;;
    tune-topk)  # k=64 (TopK) and k=128 (BatchTopK's candidate lists, an untimed launch so far)
      step tune-topk tune_topk.log $PY benchmarks/tune_topk_encode.py --budget-s 150
      step tune-topk-128 tune_topk_128.log $PY benchmarks/tune_topk_encode.py --shape 16384,2304,131072,128 --budget-s 150 ;;
    tune-threshold) step tune-threshold tune_threshold.log $PY benchmarks/tune_threshold_encode.py --budget-s 150 ;;
    *) echo "gpu_check: unknown step $s (known: $ALL_STEPS)"; failures+=("$s") ;;
  esac
done
if [ ${#failures[@]} -gt 0 ]; then echo "gpu_check: FAILED: ${failures[*]}"; exit 1; fi
echo "gpu_check: all steps passed; results in $RESULTS"
