# Sourced by the launch scripts (through check_nproc.sh, or directly): PRECHECK_ENV runs their single-process
# pre-checks without torchrun's variables. A RANK (or WORLD_SIZE, LOCAL_WORLD_SIZE) left in the caller's shell made
# a pre-check a non-zero rank that prints no error line (exit 2, nothing said), or refused a good run
# ('RANK=1 WORLD_SIZE=1: rank must lie in [0, world size)'); torchrun sets its own for the ranks.
PRECHECK_ENV=(env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u LOCAL_WORLD_SIZE -u GROUP_RANK -u ROLE_RANK -u GROUP_WORLD_SIZE
              -u ROLE_WORLD_SIZE -u MASTER_ADDR -u MASTER_PORT -u TORCHELASTIC_RUN_ID)

# exec torchrun "$@" (as `python -m torch.distributed.run`, with $PY) with a log folder of its own, removed when it
# ends: without --log-dir torchrun made an empty /tmp/torchelastic_* folder per launch and never removed it. exec
# keeps the script's pid and signals as before (a Ctrl-C or a TERM to it reaches torchrun, which stops the ranks); a
# watcher in a session of its own (a kill of the launch's process group, as launch/proc.py's or a batch system's
# clean-up, does not reach it), deaf to INT/TERM/HUP, removes the folder once that pid is gone. A TMPDIR that is not
# a folder falls back to /tmp, as Python's tempfile does; where no folder can be made torchrun keeps its default.
exec_torchrun() {
  local logs
  logs="$(mktemp -d "${TMPDIR:-/tmp}/adasched-torchrun.XXXXXX" 2>/dev/null \
          || mktemp -d /tmp/adasched-torchrun.XXXXXX 2>/dev/null)" || logs=""
  if [ -z "$logs" ]; then
    exec "$PY" -m torch.distributed.run "$@"
  fi
  # (it says it is running - in its own session - by a file in the folder, awaited up to 2 s: a torchrun that ended
  # at once left the folder when the group kill came before the watcher had left the group)
  local watch='trap "" INT TERM HUP; : > "$2/.watched"; while kill -0 "$1" 2>/dev/null; do sleep 1; done; rm -rf "$2"'
  if command -v setsid >/dev/null 2>&1; then
    setsid sh -c "$watch" adasched-torchrun-watch "$$" "$logs" </dev/null >/dev/null 2>&1 &
  else
    sh -c "$watch" adasched-torchrun-watch "$$" "$logs" </dev/null >/dev/null 2>&1 &
  fi
  local waited=0
  while [ ! -e "$logs/.watched" ] && [ "$waited" -lt 200 ]; do sleep 0.01; waited=$((waited + 1)); done
  exec "$PY" -m torch.distributed.run --log-dir "$logs" "$@"
}
