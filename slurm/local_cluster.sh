#!/usr/bin/env bash
# One-node Slurm cluster on this host, for tests and for trying the sbatch scripts locally.
#
#   slurm/local_cluster.sh up       install slurm-wlm + munge if missing, write slurm.conf, start
#                                   munged/slurmctld/slurmd, wait until the node is idle
#   slurm/local_cluster.sh down     stop exactly the daemons `up` started (by their recorded pids)
#   slurm/local_cluster.sh status   daemons, sinfo, squeue
#   slurm/local_cluster.sh env      print `export SLURM_CONF=...` (eval it to use sbatch/sinfo by hand)
#
# Runs as root (daemons as root, SlurmUser=root). Everything it writes lives under $PILL_SLURM_STATE
# (default /tmp/pill-slurm): slurm.conf, state/spool dirs, logs, pid files. Client commands find the
# config through SLURM_CONF; when /etc/slurm/slurm.conf does not exist, `up` also links it there so a
# plain `sinfo` works, and `down` removes that link again. `up` and `down` are idempotent.
#
# Environment:
#   PILL_SLURM_STATE      state folder (default /tmp/pill-slurm)
#   PILL_SLURM_CPUS       CPUs to declare for the node (default: what slurmd -C detects)
#   PILL_SLURM_PARTITION  partition name (default: pill)
#   PILL_SLURM_PORT       slurmctld port; slurmd uses PORT+1 (default 6817)
#   PILL_SLURM_TIMEOUT    seconds to wait for the node to become idle (default 60)
#   PILL_SLURM_CRED_EXPIRE  AuthInfo cred_expire seconds = delay before a requeued job restarts (default 10)
set -euo pipefail

STATE=${PILL_SLURM_STATE:-/tmp/pill-slurm}
CONF=$STATE/slurm.conf
PIDS=$STATE/pids          # "name pid" lines for daemons this script started
PARTITION=${PILL_SLURM_PARTITION:-pill}
PORT=${PILL_SLURM_PORT:-6817}
TIMEOUT=${PILL_SLURM_TIMEOUT:-60}
ETC_CONF=/etc/slurm/slurm.conf

log() { echo "[local_cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (starts munged, slurmctld and slurmd)"; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sinfo >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "slurm/munge missing (${missing[*]}) and no apt-get to install them"
  log "installing slurm-wlm munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || log "apt-get update failed; trying to install from the cached package lists"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
}

# pid of a daemon we recorded, if it is still alive
recorded_pid() {
  local name=$1 pid
  [[ -f $PIDS ]] || return 1
  pid=$(awk -v n="$name" '$1 == n {print $2}' "$PIDS" | tail -n1)
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

record_pid() { echo "$1 $2" >>"$PIDS"; }

write_conf() {
  local host cpus mem detected
  host=$(hostname -s)
  detected=$(slurmd -C | head -n1)
  cpus=${PILL_SLURM_CPUS:-$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$detected")}
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
  [[ -n $cpus && -n $mem ]] || die "could not read CPUs/RealMemory from 'slurmd -C': $detected"
  mem=$((mem * 95 / 100))   # leave a margin so the node is never drained for "Low RealMemory"
  mkdir -p "$STATE"/{ctld,spool,log,run}
  cat >"$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh for $host; one node, everything as root.
ClusterName=pill-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=${PILL_SLURM_CRED_EXPIRE:-10}
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
MpiDefault=none
SchedulerType=sched/backfill
# Schedule often: a requeued test job should restart in seconds, not after the default 30-60 s passes.
SchedulerParameters=bf_interval=2,sched_interval=2
# CPUs (not cores) are the unit, so 2 single-CPU tasks fit a 2-CPU host whatever its thread layout.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Use the node line below as is even where the hardware reports another layout.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to 'scontrol show job' for an hour (no accounting database here).
MinJobAge=3600
KillWait=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if [[ -f $CONF ]] && cmp -s "$CONF.tmp" "$CONF"; then
    rm -f "$CONF.tmp"
  else
    if recorded_pid slurmctld >/dev/null; then
      log "slurm.conf changed while the cluster runs; the daemons keep the old one until: $0 down && $0 up"
    fi
    mv "$CONF.tmp" "$CONF"
  fi
  if [[ ! -e $ETC_CONF && ! -L $ETC_CONF ]]; then
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -s "$CONF" "$ETC_CONF"
  fi
}

start_munge() {
  if pid=$(recorded_pid munged); then return 0; fi
  if pgrep -x munged >/dev/null; then log "munged already running (not ours; left alone)"; return 0; fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge; chmod 700 /var/log/munge
  # munged refuses to run as root; it forks into the background and writes its pid file.
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged --force
  local _
  for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
  [[ -s /run/munge/munged.pid ]] || die "munged did not start (see /var/log/munge/munged.log)"
  record_pid munged "$(cat /run/munge/munged.pid)"
  munge -n | unmunge >/dev/null || die "munge round trip failed (see /var/log/munge/munged.log)"
}

start_daemon() {  # name pidfile cmd...
  local name=$1 pidfile=$2; shift 2
  if recorded_pid "$name" >/dev/null; then return 0; fi
  if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    record_pid "$name" "$(cat "$pidfile")"; return 0
  fi
  rm -f "$pidfile"
  "$@" || die "$name failed to start (see $STATE/log/$name.log)"
  local _
  for _ in $(seq 100); do [[ -s $pidfile ]] && break; sleep 0.1; done
  [[ -s $pidfile ]] || die "$name wrote no pid file $pidfile (see $STATE/log/$name.log)"
  record_pid "$name" "$(cat "$pidfile")"
}

wait_idle() {
  local host deadline state
  host=$(hostname -s)
  deadline=$((SECONDS + TIMEOUT))
  while ((SECONDS < deadline)); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -n1 || true)
    case $state in
      idle|mixed|allocated) log "node $host is $state (partition $PARTITION)"; return 0 ;;
      down*|drain*|fail*)   scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  die "node $host not idle after ${TIMEOUT}s (last state: '${state:-no answer}'); see $STATE/log/slurmctld.log and slurmd.log"
}

cmd_up() {
  need_root
  install_packages
  mkdir -p "$STATE"
  write_conf
  export SLURM_CONF=$CONF
  start_munge
  start_daemon slurmctld "$STATE/run/slurmctld.pid" slurmctld -f "$CONF"
  start_daemon slurmd "$STATE/run/slurmd.pid" slurmd -f "$CONF"
  wait_idle
  log "up; use: export SLURM_CONF=$CONF"
}

cmd_down() {
  [[ -f $PIDS ]] || { log "nothing to stop ($PIDS absent)"; return 0; }
  local name pid
  # reverse start order: slurmd, slurmctld, munged
  for name in slurmd slurmctld munged; do
    pid=$(recorded_pid "$name") || continue
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in 10s; SIGKILL"; kill -KILL "$pid" || true; fi
  done
  rm -f "$PIDS"
  if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then rm -f "$ETC_CONF"; fi
  log "down"
}

cmd_status() {
  local name pid rc=0
  for name in munged slurmctld slurmd; do
    if pid=$(recorded_pid "$name"); then echo "$name: running (pid $pid)"; else echo "$name: not running"; rc=1; fi
  done
  if [[ -f $CONF ]]; then
    SLURM_CONF=$CONF sinfo 2>&1 || rc=1
    SLURM_CONF=$CONF squeue 2>&1 || true
  fi
  return $rc
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
