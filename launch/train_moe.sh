#!/usr/bin/env bash
# Train the tiny MoE LM, expert-parallel over NPROC local ranks (gloo on CPU; --ep-size K: EP groups of K ranks,
# each expert on NPROC/K ranks with its gradients averaged over them), printing the loss per step.
#   NPROC=4 launch/train_moe.sh --router all --schedule all --steps 10 [--plan plan.json] [--hierarchical]
# A --plan must be made for this world, EP size and exchange: adasched plan moe --gpus NPROC [--ep-size K] ...
# (with --hierarchical: ... --two-step-a2a --gpus-per-node G, G = min(--gpus-per-node, EP size)).
# --expert-shards S: FSMoE's expert-sharded layout (nodes of S ranks share each expert's FFN width; the layout
# adasched plan moe picks without --ep-size for fewer experts than GPUs: run its plan with S = its node size).
# Arguments are validated once before any worker starts (one `error:` line, exit 2).
# PYTHON selects the interpreter (default: python3 on PATH; use the project's .venv/bin/python).
# Checkpoints: --checkpoint-dir D [--checkpoint-every N] [--checkpoint-keep K] [--load-step S] with one --router
# (--checkpoint-async: saves written in the background, same files)
# and one --schedule; launching again with the same D and settings resumes from the newest save (another NPROC, EP
# size, expert shards or plan reshards it; a save of another run is refused by the --validate-only pass, before
# torchrun starts). --lr-schedule
# {constant,linear,cosine,rex,uba} --warmup-steps W: the LR over --steps (part of the saved state).
set -euo pipefail
PY="${PYTHON:-python3}"
NPROC="${NPROC:-4}"
. "$(dirname "${BASH_SOURCE[0]}")/check_nproc.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
for a in "$@"; do  # help once, without starting torchrun (its pre-check printed it to /dev/null or once,
  case "$a" in     # then every rank printed it again)
    -h|--help) exec "$PY" -m adasched.launch.train_moe --help;;
  esac
done
for a in "$@"; do  # (--validate-only made every rank validate and exit 0 without training)
  case "$a" in
    --validate-only)
      echo "error: $a: set by this script (it validates once before torchrun); to validate only run" \
           "WORLD_SIZE=N $PY -m adasched.launch.train_moe --validate-only ..." >&2
      exit 2;;
  esac
done
"${PRECHECK_ENV[@]}" WORLD_SIZE="$NPROC" "$PY" -m adasched.launch.train_moe --validate-only "$@"
exec_torchrun --standalone --nproc_per_node="$NPROC" -m adasched.launch.train_moe "$@"
