#!/usr/bin/env bash
# Train the tiny GPT executing a FlexSP plan on NPROC local ranks (gloo on CPU, nccl on GPUs).
#   NPROC=4 launch/train_sp.sh --plan plan.json [--steps N] [--check-reference] [--seed S] [--max-len L]
# The plan is validated against NPROC first (one `error:` line, exit 2, no worker started when it does not fit).
# PYTHON selects the interpreter (default: python3 on PATH; use the project's .venv/bin/python).
# Checkpoints: add --checkpoint-dir DIR [--checkpoint-every N] [--checkpoint-keep K] [--load-step STEP]; running the
# (--checkpoint-async: saves written in the background, same files)
# same command again resumes from the newest save in DIR (bit for bit the uninterrupted run; another NPROC with a
# plan of the same batches reshards it). A save of another run is refused by the check below (one `error:` line,
# exit 2) before torchrun starts. The lr schedule:
# [--lr-schedule linear|cosine|rex|uba] [--warmup-steps W] (default constant).
set -euo pipefail
PY="${PYTHON:-python3}"
NPROC="${NPROC:-4}"
. "$(dirname "${BASH_SOURCE[0]}")/check_nproc.sh"
for a in "$@"; do  # help once, without starting torchrun (its pre-check printed it to /dev/null or once,
  case "$a" in     # then every rank printed it again)
    -h|--help) exec "$PY" -m adasched.launch.train_sp --help;;
  esac
done
for a in "$@"; do  # (a --world of the user's was checked instead of NPROC, then refused by every worker: exit 1)
  case "$a" in
    --world|--world=*|--check-plan-only)
      echo "error: $a: set by this script (the world is NPROC=$NPROC); to check a plan against another world run" \
           "$PY -m adasched.launch.train_sp --check-plan-only --world N ..." >&2
      exit 2;;
  esac
done
"${PRECHECK_ENV[@]}" "$PY" -m adasched.launch.train_sp --check-plan-only --world "$NPROC" "$@" >/dev/null
exec_torchrun --standalone --nproc_per_node="$NPROC" -m adasched.launch.train_sp "$@"
