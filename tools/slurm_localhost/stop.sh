#!/usr/bin/env bash
# Tear down the cluster started by start.sh: cancel its jobs, stop its daemons by PID file
# (slurmd, slurmctld, then the accounting daemons slurmdbd and MariaDB, munged last).
HERE=$(dirname "$0")
BASE=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/slurm-local}
export SLURM_CONF=$BASE/etc/slurm.conf
# shellcheck source=pids.sh
. "$HERE/pids.sh"
if [ -f "$BASE/run/slurmctld.pid" ] && scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %i 2>/dev/null); [ -n "$jobs" ] && scancel $jobs
  for i in $(seq 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
fi
stop_pid "$BASE/run/slurmd.pid"
stop_pid "$BASE/run/slurmctld.pid"
stop_pid "$BASE/run/slurmdbd.pid"
stop_pid "$BASE/run/mariadbd.pid" 120  # InnoDB shutdown: seconds
stop_pid "$BASE/munge/munged.pid"
# leftover slurmstepd? each one owns a socket in the spool dir
ls "$BASE"/spool/slurmd/localhost_* 2>/dev/null && echo "WARNING: step sockets left in spool" >&2
exit 0
