#!/usr/bin/env bash
# A real, single-host SLURM cluster for tests and local runs: one slurmctld plus N `slurmd -N nodeI`
# (Debian's slurm is built with MULTIPLE_SLURMD), each a fake node on its own port.
#   launch/slurm/cluster.sh up [NODES=2]   install if needed, start, wait until all nodes idle
#   launch/slurm/cluster.sh down [--purge] cancel jobs, stop daemons, undo /etc/hosts (--purge: rm state)
#   launch/slurm/cluster.sh status         sinfo + squeue, or "not running" (exit 1)
#   launch/slurm/cluster.sh env            the line to eval: export SLURM_CONF=...
# Nothing global is exported: clients find the cluster through SLURM_CONF, e.g.
#   eval "$(launch/slurm/cluster.sh up 2)"   or   eval "$(launch/slurm/cluster.sh env)"
# `up` exits 3 with one line on stderr when it cannot work here (not root, no apt-get): tests skip.
# Each choice below says which failure it avoids: all were seen on this kind of machine.
set -euo pipefail
DIR=${QWEN3KD_SLURM_DIR:-/tmp/qwen3kd-slurm}
CONF=$DIR/slurm.conf
TAG="# qwen3kd-slurm $DIR"   # marks our /etc/hosts lines so `down` removes exactly them
PORT=${QWEN3KD_SLURM_PORT:-6817}   # slurmctld; node I listens on PORT+3+I
log() { echo "cluster.sh: $*" >&2; }

# pid from a pid file if that process is alive *and* is the daemon we expect (pids get reused).
alive() { local p; p=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] && echo "$p"; }
# SIGTERM every daemon named by "PIDFILE:COMM" at once (each slurmd takes ~2 s to exit: in series
# that added up), then wait up to 10 s for all of them and SIGKILL what is left.
stop() { local a p pids=() i
  for a; do p=$(alive "${a%:*}" "${a##*:}") && kill "$p" 2>/dev/null && pids+=("$p"); rm -f "${a%:*}"; done
  for _ in $(seq 50); do p=; for i in "${pids[@]}"; do [ -d "/proc/$i" ] && p=$i; done
    [ -z "$p" ] && return 0; sleep 0.2; done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
# "all nodes idle" is the readiness criterion: slurmctld up *and* every slurmd registered.
# Guarded: a client with no slurm.conf or no slurmctld retries for 10-60 s before failing.
n_idle() { [ -f "$CONF" ] && [ -n "$(alive "$DIR/run/slurmctld.pid" slurmctld)" ] || { echo 0; return; }
  SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$' || true; }
hosts_del() { local rest; [ -w /etc/hosts ] || return 0
  rest=$(grep -vF "$TAG" /etc/hosts || true)
  # Rewrite in place: /etc/hosts may be a bind mount (containers), where `sed -i`'s rename fails.
  [ "$rest" = "$(cat /etc/hosts)" ] || printf '%s\n' "$rest" > /etc/hosts; }

stop_slurm() { local f a=("$DIR/run/slurmctld.pid:slurmctld" "$@")
  for f in "$DIR"/run/slurmd-*.pid; do if [ -e "$f" ]; then a+=("$f:slurmd"); fi; done
  stop "${a[@]}"; }
start_munge() {  # $1 = key file. munged refuses to run as root (log ownership): as munge.
  runuser -u munge -- munged --key-file="$1" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" </dev/null >>"$DIR/log/daemons.out" 2>&1; }
fail() { log "$1"; [ -z "$(alive "$DIR/run/slurmctld.pid" slurmctld)" ] || SLURM_CONF=$CONF sinfo -N >&2 || true
  tail -n 20 "$DIR"/log/* "$DIR/munge/munged.log" >&2 || true; down; exit 1; }  # leave nothing running

down() {
  if [ -n "$(alive "$DIR/run/slurmctld.pid" slurmctld)" ]; then
    # Jobs first: their steps (slurmstepd) outlive slurmd. Wait a bit for them to end.
    SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null | xargs -r env SLURM_CONF="$CONF" scancel || true
    for _ in $(seq 30); do [ -z "$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  # munged with them: none of them needs it to shut down, and each daemon takes 1-2 s to exit.
  stop_slurm "$DIR/munge/munged.pid:munged"
  hosts_del
  if [ "${1:-}" = --purge ]; then rm -rf "$DIR"; fi; }

write_conf() {  # $1 = nodes, $2 = proctrack plugin (cgroup|pgid)
  local n=$1 cpus i; cpus=$(nproc)
  # One CPU per task by default, so with CPUs=nproc a job always gets (at least) 1 task per node.
  cat > "$CONF" <<EOF
ClusterName=qwen3kd-local
SlurmctldHost=localhost
SlurmctldPort=$PORT
# auth/munge, cred/munge, sched/backfill, SlurmUser=root are defaults. Our own munged socket;
# cred_expire=10 (default 120) + 5 s scheduler passes: a requeued job reruns after ~15 s, not ~156 s.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
# Fake nodes cannot match the hardware description exactly.
SlurmdParameters=config_overrides
ProctrackType=proctrack/$2
TaskPlugin=$([ "$2" = cgroup ] && echo task/cgroup || echo task/none)
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
EOF
  for i in $(seq "$n"); do
    echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 3 + i))" \
      "CPUs=$cpus RealMemory=1000 State=UNKNOWN" >> "$CONF"
  done
  echo "PartitionName=local Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
  # ConstrainCores=no, or every fake node's tasks get pinned to CPU 0.
  printf 'CgroupPlugin=autodetect\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n' > "$DIR/cgroup.conf"
}

start_slurm() {  # $1 = nodes; returns 1 if a slurmd does not come up
  local i  # Daemon mode, pid files, stdio detached: a `-D &` daemon keeps a CI log pipe open.
  slurmctld -f "$CONF" </dev/null >>"$DIR/log/daemons.out" 2>&1 || return 1
  for i in $(seq "$1"); do
    mkdir -p "$DIR/spool/node$i"
    slurmd -f "$CONF" -N "node$i" </dev/null >>"$DIR/log/daemons.out" 2>&1 || return 1
  done
  sleep 1; for i in $(seq "$1"); do [ -n "$(alive "$DIR/run/slurmd-node$i.pid" slurmd)" ] || return 1; done
}

up() {
  local n=${1:-2} key=/etc/munge/munge.key t0=$SECONDS i
  [[ $n =~ ^[1-9][0-9]*$ ]] || { log "NODES must be a positive integer, got '$n'"; exit 2; }
  [ "$(id -u)" = 0 ] || { log "needs root (apt-get, munged as munge, /etc/hosts)"; exit 3; }
  command -v apt-get >/dev/null || { log "no apt-get here (needs Debian/Ubuntu for slurm)"; exit 3; }
  # Already up with this many nodes: reuse it (idempotent), otherwise restart from scratch.
  if [ "$(n_idle)" = "$n" ] && [ "$(grep -c '^NodeName=' "$CONF" 2>/dev/null)" = "$n" ]; then
    log "already up ($n nodes)"; echo "export SLURM_CONF=$CONF"; return 0; fi
  local c pkgs="slurmctld slurmd slurm-client munge" missing=
  for c in slurmctld slurmd sinfo scancel munged mungekey; do command -v $c >/dev/null || missing=1; done
  if [ -n "$missing" ]; then
    log "installing $pkgs"
    if [ -z "$(ls /var/lib/apt/lists/*_Packages* 2>/dev/null)" ] \
       || ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs >&2; then
      apt-get update >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs >&2
    fi
  fi
  down
  # A port held by another slurm (a system one, another state dir) would make our daemons talk to it.
  for i in $PORT $(seq $((PORT + 4)) $((PORT + 3 + n))); do
    if (: </dev/tcp/127.0.0.1/"$i") 2>/dev/null; then
      log "port $i already in use (another slurm?); set QWEN3KD_SLURM_PORT"; exit 1; fi; done
  # Fresh state: slurmctld state from another ClusterName is fatal; old logs mislead.
  rm -rf "$DIR/ctld" "$DIR/spool" "$DIR/log" "$DIR/run"
  mkdir -p "$DIR/ctld" "$DIR/spool" "$DIR/log" "$DIR/run"
  install -d -o munge -g munge -m 0755 "$DIR/munge"   # clients need x on the socket's dir
  if [ ! -f "$key" ]; then   # The package normally creates one; else ours, in the state dir.
    install -d -o munge -g munge -m 0700 "$DIR/munge/key"; key=$DIR/munge/key/munge.key
    [ -f "$key" ] || { mungekey -c -k "$key" 2>/dev/null || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none; }
    chown munge:munge "$key"; chmod 0400 "$key"
  fi
  start_munge "$key" || fail "munged failed to start"
  # Fake node names must resolve, or torchrun's rendezvous fails after ~106 s.
  hosts_del
  for i in $(seq "$n"); do echo "127.0.0.1 node$i $TAG" >> /etc/hosts; done
  # proctrack/cgroup leaks nothing; if this kernel/sandbox refuses it, proctrack/pgid.
  local pt=${QWEN3KD_SLURM_PROCTRACK:-cgroup}
  write_conf "$n" "$pt"
  if ! start_slurm "$n"; then
    [ "$pt" = cgroup ] && grep -qiE 'cgroup|proctrack' "$DIR"/log/slurmd-*.log || fail "slurm daemons failed to start"
    log "slurmd failed with proctrack/cgroup, falling back to proctrack/pgid"
    stop_slurm; rm -rf "$DIR/ctld" "$DIR/spool"; mkdir -p "$DIR/ctld" "$DIR/spool"
    write_conf "$n" pgid
    start_slurm "$n" || fail "slurm daemons failed to start"
  fi
  for _ in $(seq 120); do [ "$(n_idle)" = "$n" ] && break; sleep 0.5; done
  [ "$(n_idle)" = "$n" ] || fail "nodes not all idle after 60 s:"
  log "up: $n nodes idle in $((SECONDS - t0)) s ($(grep ^ProctrackType "$CONF"))"
  echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
  up) up "${2:-2}" ;;
  down) down "${2:-}" ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status)
    if [ -n "$(alive "$DIR/run/slurmctld.pid" slurmctld)" ] && SLURM_CONF=$CONF sinfo -N 2>/dev/null; then
      SLURM_CONF=$CONF squeue
    else echo "not running"; exit 1; fi ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
