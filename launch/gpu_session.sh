#!/usr/bin/env bash
# The owed GPU measurements in one call (for a lent device machine; see README "what is measured where"):
#   1. launch/lora_kernel_sweep.py --only gemm,dy,down,term: our forward and dX LoRA GEMMs at four tiles, pointer tiles vs TMA
#      descriptors (base_gemm="triton_tma"), the dX epilogue full width vs per column half, each over cuBLAS on
#      the same tensors, the dY kernel's launch (N block, programs per SM, dB copies) and the dropout kernel's
#      and the masked dX term's (both now issue a block's loads before its stores) (~3-4 min);
#   2. launch/device_check.py --only lora,gemm: bf16 checks, the LoRA grid (triton / triton_tma / torch /
#      torch_all / torch_grouped providers, graphed case, host profile) and the Twill plan-vs-sweep with
#      head-to-head confirmation, within --budget-s.
# Usage: bash launch/gpu_session.sh [budget seconds for step 2, default 200]. Writes under $OUT when set.
# With wheels from launch/fetch_gpu_wheels.sh carried (carry [".whl"]) they are installed to /tmp/site first.
# Wall time at most 300 + budget + 90 s: the default fits the device tool's 600 s per call.
# Runs from a bare checkout (no install needed: device_check.py sets up the package namespace).
set -u
cd "$(dirname "$0")"
BUDGET="${1:-200}"
PY="${PYTHON:-python3}"
echo "== gpu_session: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s for device_check =="
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
# carried wheels (launch/fetch_gpu_wheels.sh; run with carry [".whl"]): ortools + pydantic, so the Twill check
# solves its plans here instead of using the precomputed knobs
if ls ../.whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import ortools, pydantic; print('planner deps: ortools', ortools.__version__, 'pydantic', pydantic.VERSION)" \
      || echo "carried wheels do not import: the Twill check uses its precomputed knobs"
  else
    echo "wheel install failed: the Twill check uses its precomputed knobs"
  fi
fi
rc=0
timeout 300 "$PY" lora_kernel_sweep.py --only gemm,dy,down,term || { echo "lora_kernel_sweep exit $?"; rc=1; }
timeout $((BUDGET + 90)) "$PY" device_check.py --only lora,gemm --budget-s "$BUDGET" || { echo "device_check exit $?"; rc=1; }
exit $rc
