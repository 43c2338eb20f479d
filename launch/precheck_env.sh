# Sourced by the launch scripts (through check_nproc.sh, or directly): PRECHECK_ENV runs their single-process
# pre-checks without torchrun's variables. A RANK (or WORLD_SIZE, LOCAL_WORLD_SIZE) left in the caller's shell made
# a pre-check a non-zero rank that prints no error line (exit 2, nothing said), or refused a good run
# ('RANK=1 WORLD_SIZE=1: rank must lie in [0, world size)'); torchrun sets its own for the ranks.
PRECHECK_ENV=(env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u LOCAL_WORLD_SIZE -u GROUP_RANK -u ROLE_RANK -u GROUP_WORLD_SIZE
              -u ROLE_WORLD_SIZE -u MASTER_ADDR -u MASTER_PORT -u TORCHELASTIC_RUN_ID)
