#!/usr/bin/env bash
# One training task, started by srun (slurm/common.sh): the env contract of pipeline/train.py from
# Slurm's per-task variables, then exec, so that signals from srun reach python directly.
#   slurm/task.sh PYTHON SCRIPT ARGS...
set -euo pipefail
export RANK=${SLURM_PROCID:?not under srun}
export WORLD_SIZE=${SLURM_NTASKS:?not under srun}
export LOCAL_RANK=${SLURM_LOCALID:?not under srun}
# Tasks per node: SLURM_TASKS_PER_NODE reads "8(x4)" or "2"; stage1/2.sh ask for the same count on every node,
# so the first number is this node's.
tpn=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
export LOCAL_WORLD_SIZE=${tpn%%[(,]*}
export NODE_RANK=${SLURM_NODEID:-0}
exec "$@"
