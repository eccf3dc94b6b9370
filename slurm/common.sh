# shellcheck shell=bash
# Shared logic of slurm/stage1.sh and slurm/stage2.sh; sourced by them, never run on its own.
#
# pill_run_stage STAGES DEFAULT_CONFIG   (STAGES: "1", "2" or "1 2"; PILL_REPO set by the calling script)
#   1. finds the python, the configs and the run dir (env overrides, see docs/slurm.md);
#   2. exports the rendezvous contract of pipeline/train.py: MASTER_ADDR = first host of the
#      allocation, MASTER_PORT = 10000 + job id % 20000 (same on every node and after a requeue; below the
#      Linux ephemeral range 32768-60999, where an outgoing connection could already hold it);
#      slurm/task.sh derives RANK / WORLD_SIZE / LOCAL_RANK per task from SLURM_PROCID / SLURM_NTASKS /
#      SLURM_LOCALID;
#   3. starts one task per GPU (or per CPU slot with PILL_CPU=1) with srun, in the background, so
#      that this shell can take signals while training runs; srun gets --cpus-per-task explicitly (since
#      Slurm 22.05 it no longer inherits sbatch's) and --kill-on-bad-exit=1, so one dead rank ends the step
#      at once instead of leaving the others blocked in a collective until the NCCL timeout;
#   4. on SIGUSR1 (sbatch --signal=B:USR1@N before the time limit, or `scancel --signal=USR1 --batch`)
#      or SIGTERM (scancel, preemption, the time limit itself), forwards SIGUSR1 to every task through
#      srun; train.py then finishes its step, saves a checkpoint on all ranks and exits 99;
#   5. when training exits 99 after SIGUSR1 (or after a signal sent to the tasks only, e.g.
#      --signal=USR1@N without B:), it requeues the job (`scontrol requeue`); the requeued job runs this
#      script again with the same job id, hence the same run dir, and train.py resumes from
#      <run dir>/checkpoints/latest by itself (--resume auto is its default). After SIGTERM it does not
#      requeue unless PILL_REQUEUE_ON_TERM=1 (a plain scancel must stay cancelled).

pill_log() { echo "[pill-slurm $(date -u +%H:%M:%S)] $*"; }

# First host of the allocation: the rank-0 node, where torch.distributed's TCP store listens.
pill_master_addr() {
  local first
  first=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n1)
  echo "${first:-$(hostname -s)}"
}

# 10000-29999: below the ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default).
pill_master_port() { echo $((10000 + ${SLURM_JOB_ID:-0} % 20000)); }

# The `stage:` of every entry of the config's `stages:` list, space-separated ("?" when it cannot be read).
pill_config_stages() {
  local python=$1 config=$2
  "$python" - "$config" 2>/dev/null <<'PY' || echo "?"
import sys, yaml
stages = (yaml.safe_load(open(sys.argv[1])) or {}).get("stages") or []
print(" ".join(str(s.get("stage", "?")) for s in stages) or "?")
PY
}

_pill_on_signal() {
  local sig=$1
  pill_log "got SIG$sig: asking the training tasks to checkpoint and stop (SIGUSR1 -> exit 99)"
  PILL_SIGNALED=$sig
  if [[ -n ${PILL_SRUN_PID:-} ]] && kill -0 "$PILL_SRUN_PID" 2>/dev/null; then
    # srun forwards SIGUSR1 to every task of the step, on every node.
    kill -USR1 "$PILL_SRUN_PID" 2>/dev/null || true
  fi
}

pill_run_stage() {
  local stage=$1 default_config=$2
  local repo python config ds_config run_dir stages rc=0 restarts=${SLURM_RESTART_COUNT:-0}
  repo=${PILL_REPO:?stage script sets PILL_REPO before sourcing common.sh}
  cd "$repo" || return 1

  python=${PILL_PYTHON:-}
  if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then python=$repo/.venv/bin/python; else python=python3; fi
  fi
  config=${PILL_CONFIG:-$default_config}
  ds_config=${PILL_DS_CONFIG:-ds_configs/zero2.json}
  # Job id survives a requeue, so the default run dir does too: the resumed job finds its checkpoint.
  run_dir=${PILL_RUN_DIR:-runs/${SLURM_JOB_NAME:-pill-stage${stage// /+}}-${SLURM_JOB_ID:-local}}
  [[ -f $config ]] || { pill_log "ERROR: config $config not found (set PILL_CONFIG)"; return 2; }
  [[ -f $ds_config ]] || { pill_log "ERROR: DeepSpeed config $ds_config not found (set PILL_DS_CONFIG)"; return 2; }

  # Always from the allocation (a MASTER_* left in the submitting shell must not leak in); PILL_MASTER_* override.
  export MASTER_ADDR=${PILL_MASTER_ADDR:-$(pill_master_addr)}
  export MASTER_PORT=${PILL_MASTER_PORT:-$(pill_master_port)}
  # Multi-homed nodes: the interface for gloo/NCCL traffic (e.g. ib0, eth1), when the hostname resolves elsewhere.
  if [[ -n ${PILL_SOCKET_IFNAME:-} ]]; then
    export GLOO_SOCKET_IFNAME=$PILL_SOCKET_IFNAME NCCL_SOCKET_IFNAME=$PILL_SOCKET_IFNAME
  fi
  export PYTHONUNBUFFERED=1
  # Job logs are files: no carriage-return bars from transformers' weight loading either (train.py draws its own
  # bar only on a terminal).
  export HF_HUB_DISABLE_PROGRESS_BARS=${HF_HUB_DISABLE_PROGRESS_BARS:-1}
  if [[ ${PILL_CPU:-0} == 1 ]]; then
    export DS_ACCELERATOR=cpu              # DeepSpeed picks gloo on the CPU accelerator
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  else
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  fi

  # PILL_SET: whitespace-separated key=value overrides, each passed as `--set key=value`. Split by `read`, not
  # by an unquoted expansion, so that `stages.*.max_steps=20` stays a key even where a file name matches it.
  local -a args=(--ds_config "$ds_config" --config "$config" --output-dir "$run_dir") sets=()
  local kv
  read -r -d '' -a sets <<<"${PILL_SET:-}" || true   # -d '': newlines separate too (read returns 1 at the end)
  for kv in "${sets[@]}"; do args+=(--set "$kv"); done

  # The config decides what runs: the demo config trains stages 1 and 2 whichever script started it.
  stages=$(pill_config_stages "$python" "$config")
  if [[ $stages == "?" ]]; then
    stages=$stage
  elif [[ $stages != "$stage" ]]; then
    pill_log "note: $config trains stage(s) $stages, not only stage $stage: the config decides, not the script name"
  fi
  pill_log "job ${SLURM_JOB_ID:-?} stage(s) $stages restart $restarts: ${SLURM_NTASKS:-1} tasks on" \
    "${SLURM_JOB_NUM_NODES:-1} node(s) [${SLURM_JOB_NODELIST:-$(hostname -s)}]," \
    "master $MASTER_ADDR:$MASTER_PORT, $([[ ${PILL_CPU:-0} == 1 ]] && echo 'CPU/gloo' || echo 'GPU/NCCL')"
  pill_log "run dir $([[ $run_dir == /* ]] || echo "$repo/")$run_dir; $python pipeline/train.py ${args[*]}"

  PILL_SIGNALED=
  trap '_pill_on_signal USR1' USR1
  trap '_pill_on_signal TERM' TERM
  # --kill-on-bad-exit=1: a rank that dies (exit != 0, signal) ends the step at once; the others would
  # otherwise wait in their next collective until the NCCL/gloo timeout. After a joint preemption checkpoint the
  # ranks exit 99 at slightly different moments: that is safe, because checkpoint.save ends with a barrier
  # (every rank's files are complete before any rank leaves), and Slurm ends a step with SIGTERM first, which
  # train.py only records, then SIGKILL after KillWait, by which time the others have exited 99 themselves.
  # --cpus-per-task: srun does not inherit it from sbatch since Slurm 22.05 (tasks would get 1 CPU each).
  local -a srun_args=(--kill-on-bad-exit=1)
  [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  srun "${srun_args[@]}" bash "$repo/slurm/task.sh" "$python" pipeline/train.py "${args[@]}" &
  PILL_SRUN_PID=$!
  # `wait` returns early (status > 128) whenever a trapped signal arrives: wait again while srun lives;
  # the last `wait` returns srun's own status (bash keeps it), i.e. the highest exit code of the tasks.
  while kill -0 "$PILL_SRUN_PID" 2>/dev/null; do wait "$PILL_SRUN_PID"; done
  wait "$PILL_SRUN_PID"; rc=$?
  trap - USR1 TERM

  if ((rc == 99)); then
    if [[ $PILL_SIGNALED == TERM && ${PILL_REQUEUE_ON_TERM:-0} != 1 ]]; then
      # SIGTERM to the batch shell means scancel, the time limit itself, or preemption; the job state
      # (COMPLETING in all three) does not tell them apart, so do not bring back a job someone cancelled.
      # PreemptMode=REQUEUE requeues preempted jobs by itself.
      pill_log "checkpoint saved after SIGTERM; not requeueing (PILL_REQUEUE_ON_TERM=1 would)." \
        "Resume: PILL_RUN_DIR=$run_dir sbatch ..."
      return 99
    fi
    if ((restarts >= ${PILL_MAX_RESTARTS:-50})); then
      # A time limit too short to make progress between two signals would otherwise requeue forever.
      pill_log "checkpoint saved; not requeueing: already restarted $restarts times (PILL_MAX_RESTARTS)." \
        "Resume: PILL_RUN_DIR=$run_dir sbatch ..."
      return 99
    fi
    pill_log "training checkpointed and stopped (exit 99${PILL_SIGNALED:+ after SIG$PILL_SIGNALED}); requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
      # The job goes back to pending with the same id, hence the same run dir, and train.py resumes.
      return 0
    fi
    pill_log "ERROR: scontrol requeue failed (job not --requeue, or JobRequeue=0?); resubmit with" \
      "PILL_RUN_DIR=$run_dir to resume from $run_dir/checkpoints/latest"
    return 99
  fi
  if ((rc != 0)); then pill_log "training failed with exit code $rc"; return "$rc"; fi
  pill_log "training finished"
  return 0
}
