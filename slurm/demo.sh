#!/bin/bash
# The tiny demo (configs/demo.yaml: random tiny PILL, synthetic shards, stage 1 then stage 2, then the held-out
# evaluation) as a Slurm job on CPUs: what to run first on a new cluster, or on slurm/local_cluster.sh.
#   sbatch slurm/demo.sh                                         # 2 CPU tasks (gloo), ~4 min on 2 cores
#   PILL_SET="stages.*.max_steps=20 eval.enabled=false" sbatch slurm/demo.sh    # a 1-minute smoke run
#   sbatch -p cpu -A myacct slurm/demo.sh                        # any #SBATCH line can be overridden
# Env: as slurm/stage1.sh (PILL_CONFIG, PILL_DS_CONFIG, PILL_RUN_DIR, PILL_SET, ...); PILL_CPU defaults to 1 here.
#SBATCH --job-name=pill-demo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@60
#SBATCH --requeue

# This file runs from a copy in slurmd's spool dir: find the repo from the submitted path, the submit dir
# or PILL_REPO.
_submitted=$(scontrol show job -o "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | cut -d= -f2-)
for _d in "${PILL_REPO:-}" "${_submitted:+$(dirname "$_submitted")/..}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "$0")/.."; do
  if [[ -n $_d && -f $_d/slurm/common.sh ]]; then PILL_REPO=$(cd "$_d" && pwd); export PILL_REPO; break; fi
done
# shellcheck source=slurm/common.sh
source "${PILL_REPO:-/nonexistent}/slurm/common.sh" 2>/dev/null \
  || { echo "cannot find slurm/common.sh: submit from the PILL repo root or set PILL_REPO" >&2; exit 2; }

export PILL_CPU=${PILL_CPU:-1}
pill_run_stage "1 2" configs/demo.yaml
