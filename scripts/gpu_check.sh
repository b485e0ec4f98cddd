#!/usr/bin/env bash
# One-command GPU verification, for a lent GPU machine (no network; torch, triton, nvcc,
# pytest and compute-sanitizer preinstalled). Builds the extension in place, runs the gpu and
# cuda_ext test tiers, compute-sanitizer (memcheck, racecheck) over every CUDA kernel path,
# and the quick benchmarks. Everything lands in one folder (default gpu_results/<time>).
#   usage: bash scripts/gpu_check.sh [RESULTS_DIR] [--full-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-gpu_results/$(date +%Y%m%d-%H%M%S)}
BENCH_ARGS=--quick
[ "${2:-}" = "--full-bench" ] && BENCH_ARGS=
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
failures=()
step() {  # step NAME LOGFILE CMD...: run, log, remember failures, never stop early
  local name=$1 log=$2; shift 2
  echo "== $name"
  local t0=$SECONDS
  if "$@" >"$RESULTS/$log" 2>&1; then echo "   ok ($((SECONDS - t0)) s)"; else echo "   FAILED ($((SECONDS - t0)) s), see $RESULTS/$log"; tail -n 25 "$RESULTS/$log"; failures+=("$name"); fi
}

{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; nvcc --version; git rev-parse HEAD 2>/dev/null || echo "git sha: ${SAE_FAST_GIT_SHA:-unknown (no .git; pass SAE_FAST_GIT_SHA)}"; } >"$RESULTS/env.txt" 2>&1
step build build.log env SAE_FAST_BUILD_CUDA=1 MAX_JOBS=$(nproc) SAE_FAST_PTXAS_VERBOSE=1 \
  $PY -m pip install --no-build-isolation --no-deps --no-index -v -e .
step tests pytest.log $PY -m pytest tests -m "gpu or cuda_ext" -q -p no:cacheprovider --junitxml="$RESULTS/pytest.xml"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in memcheck racecheck; do
  step "sanitizer-$tool" "sanitizer_$tool.log" compute-sanitizer --tool $tool --error-exitcode 1 $PY scripts/sanitizer_driver.py
done
unset PYTORCH_NO_CUDA_MEMORY_CACHING
step kernel-report kernel_report.log $PY -m sae_fast.kernel_report --csrc --json "$RESULTS/kernel_report.json"
step regression regression.log $PY -m pytest tests/test_benchmark_regression.py -q -p no:cacheprovider \
  --benchmark-json="$RESULTS/regression.json"
step bench bench.log $PY benchmarks/bench_sparse_decode.py $BENCH_ARGS --out "$RESULTS/sparse_decode.jsonl"
step bench-topk bench_topk.log $PY benchmarks/bench_topk_encode.py $BENCH_ARGS --out "$RESULTS/topk_encode.jsonl"
step bench-jumprelu bench_jumprelu.log $PY benchmarks/bench_jumprelu.py $BENCH_ARGS --out "$RESULTS/jumprelu_training.jsonl"
step bench-attention bench_attention.log $PY benchmarks/bench_block_sparse_attention.py $BENCH_ARGS --out "$RESULTS/block_sparse_attention.jsonl"
# bench_integrations.py needs sae-lens / eai-sparsify / dictionary-learning: carry their wheels to an offline box
step tune-topk tune_topk.log $PY benchmarks/tune_topk_encode.py --quick --budget-s 240
tail -n 40 "$RESULTS/bench.log"
if [ ${#failures[@]} -gt 0 ]; then echo "gpu_check: FAILED: ${failures[*]}"; exit 1; fi
echo "gpu_check: all steps passed; results in $RESULTS"
