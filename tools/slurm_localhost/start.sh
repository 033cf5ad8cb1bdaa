#!/usr/bin/env bash
# A throw-away one-node SLURM (Debian 12: slurm-wlm 22.05 + munge) on localhost, run as root, for
# the tests in tests/slurm (.ci/run starts and stops it). Installs the packages with apt when
# they are missing. Short KillWait / credential lifetime / scheduler interval keep requeues fast.
# Usage: tools/slurm_localhost/start.sh        (munge auth; SLURM_AUTH=none: no munge)
# Afterwards: source $SLURM_LOCAL_DIR/env.sh   (exports SLURM_CONF for sbatch/srun/scontrol)
set -euo pipefail
BASE=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/slurm-local}
AUTH=${SLURM_AUTH:-munge}
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
MEM=${SLURM_NODE_MEM_MB:-$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 85 / 100 ))}
T0=$(date +%s.%N)
"$(dirname "$0")/stop.sh" >/dev/null 2>&1 || true   # clean restart

if ! command -v slurmctld >/dev/null || { [ "$AUTH" = munge ] && ! command -v munged >/dev/null; }; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$BASE"/{etc,log,run,munge}
rm -rf "$BASE/state" "$BASE/spool"; mkdir -p "$BASE/state" "$BASE/spool/slurmd"
CONF=$BASE/etc/slurm.conf

if [ "$AUTH" = munge ]; then
  SOCK=$BASE/munge/munge.socket.2
  [ -f "$BASE/munge/munge.key" ] || dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$BASE/munge"; chmod 755 "$BASE/munge"; chmod 400 "$BASE/munge/munge.key"
  runuser -u munge -- /usr/sbin/munged --socket="$SOCK" --key-file="$BASE/munge/munge.key" \
      --log-file="$BASE/munge/munged.log" --pid-file="$BASE/munge/munged.pid" \
      --seed-file="$BASE/munge/munged.seed"
  AUTHLINES="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=10"
else
  AUTHLINES="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10"
fi

cat > "$CONF" <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
$AUTHLINES
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
MinJobAge=3600
MailProg=/bin/true
# SLURM_NODE_CPUS may exceed the real cores (overlapping test jobs): trust the config.
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
echo "export SLURM_CONF=$CONF" > "$BASE/env.sh"
export SLURM_CONF=$CONF

slurmctld -f "$CONF"            # daemonizes; pid in $BASE/run/slurmctld.pid
slurmd -f "$CONF" -N localhost  # -N: node name independent of the real hostname

for i in $(seq 120); do
  st=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
  [ "$st" = idle ] && break
  sleep 0.25
done
if [ "$st" != idle ]; then
  echo "slurm did not come up (node state: '${st:-none}')" >&2
  tail -20 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2; exit 1
fi
echo "slurm up in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $T0}")s (auth=$AUTH cpus=$CPUS mem=${MEM}M); source $BASE/env.sh"
