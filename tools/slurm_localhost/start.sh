#!/usr/bin/env bash
# A throw-away one-node SLURM (Debian 12: slurm-wlm 22.05 + munge) on localhost, run as root, for
# the tests in tests/slurm (.ci/run starts and stops it). Installs the packages with apt when
# they are missing. Short KillWait / credential lifetime / scheduler interval keep requeues fast.
# With job accounting (sacct): slurmdbd on a private MariaDB (accounting.sh). When accounting
# cannot start, SLURM comes up without it, with a WARNING (tests that need sacct then skip).
# Usage: tools/slurm_localhost/start.sh        (munge auth; SLURM_AUTH=none: no munge)
#        SLURM_ACCOUNTING=0: no slurmdbd / MariaDB (and no apt install of them)
# Afterwards: source $SLURM_LOCAL_DIR/env.sh   (exports SLURM_CONF for sbatch/srun/scontrol)
set -euo pipefail
HERE=$(dirname "$0")
BASE=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/slurm-local}
AUTH=${SLURM_AUTH:-munge}
ACCT=${SLURM_ACCOUNTING:-1}
CLUSTER=ci
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
MEM=${SLURM_NODE_MEM_MB:-$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 85 / 100 ))}
T0=$(date +%s.%N)
"$HERE/stop.sh" >/dev/null 2>&1 || true   # clean restart
# shellcheck source=pids.sh
. "$HERE/pids.sh"
mkdir -p "$BASE"/{etc,log,run,munge}
warn() { printf '\n*** WARNING: %s ***\n\n' "$*" >&2; }

UPDATED=
if ! command -v slurmctld >/dev/null || { [ "$AUTH" = munge ] && ! command -v munged >/dev/null; }; then
  apt-get update -qq; UPDATED=updated
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
fi
T_APT=$(date +%s.%N)
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
  ACCT_AUTHTYPE=auth/munge ACCT_AUTHINFO="AuthInfo=socket=$SOCK"
  # The clients (slurmctld, sacct, sacctmgr) reach slurmdbd with the munge socket named here,
  # not AuthInfo's: without it they look for /run/munge/munge.socket.2.
  ACCT_MUNGE="AccountingStoragePass=$SOCK"
else
  AUTHLINES="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10"
  ACCT_AUTHTYPE=auth/none ACCT_AUTHINFO= ACCT_MUNGE=
fi

write_conf() {  # $1 = 1: job accounting through slurmdbd
  local storage="AccountingStorageType=accounting_storage/none"
  [ "$1" = 1 ] && storage="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
$ACCT_MUNGE"
  cat > "$CONF" <<CONF
ClusterName=$CLUSTER
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
$storage
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
}
echo "export SLURM_CONF=$CONF" > "$BASE/env.sh"
export SLURM_CONF=$CONF

# shellcheck source=accounting.sh
. "$HERE/accounting.sh"
if [ "$ACCT" = 1 ]; then
  write_conf 1  # sacctmgr reads the slurmdbd host and port from slurm.conf
  T_ACCT0=$(date +%s.%N)
  if acct_install "$UPDATED" && T_ACCT1=$(date +%s.%N) && acct_start; then
    T_ACCT2=$(date +%s.%N)
  else
    warn "job accounting is OFF: $ACCT_WHY. SLURM starts without slurmdbd; sacct will not work"
    acct_stop >/dev/null; ACCT=0
  fi
fi
[ "$ACCT" = 1 ] || write_conf 0

start_daemons() {
  slurmctld -f "$CONF"            # daemonizes; pid in $BASE/run/slurmctld.pid
  slurmd -f "$CONF" -N localhost  # -N: node name independent of the real hostname
  for _ in $(seq 120); do
    st=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    [ "$st" = idle ] && break
    sleep 0.25
  done
}
start_daemons
if [ "$ACCT" = 1 ] && ! acct_wait "slurmctld did not register with slurmdbd" 20 acct_registered
then
  warn "job accounting is OFF: $ACCT_WHY ($BASE/log/slurmctld.log). Restarting SLURM without it"
  stop_pid "$BASE/run/slurmd.pid" >/dev/null; stop_pid "$BASE/run/slurmctld.pid" >/dev/null
  acct_stop >/dev/null; ACCT=0
  rm -rf "$BASE/state"; mkdir -p "$BASE/state"; write_conf 0; start_daemons
fi
if [ "$st" != idle ]; then
  echo "slurm did not come up (node state: '${st:-none}')" >&2
  tail -20 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2; exit 1
fi
secs() { awk "BEGIN{printf \"%.1f\", $2 - $1}"; }
NOW=$(date +%s.%N)
if [ "$ACCT" = 1 ]; then
  ACCOUNTING="on (slurmdbd :$DBD_PORT, MariaDB :$DB_PORT): apt $(secs "$T_ACCT0" "$T_ACCT1")s,"
  ACCOUNTING+=" MariaDB + slurmdbd $(secs "$T_ACCT1" "$T_ACCT2")s"
else
  ACCOUNTING="OFF${ACCT_WHY:+ (WARNING above: $ACCT_WHY)}"
fi
echo "slurm up in $(secs "$T0" "$NOW")s, slurm apt $(secs "$T0" "$T_APT")s (auth=$AUTH cpus=$CPUS" \
     "mem=${MEM}M accounting $ACCOUNTING); source $BASE/env.sh"
