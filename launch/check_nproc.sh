# Sourced by the train_*.sh launch scripts after they set NPROC: refuse anything but a whole number in 1..1024
# with one line naming NPROC (abc, 0 or 99999 got errors naming WORLD_SIZE's int(), --ep-size or --vocab; a
# 20-digit value made bash's -lt fail inside the if, which set -e let through).
case "$NPROC" in
  ''|*[!0-9]*) echo "error: NPROC: '$NPROC' is not a whole number" >&2; exit 2;;
  ?????*) echo "error: NPROC: $NPROC local ranks: must be in 1..1024" >&2; exit 2;;
esac
if [ "$NPROC" -lt 1 ] || [ "$NPROC" -gt 1024 ]; then
  echo "error: NPROC: $NPROC local ranks: must be in 1..1024" >&2; exit 2
fi

# The single-process pre-checks below run without torchrun's variables: a RANK (or WORLD_SIZE, LOCAL_WORLD_SIZE)
# left in the caller's shell made them a non-zero rank that prints no error line (exit 2, nothing said), or
# refused a good run ('RANK=1 WORLD_SIZE=1: rank must lie in [0, world size)'); torchrun sets its own for the ranks.
PRECHECK_ENV=(env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u LOCAL_WORLD_SIZE -u GROUP_RANK -u ROLE_RANK -u GROUP_WORLD_SIZE
              -u ROLE_WORLD_SIZE -u MASTER_ADDR -u MASTER_PORT -u TORCHELASTIC_RUN_ID)
