#!/usr/bin/env bash
# One call on a lent, offline GPU box, within a fixed wall-clock budget: install the carried
# wheels (.whl: expecttest for opcheck, the peer libraries from fetch_integration_wheels.sh),
# run scripts/gpu_check.sh in the background, and at the deadline (or when it ends) pack its
# folder into one archive under $OUT, since a lease returns at most 8 files and a command
# stopped at its limit returns only what is already under $OUT.
#   usage (the device tool's command, with carry [".whl"]):
#     SAE_FAST_GIT_SHA=<sha> bash scripts/gpu_lease_run.sh 420
#     SAE_FAST_GIT_SHA=<sha> GPU_CHECK_STEPS="build tests bench-topk" bash scripts/gpu_lease_run.sh 300
#   Give the call a timeout_s ~30 s above the budget. Prints gpu_check's summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:?usage: gpu_lease_run.sh SECONDS}
OUT_DIR=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_lease_run: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTEST_WORKERS=${PYTEST_WORKERS:-12} GPU_CHECK_TIMEOUT=${GPU_CHECK_TIMEOUT:-240}
RES=/tmp/gpu_results
bash scripts/gpu_check.sh "$RES" >/tmp/gpu_check.log 2>&1 &
pid=$!
end=$((SECONDS + BUDGET))
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
if kill -0 "$pid" 2>/dev/null; then
  echo "gpu_lease_run: budget of $BUDGET s spent; stopping gpu_check" >>/tmp/gpu_check.log
  pkill -P "$pid"; kill "$pid" 2>/dev/null; sleep 1
fi
cp /tmp/gpu_check.log "$RES/" 2>/dev/null
tar czf "$OUT_DIR/gpu_results.tgz" -C /tmp gpu_results
cat /tmp/gpu_check.log
