#!/usr/bin/env bash
# Multi-adapter LoRA training on CPU as a 2-stage 1F1B pipeline over 2 gloo ranks (torchrun).
#   launch/train_lora.sh [OUT_DIR] [extra args for adasched.launch.train_lora, e.g. --jobs my_jobs.yaml --reference]
# NPROC (default 2) sets the number of pipeline stages; the plan is made with the jobs file's `stages`, which
# must be >= NPROC (the tiny preset uses 2).
# Checkpoints: add --checkpoint-dir DIR [--checkpoint-every N] [--checkpoint-keep K] [--load-step STEP]; a step is
# (--checkpoint-async: saves written in the background, same files)
# one microbatch of the plan (the pipeline drains at every save point). Launching the same command again resumes
# from the newest save in DIR (same settings, else one `error:` line from the pre-check below; another NPROC
# reshards the save's stages) and writes the same adapters as an uninterrupted run.
set -euo pipefail
# OUT_DIR is optional: a first argument that starts with "-" is an option (`train_lora.sh --jobs my.yaml` made
# "--jobs" the output folder and failed with "argument --out: expected one argument")
OUT="runs/lora"
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    OUT="$1"
    shift
fi
NPROC="${NPROC:-2}"
. "$(dirname "${BASH_SOURCE[0]}")/check_nproc.sh"
# PYTHON selects the interpreter (default: python3 on PATH; use the project's .venv/bin/python).
PY="${PYTHON:-python3}"
for a in "$@"; do  # help once, without starting torchrun (its pre-check printed it to /dev/null or once,
  case "$a" in     # then every rank printed it again)
    -h|--help) exec "$PY" -m adasched.launch.train_lora --help;;
  esac
done
for a in "$@"; do  # (a --world of the user's was checked instead of NPROC, then refused by every worker: exit 1;
  case "$a" in     # --check made every rank check and exit 0 without training)
    --world|--world=*|--check)
      echo "error: $a: set by this script (the world is NPROC=$NPROC); to check a plan against another world run" \
           "$PY -m adasched.launch.train_lora --check --world N ..." >&2
      exit 2;;
  esac
done
# bad options, jobs or plans fail here, once, as one `error:` line with exit status 2 (not once per rank)
"${PRECHECK_ENV[@]}" "$PY" -m adasched.launch.train_lora --check --world "$NPROC" --out "$OUT" "$@" >/dev/null || exit $?
exec_torchrun --standalone --nproc_per_node "$NPROC" -m adasched.launch.train_lora --out "$OUT" "$@"
