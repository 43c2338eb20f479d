# Sourced by the launch scripts (through check_nproc.sh, or directly): PRECHECK_ENV runs their single-process
# pre-checks without torchrun's variables. A RANK (or WORLD_SIZE, LOCAL_WORLD_SIZE) left in the caller's shell made
# a pre-check a non-zero rank that prints no error line (exit 2, nothing said), or refused a good run
# ('RANK=1 WORLD_SIZE=1: rank must lie in [0, world size)'); torchrun sets its own for the ranks.
PRECHECK_ENV=(env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u LOCAL_WORLD_SIZE -u GROUP_RANK -u ROLE_RANK -u GROUP_WORLD_SIZE
              -u ROLE_WORLD_SIZE -u MASTER_ADDR -u MASTER_PORT -u TORCHELASTIC_RUN_ID)

# exec torchrun "$@" (as `python -m torch.distributed.run`, with $PY) with a log folder of its own, removed when it
# ends: without --log-dir torchrun made an empty /tmp/torchelastic_* folder per launch and never removed it. exec
# keeps the script's pid and signals as before (a Ctrl-C or a TERM to it reaches torchrun, which stops the ranks); a
# detached watcher, deaf to both, removes the folder once that pid is gone.
exec_torchrun() {
  local logs
  logs="$(mktemp -d "${TMPDIR:-/tmp}/adasched-torchrun.XXXXXX")"
  ( trap '' INT TERM HUP
    while kill -0 "$$" 2>/dev/null; do sleep 1; done
    rm -rf "$logs" ) </dev/null >/dev/null 2>&1 &
  exec "$PY" -m torch.distributed.run --log-dir "$logs" "$@"
}
