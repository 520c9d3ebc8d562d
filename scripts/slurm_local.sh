#!/usr/bin/env bash
# A single-node SLURM on this Debian machine, to try the SLURM sweep path for real (as root).
#
#   scripts/slurm_local.sh up              install slurm-wlm + munge if missing, write slurm.conf,
#                                          start munged, slurmctld and slurmd, wait for an idle node
#   scripts/slurm_local.sh status          the daemons, sinfo and squeue (exit 1 if it is not up)
#   scripts/slurm_local.sh env             print `export SLURM_CONF=...` (eval it to use sbatch & co)
#   scripts/slurm_local.sh down            cancel our jobs, stop the daemons this script started (by PID)
#   scripts/slurm_local.sh purge           down, then delete the cluster's directory
#   scripts/slurm_local.sh run -- CMD...   up, CMD with SLURM_CONF set, then down (even if CMD fails)
#                                          unless the cluster was already up; exits with CMD's status
#
# Everything lives in $APD_SLURM_DIR (default /var/lib/apd-slurm): slurm.conf, PID files, logs,
# state, spool and munged's socket. Nothing is written to /etc except a munge key when there is
# none. The state dir survives `down`, so job ids keep counting up (submitit names its files by
# job id). No accounting: sacct does not work here; squeue and scontrol do.
# Exit status: 0 ok, 1 failed, 3 prerequisites missing (not root, no apt, apt unreachable, or a
# SLURM this script did not start is running) -- tests skip on 3.

set -euo pipefail

DIR=${APD_SLURM_DIR:-/var/lib/apd-slurm}
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MUNGE_KEY=/etc/munge/munge.key
PARTITION=debug
UP_TIMEOUT_S=${APD_SLURM_UP_TIMEOUT_S:-90}

say() { echo "slurm_local: $*" >&2; }
die() { say "error: $*"; exit 1; }
missing() { say "cannot run here: $*"; exit 3; }

node_name() { hostname -s; }

# alive PID: the process exists and is not a zombie
alive() { [[ -r /proc/$1/stat && $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

# pid_of NAME: the PID in NAME's PID file if that process is alive and is NAME, else nothing
pid_of() {
  local name=$1 file pid
  case $name in
    munged) file=$MUNGE_DIR/munged.pid ;;
    *) file=$DIR/run/$name.pid ;;
  esac
  [[ -s $file ]] || return 0
  pid=$(<"$file")
  if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
    echo "$pid"
  fi
}

check_root() {
  [[ $EUID -eq 0 ]] || missing "must run as root (it installs packages and starts munged, slurmctld and slurmd); you are $(id -un)"
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sinfo >/dev/null && command -v sbatch >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || missing "slurmctld/slurmd/munged are not installed and there is no apt-get (this script targets Debian)"
  say "installing slurm-wlm and munge with apt-get"
  if ! timeout 300 apt-get update -qq >"$DIR/log/apt.log" 2>&1; then
    tail -5 "$DIR/log/apt.log" >&2
    missing "apt-get update failed: the package archive is unreachable (log: $DIR/log/apt.log)"
  fi
  if ! DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends slurm-wlm munge \
    >>"$DIR/log/apt.log" 2>&1; then
    tail -5 "$DIR/log/apt.log" >&2
    missing "apt-get install slurm-wlm munge failed (log: $DIR/log/apt.log)"
  fi
}

# a slurmctld or slurmd this script did not start holds the ports ours need (6817, 6818)
check_foreign_daemons() {
  local name pid ours
  for name in slurmctld slurmd; do
    ours=$(pid_of "$name")
    for pid in $(pgrep -x "$name" || true); do
      [[ $pid == "$ours" ]] && continue
      # the daemons fork short-lived helpers of the same name, and a daemon's starting process can
      # linger as a zombie: only a live process that is not our daemon's child counts
      [[ -n $ours && $(ps -o ppid= -p "$pid" | tr -d ' ') == "$ours" ]] && continue
      alive "$pid" || continue
      missing "a $name not started by this script is running (PID $pid); stop it, or use that cluster"
    done
  done
}

write_conf() {
  local cpus mem_mb
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) # nproc obeys OMP_NUM_THREADS; the node gets them all
  # RealMemory must not exceed what slurmd finds, or the node is drained: 80% of MemTotal, in whole GB
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", int($2 * 0.8 / 1048576) * 1024}' /proc/meminfo)
  ((mem_mb >= 1024)) || mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 2048}' /proc/meminfo)
  cat >"$CONF.new" <<EOF
# written by scripts/slurm_local.sh: one node, one partition, no accounting
ClusterName=apdlocal
SlurmctldHost=$(node_name)(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
NodeName=$(node_name) NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$(node_name) Default=YES MaxTime=INFINITE State=UP
EOF
  if [[ -f $CONF ]] && cmp -s "$CONF" "$CONF.new"; then
    rm "$CONF.new"
  else
    mv "$CONF.new" "$CONF"
    say "wrote $CONF ($cpus CPUs, RealMemory=${mem_mb} MB, partition $PARTITION)"
  fi
}

start_munged() {
  [[ -n $(pid_of munged) ]] && return 0
  if [[ ! -s $MUNGE_KEY ]]; then
    say "creating the munge key $MUNGE_KEY"
    install -d -o munge -g munge -m 0700 "$(dirname "$MUNGE_KEY")"
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
  fi
  install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  # setsid: the daemons leave the caller's session, so that a Ctrl-C or a signal to the caller's
  # process group (say, a test runner being stopped) does not reach them; `down` stops them by PID
  setsid runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
    || die "munged did not start; see $MUNGE_DIR/munged.log"
  wait_for 10 munged_up || die "munged did not come up; see $MUNGE_DIR/munged.log"
  munge --socket="$MUNGE_SOCKET" -n </dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null \
    || die "munge cannot encode/decode a credential; see $MUNGE_DIR/munged.log"
}

start_slurm_daemon() {
  local name=$1
  [[ -n $(pid_of "$name") ]] && return 0
  setsid "$name" -f "$CONF" || die "$name did not start; see $DIR/log/$name.log"
  wait_for 15 running "$name" || die "$name exited; see $DIR/log/$name.log: $(tail -3 "$DIR/log/$name.log" 2>/dev/null)"
}

# wait_for SECONDS COMMAND [ARGS...]: run COMMAND every half second until it succeeds
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

running() { [[ -n $(pid_of "$1") ]]; }
munged_up() { running munged && [[ -S $MUNGE_SOCKET ]]; }
exited() { ! alive "$1"; }
our_jobs() { SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null | sort -u; }
no_jobs() { [[ -z $(our_jobs) ]]; }

node_state() { SLURM_CONF=$CONF sinfo -h -n "$(node_name)" -o %T 2>/dev/null | head -1; }

wait_for_idle_node() {
  local deadline=$((SECONDS + UP_TIMEOUT_S)) state=""
  while ((SECONDS < deadline)); do
    state=$(node_state)
    case $state in
      idle | mixed | allocated) return 0 ;;
      down* | drain* | inval*)
        SLURM_CONF=$CONF scontrol update nodename="$(node_name)" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  SLURM_CONF=$CONF scontrol show node "$(node_name)" >&2 || true
  die "node $(node_name) is '${state:-not reported}' after ${UP_TIMEOUT_S}s, not idle; logs in $DIR/log"
}

cmd_up() {
  check_root
  install -d -m 0755 "$DIR" "$DIR/log" "$DIR/run" "$DIR/state" "$DIR/spool"
  install_packages
  check_foreign_daemons
  # a running slurmctld or slurmd keeps the config it started with
  running slurmctld || running slurmd || write_conf
  start_munged
  start_slurm_daemon slurmctld
  start_slurm_daemon slurmd
  wait_for_idle_node
  say "up: partition $PARTITION on node $(node_name) ($(SLURM_CONF=$CONF sinfo -h -o %c) CPUs); munged $(pid_of munged), slurmctld $(pid_of slurmctld), slurmd $(pid_of slurmd)"
  say "use it with: export SLURM_CONF=$CONF"
}

stop_pid() {
  local name=$1 pid
  pid=$(pid_of "$name")
  [[ -z $pid ]] && return 0
  kill -TERM "$pid" 2>/dev/null || true
  wait_for 20 exited "$pid" || { say "$name ($pid) ignored SIGTERM; sending SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
  say "stopped $name ($pid)"
}

cmd_down() {
  check_root
  if running slurmctld; then
    local jobs
    mapfile -t jobs < <(our_jobs)
    if ((${#jobs[@]} > 0)); then
      say "cancelling jobs still queued or running: ${jobs[*]}"
      SLURM_CONF=$CONF scancel "${jobs[@]}" || true
      wait_for 90 no_jobs || say "jobs still listed after 90 s: $(our_jobs | tr '\n' ' ')"
    fi
  fi
  stop_pid slurmd
  stop_pid slurmctld
  stop_pid munged
  rm -f "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$MUNGE_DIR/munged.pid"
}

cmd_status() {
  local name pid up=0
  for name in munged slurmctld slurmd; do
    pid=$(pid_of "$name")
    if [[ -n $pid ]]; then echo "$name: running (PID $pid)"; else echo "$name: not running"; up=1; fi
  done
  ((up == 0)) || return 1
  SLURM_CONF=$CONF sinfo
  SLURM_CONF=$CONF squeue
}

cmd_run() {
  [[ ${1:-} == "--" ]] && shift
  (($# > 0)) || die "usage: $0 run -- CMD [ARGS...]"
  local was_up=1 rc=0
  [[ -n $(pid_of slurmctld) && -n $(pid_of slurmd) && -n $(pid_of munged) ]] || was_up=0
  if ((was_up == 0)); then
    trap 'cmd_down' EXIT
  fi
  cmd_up
  SLURM_CONF=$CONF "$@" || rc=$?
  return "$rc"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  purge) cmd_down && rm -rf "$DIR" && say "removed $DIR" ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  run) shift && cmd_run "$@" ;;
  *) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2; exit 2 ;;
esac
