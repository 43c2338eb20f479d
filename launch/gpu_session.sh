#!/usr/bin/env bash
# The owed GPU measurements in one call (for a lent device machine; see README "what is measured where"):
#   1. launch/device_check.py --only lora,gemm,moe: bf16 checks (plus fp32 in IEEE, not TF32, and a 2**31-element
#      input through our GEMM and LoRA kernels - int64 offsets - in a child process, ~30 s; the TMA modes last),
#      the LoRA target shapes (at most half the time left), the Twill plan-vs-sweep with head-to-head
#      confirmation, the profiler breakdown, then the rest of the LoRA grid (triton / triton_tma / torch /
#      torch_all / torch_grouped providers, graphed case, host profile) as time allows, and the MoE layer's
#      checks and two shapes (~60 s; the H200 run of 2026-11-30 did lora,gemm in 363 s of its 540);
#   2. launch/lora_kernel_sweep.py with what is left, in two processes: our forward and dX LoRA GEMMs at four tiles
#      (pointer tiles first; TMA descriptors and the persistent grid last), each over cuBLAS timed next to it on the
#      same tensors (60%); then the dY kernel's, the masked dX term's and the dropout kernel's launches.
# Usage: bash launch/gpu_session.sh [TOTAL seconds for the whole script, default 480]. Give the device tool's
# timeout_s a minute more than TOTAL, and TOTAL no more than the device time left after the machine's start
# (status: budget_left_s): every step's limit is taken from what is left of TOTAL ($SECONDS), so a short lease
# still ends with device_check's table. Writes under $OUT when set: gpu_session.log (everything printed),
# device_check.json/.txt, lora_kernel_sweep-gemm.json/.txt, lora_kernel_sweep-kernels.json/.txt.
# With wheels from launch/fetch_gpu_wheels.sh carried (carry [".whl"]) they are installed to /tmp/site first.
# Runs from a bare checkout (no install needed: device_check.py sets up the package namespace).
set -u
TOTAL="${1:-480}"
PY="${PYTHON:-python3}"
# a relative interpreter path (PYTHON=.venv/bin/python) is resolved before the cd below, else it names nothing
case "$PY" in /*) ;; */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
cd "$(dirname "$0")"
if [ -n "${OUT:-}" ]; then  # a reply's output tail keeps only the last 12,000 characters: keep all of it
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu_session.log") 2>&1
  TEE_PID=$!
fi
left() { echo $((TOTAL - SECONDS)); }
echo "== gpu_session: $(date -u +%Y-%m-%dT%H:%M:%SZ), ${TOTAL}s in all =="
env | grep -E '^(TRITON|CUDA|NVIDIA)_' | sort
command -v ptxas >/dev/null && ptxas --version | tail -1
# carried wheels (launch/fetch_gpu_wheels.sh; run with carry [".whl"]): ortools + pydantic, so the Twill check
# solves its plans here instead of using the precomputed knobs
if ls ../.whl/*.whl >/dev/null 2>&1; then
  if timeout 40 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl \
     && PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" timeout 20 "$PY" -c \
       "import ortools, pydantic; from ortools.sat.python import cp_model; cp_model.CpModel(); print('planner deps: ortools', ortools.__version__, 'pydantic', pydantic.VERSION)"; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"  # only once they import: else they would shadow the image's
  else
    echo "carried wheels did not install or import: the Twill check uses its precomputed knobs"
  fi
fi
rc=0
# device_check first (the issues' targets): its budget leaves ~120 s for the sweep and 60 s for its own wrap-up
DC=$(( $(left) - 180 ))
if [ "$DC" -lt 60 ]; then DC=$(( $(left) - 40 )); fi
if [ "$DC" -ge 30 ]; then
  timeout $((DC + 60)) "$PY" device_check.py --only lora,gemm,moe --budget-s "$DC" || { echo "device_check exit $?"; rc=1; }
else
  echo "gpu_session: only $(left) s left: device_check not started"; rc=1
fi
# the sweep's GEMM part (TMA descriptors and the persistent grid: the owed timings) first, in a process of its own
# with 60% of what is left (a CUDA fault there cannot spoil the rest), then the dY / term / dropout kernels; run in
# one process with the GEMMs last, the budget ran out before the TMA rows
SW=$(( $(left) - 15 ))
if [ "$SW" -ge 45 ]; then
  G=$(( SW * 6 / 10 ))
  timeout "$G" "$PY" lora_kernel_sweep.py --only gemm --tag gemm --budget-s $((G - 20)) \
    || { echo "lora_kernel_sweep (gemm) exit $?"; rc=1; }
  K=$(( $(left) - 15 ))
  if [ "$K" -ge 30 ]; then
    timeout "$K" "$PY" lora_kernel_sweep.py --only dy,term,down --tag kernels --budget-s $((K - 20)) \
      || { echo "lora_kernel_sweep (kernels) exit $?"; rc=1; }
  else
    echo "gpu_session: $(left) s left: lora_kernel_sweep (dy, term, down) not started (PARTIAL)"; rc=1
  fi
else
  echo "gpu_session: $(left) s left: lora_kernel_sweep not started (PARTIAL)"; rc=1
fi
echo "== gpu_session done after ${SECONDS}s (exit $rc) =="
if [ -n "${TEE_PID:-}" ]; then  # let tee write the last lines before the script ends
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null
fi
exit $rc
