#!/usr/bin/env bash
# Tear down the cluster started by start.sh: cancel its jobs, stop its daemons by PID file.
BASE=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/slurm-local}
export SLURM_CONF=$BASE/etc/slurm.conf
if [ -f "$BASE/run/slurmctld.pid" ] && scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %i 2>/dev/null); [ -n "$jobs" ] && scancel $jobs
  for i in $(seq 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
fi
stop() {  # $1 = pidfile
  [ -f "$1" ] || return 0; local p; p=$(cat "$1")
  kill -TERM "$p" 2>/dev/null || { rm -f "$1"; return 0; }
  for i in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$p" 2>/dev/null && kill -KILL "$p"
  rm -f "$1"; echo "stopped pid $p ($1)"
}
stop "$BASE/run/slurmd.pid"
stop "$BASE/run/slurmctld.pid"
stop "$BASE/munge/munged.pid"
# leftover slurmstepd? each one owns a socket in the spool dir
ls "$BASE"/spool/slurmd/localhost_* 2>/dev/null && echo "WARNING: step sockets left in spool" >&2
exit 0
