#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (munge + slurmctld + slurmd, Debian packages),
# for sat_dist's launcher tests and for trying launch/slurm.sbatch by hand.
#
#   tests/cluster/slurm.sh up      # installs what is missing (apt-get, needs root), starts the daemons,
#                                  # and prints `export SLURM_CONF=...` as its last line
#   eval "$(tests/cluster/slurm.sh up | tail -n1)"; srun -n 4 hostname
#   tests/cluster/slurm.sh status  # exit 0 when the controller answers and the node is usable
#   tests/cluster/slurm.sh down    # stops the three daemons this script started (by their pid files)
#
# Everything (slurm.conf, munge key and socket, state, spool, logs, pid files) lives under
# $SAT_DIST_SLURM_DIR (default /tmp/sat-dist-slurm), so nothing in /etc is changed and a system
# munged/slurm, if any, is left alone. The node is this host (NodeName=$(hostname), NodeAddr
# 127.0.0.1) with CPUs=8 advertised (SlurmdParameters=config_overrides), so `srun -n 4` fits on
# a 2-core machine. Ports: $SAT_DIST_SLURM_PORT (default 6817) for slurmctld, +1 for slurmd.
set -euo pipefail

DIR="${SAT_DIST_SLURM_DIR:-/tmp/sat-dist-slurm}"
CTLD_PORT="${SAT_DIST_SLURM_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
CONF="$DIR/slurm.conf"
MUNGE_DIR="$DIR/munge"
HOST="$(hostname -s)"

die() { echo "slurm.sh: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (it starts slurmd/slurmctld as root and may apt-get install); re-run with sudo"
}

install_missing() {
  local missing=()
  for prog in munged slurmctld slurmd srun sbatch scontrol sinfo; do
    command -v "$prog" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$prog" >/dev/null 2>&1 || missing+=("$prog")
  done
  [ "${#missing[@]}" = 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get here: install munge, slurmd, slurmctld and slurm-client with your package manager"
  echo "slurm.sh: installing munge slurmd slurmctld slurm-client (missing: ${missing[*]})" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends slurmd slurmctld slurm-client munge >&2
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
  cat >"$CONF" <<EOF
# Written by tests/cluster/slurm.sh: a one-node cluster for sat_dist's launcher tests.
ClusterName=satdist
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket.2
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
KillWait=5
# \`sbatch --wait\` polls every 2 s, backing off (x4) while below MinJobAge/2: at the default 300 it
# sleeps 2+8+32 s for a 10 s job. 4 keeps it at 2 s (finished jobs are purged on a ~60 s cycle).
MinJobAge=4
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES OverSubscribe=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if pid_alive "$MUNGE_DIR/munged.pid"; then return 0; fi
  id munge >/dev/null 2>&1 || die "user 'munge' does not exist: the munge package did not install cleanly"
  mkdir -p "$MUNGE_DIR"
  chown munge: "$MUNGE_DIR"
  chmod 0755 "$MUNGE_DIR"
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
  fi
  chown munge: "$MUNGE_DIR/munge.key"
  chmod 0600 "$MUNGE_DIR/munge.key"
  runuser -u munge -- /usr/sbin/munged --force \
    --socket="$MUNGE_DIR/munge.socket.2" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" \
    || die "munged failed to start; see $MUNGE_DIR/munged.log"
}

cluster_ready() {
  SLURM_CONF="$CONF" scontrol ping 2>/dev/null | grep -q "is UP" || return 1
  local state
  state="$(SLURM_CONF="$CONF" sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1)"
  case "$state" in idle*|mix*|alloc*|completing*) return 0 ;; *) return 1 ;; esac
}

cmd_up() {
  need_root
  install_missing
  export PATH="$PATH:/usr/sbin"
  mkdir -p "$DIR"
  if pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid" && cluster_ready; then
    echo "slurm.sh: cluster already up ($CONF)" >&2
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  cmd_down >/dev/null 2>&1 || true
  write_conf
  start_munge
  # -c: start from a clean state (no jobs left over from an earlier run of this script).
  slurmctld -c -f "$CONF" || die "slurmctld failed to start; see $DIR/log/slurmctld.log"
  slurmd -f "$CONF" || die "slurmd failed to start; see $DIR/log/slurmd.log"
  local deadline=$((SECONDS + 60))
  until cluster_ready; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      SLURM_CONF="$CONF" sinfo -N -l >&2 || true
      tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
      die "node $HOST did not become idle within 60s (logs above, full logs in $DIR/log)"
    fi
    # A node that registered as down (e.g. after an unclean stop) is put back in service.
    SLURM_CONF="$CONF" scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  echo "slurm.sh: cluster up: node $HOST, partition debug, logs in $DIR/log" >&2
  echo "export SLURM_CONF=$CONF"
}

stop_pidfile() {
  local f="$1" pid
  pid_alive "$f" || { rm -f "$f"; return 0; }
  pid="$(cat "$f")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

cmd_down() {
  stop_pidfile "$DIR/run/slurmd.pid"
  stop_pidfile "$DIR/run/slurmctld.pid"
  stop_pidfile "$MUNGE_DIR/munged.pid"
  echo "slurm.sh: stopped (state and logs kept in $DIR)" >&2
}

cmd_status() {
  export PATH="$PATH:/usr/sbin"
  command -v scontrol >/dev/null 2>&1 || die "scontrol not installed: run '$0 up'"
  cluster_ready || die "cluster at $CONF is not up: run '$0 up'"
  echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
