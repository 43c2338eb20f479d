#!/usr/bin/env bash
# Profile the collectives of this node under torchrun (gloo on CPU, nccl on GPUs) and write a ClusterProfile.
#   NPROC=4 OUT=profile.json launch/profile_collectives.sh [--quick] [--no-microbench]
# Multi-node: run the same torchrun line on every node with --nnodes/--node_rank/--rdzv_endpoint instead of
# --standalone.
set -euo pipefail
OUT="${OUT:-profile.json}"
PY="${PYTHON:-python3}"
# bad options fail here, once, as one `error:` line with exit status 2 (not after the measuring, once per rank)
for a in "$@"; do  # help once, without starting torchrun (its pre-check printed it to /dev/null or once,
  case "$a" in     # then every rank printed it again)
    -h|--help) exec "$PY" -m adasched.launch.profile_collectives --help;;
  esac
done
. "$(dirname "${BASH_SOURCE[0]}")/precheck_env.sh"
"${PRECHECK_ENV[@]}" "$PY" -m adasched.launch.profile_collectives --check --out "$OUT" "$@" || exit $?
exec_torchrun --standalone --nproc_per_node="${NPROC:-4}" -m adasched.launch.profile_collectives --out "$OUT" "$@"
