#!/usr/bin/env bash
# CI: a real single-node SLURM cluster on localhost (Debian's slurm-wlm + munge), for
# .ci/slurm/run_e2e.sh. Installs the packages, writes slurm.conf / gres.conf / cgroup.conf for this
# host, creates the munge key, starts munged, slurmctld and slurmd as background daemons (no systemd
# in CI containers) and waits until `sinfo` shows the node idle.
#
# Idempotent: a second run installs nothing, leaves running daemons alone when the configuration is
# unchanged, and restarts only the daemons this script started (by their pid files) when it changed.
# Needs root. Settings (environment):
#   SLURM_CI_GPUS   1 (default): declare one placeholder GPU gres on the node, see below; 0: none
#   SLURM_CI_WAIT   seconds to wait for the node to become idle (default 60)
#
# The GPU question, honestly: this node has no GPU. The workflow profile asks SLURM for one GPU
# (`--gpus=1`) on the training rules, and CI should prove exactly that request against a real
# scheduler rather than strip it. So slurm.conf declares `Gres=gpu:1` and gres.conf binds that one
# placeholder GPU to /dev/null (Slurm 22.05 drops a GPU gres that names no device file): SLURM
# schedules and accounts `--gpus=1` as on a GPU cluster (the training jobs wait for each other for
# the one "GPU", as they would), but no GPU exists, so the training code runs on the CPU
# (tensorflow-cpu ignores CUDA_VISIBLE_DEVICES). The generated slurm.conf and gres.conf say the
# same. Never copy these files to a real cluster, which declares its real GPUs (AutoDetect=nvml).
set -euo pipefail

GPUS=${SLURM_CI_GPUS:-1}
case "$GPUS" in 0|1) ;; *) echo "slurm-setup: error: SLURM_CI_GPUS must be 0 or 1" >&2; exit 1 ;; esac
WAIT=${SLURM_CI_WAIT:-60}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

log() { echo "slurm-setup: $*"; }
die() { echo "slurm-setup: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages and starts daemons)"

# --- packages ----------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge \
    >/dev/null
fi
log "installed: $(dpkg-query -W -f='${Package} ${Version}  ' slurmctld slurmd slurm-client munge)"

# --- munge -------------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating the munge key"
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key

alive() {  # alive PIDFILE: the process named in PIDFILE is running
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

if ! alive "$MUNGE_PID"; then
  log "starting munged"
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- munged --pid-file="$MUNGE_PID"
fi
for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

# --- configuration -----------------------------------------------------------------------------
HOST=$(hostname -s)
NCPU=$(nproc)
# RealMemory as slurmd measures it, less 5% for the daemons and the OS: a job's --mem that fits
# here also fits in the machine.
MEM_MB=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
[ -n "$MEM_MB" ] || die "slurmd -C did not report RealMemory"
MEM_MB=$((MEM_MB * 95 / 100))

mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
chown slurm:slurm "$LOG_DIR" /var/spool/slurmctld
chmod 0755 "$LOG_DIR" /var/spool/slurmctld

GRES_NODE=""
GRES_TYPES=""
if [ "$GPUS" -gt 0 ]; then
  GRES_NODE=" Gres=gpu:$GPUS"
  GRES_TYPES="GresTypes=gpu"
fi

new_slurm_conf=$(cat <<EOF
# Written by .ci/slurm/setup.sh: single-node SLURM on localhost for CI. Do not use elsewhere.
ClusterName=covidct-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
MpiDefault=none
# No cgroups: CI containers rarely delegate them. Processes are tracked through /proc, and
# resource limits are the scheduler's (memory is consumable below), not the kernel's.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd, so no accounting: sacct cannot answer and the Snakemake executor must query
# squeue (slurm_status_command: squeue). squeue only knows a job for MinJobAge seconds after it
# ends; 900 s is far above the executor's status interval (it needs >= 3x its first interval).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=900
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
$GRES_TYPES
# This node has NO GPU. Gres=gpu:1 is a placeholder (gres.conf binds it to /dev/null): SLURM
# schedules and accounts '--gpus=1' exactly as on a GPU cluster, so CI exercises the workflow
# profile's GPU requests unchanged, but the "GPU" jobs run on the CPU.
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM_MB$GRES_NODE State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
new_gres_conf=$(cat <<EOF
# Written by .ci/slurm/setup.sh. This node has NO GPU: the gpu below is a placeholder bound to
# /dev/null so that SLURM can schedule '--gpus=1' in CI (Slurm drops a GPU gres without a File).
AutoDetect=off
EOF
)
if [ "$GPUS" -gt 0 ]; then
  # Slurm 22.05 drops a GPU gres without a File ("Removing file-less GPU"), so the placeholder is
  # bound to /dev/null: a character device that exists everywhere and is not a GPU.
  new_gres_conf+=$'\n'"NodeName=$HOST Name=gpu File=/dev/null"
fi
new_cgroup_conf=$(cat <<EOF
# Written by .ci/slurm/setup.sh. slurm.conf uses proctrack/linuxproc and task/none, so no cgroup
# plugin is loaded; this file only keeps slurmd from looking for a cgroup hierarchy to constrain.
CgroupPlugin=autodetect
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
)

changed=0
write_if_changed() {  # write_if_changed FILE CONTENT
  if [ ! -f "$1" ] || [ "$(cat "$1")" != "$2" ]; then
    printf '%s\n' "$2" > "$1.tmp" && mv "$1.tmp" "$1"
    changed=1
    log "wrote $1"
  fi
}
write_if_changed "$CONF_DIR/slurm.conf" "$new_slurm_conf"
write_if_changed "$CONF_DIR/gres.conf" "$new_gres_conf"
write_if_changed "$CONF_DIR/cgroup.conf" "$new_cgroup_conf"
chmod 0644 "$CONF_DIR"/slurm.conf "$CONF_DIR"/gres.conf "$CONF_DIR"/cgroup.conf

# --- daemons -----------------------------------------------------------------------------------
stop() {  # stop PIDFILE NAME: end the daemon this script started, by its pid file
  if alive "$1"; then
    log "stopping $2 (configuration changed)"
    kill "$(cat "$1")"
    for _ in $(seq 50); do alive "$1" || break; sleep 0.2; done
  fi
}
if [ "$changed" -eq 1 ]; then
  stop "$SLURMD_PID" slurmd
  stop "$CTLD_PID" slurmctld
fi

if ! alive "$CTLD_PID"; then
  log "starting slurmctld"
  slurmctld      # daemonises
  for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
fi
scontrol ping | grep -q UP || die "slurmctld is not responding (see $LOG_DIR/slurmctld.log)"
if ! alive "$SLURMD_PID"; then
  log "starting slurmd"
  slurmd
fi

state=""
for _ in $(seq "$WAIT"); do
  state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1)
  case "$state" in
    idle|mixed|allocated) break ;;
    drain*|down*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
case "$state" in
  idle|mixed|allocated) ;;
  *) tail -n 20 "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmctld.log" >&2 || true
     die "node $HOST is '$state', not idle, after ${WAIT}s" ;;
esac
sinfo -N -o "%N %P %T %c %m %G"
log "ready: node $HOST ($NCPU CPUs, $MEM_MB MB, placeholder gpu gres: $GPUS)"
