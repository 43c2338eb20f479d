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

. "$(dirname "${BASH_SOURCE[0]}")/precheck_env.sh"
