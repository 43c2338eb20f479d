#!/usr/bin/env bash
# The owed GPU measurements in one call (for a lent device machine; see README "what is measured where"):
#   1. launch/lora_kernel_sweep.py --only gemm,dy,down,term: our forward and dX LoRA GEMMs at four tiles, pointer tiles vs TMA
#      descriptors (base_gemm="triton_tma"), the dX epilogue full width vs per column half, each over cuBLAS on
#      the same tensors, the dY kernel's launch (N block, programs per SM, dB copies) and the dropout kernel's
#      and the masked dX term's (both now issue a block's loads before its stores) (~3-4 min);
#   2. launch/device_check.py --only lora,gemm: bf16 checks (plus fp32 in IEEE, not TF32, and a 2**31-element
#      input through our GEMM and LoRA kernels - int64 offsets - in a child process, ~30 s), the LoRA grid (triton / triton_tma / torch /
#      torch_all / torch_grouped providers, graphed case, host profile) and the Twill plan-vs-sweep with
#      head-to-head confirmation, within --budget-s.
# Usage: bash launch/gpu_session.sh [budget seconds for step 2, default 170]. Writes under $OUT when set.
# With wheels from launch/fetch_gpu_wheels.sh carried (carry [".whl"]) they are installed to /tmp/site first.
# Wall time at most 60 (wheels) + 270 + budget + 90 s: 590 s with the default, inside the device tool's 600 s per
# call (both scripts print the torch/triton versions and the card).
# Runs from a bare checkout (no install needed: device_check.py sets up the package namespace).
set -u
BUDGET="${1:-170}"
PY="${PYTHON:-python3}"
# a relative interpreter path (PYTHON=.venv/bin/python) is resolved before the cd below, else it names nothing
case "$PY" in /*) ;; */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
cd "$(dirname "$0")"
echo "== gpu_session: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s for device_check =="
# carried wheels (launch/fetch_gpu_wheels.sh; run with carry [".whl"]): ortools + pydantic, so the Twill check
# solves its plans here instead of using the precomputed knobs
if ls ../.whl/*.whl >/dev/null 2>&1; then
  if timeout 40 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl \
     && PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" timeout 20 "$PY" -c \
       "import ortools, pydantic; print('planner deps: ortools', ortools.__version__, 'pydantic', pydantic.VERSION)"; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"  # only once they import: else they would shadow the image's
  else
    echo "carried wheels did not install or import: the Twill check uses its precomputed knobs"
  fi
fi
rc=0
timeout 270 "$PY" lora_kernel_sweep.py --only gemm,dy,down,term || { echo "lora_kernel_sweep exit $?"; rc=1; }
timeout $((BUDGET + 90)) "$PY" device_check.py --only lora,gemm --budget-s "$BUDGET" || { echo "device_check exit $?"; rc=1; }
exit $rc
