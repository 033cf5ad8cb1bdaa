# Job accounting for the localhost SLURM (sourced by start.sh): a private MariaDB instance and
# slurmdbd, both under $BASE, so that `sacct` / `sacctmgr` work. Debian 12: slurmdbd 22.05 +
# mariadb-server 10.11. Nothing here is fatal: acct_start returns non-zero with the reason in
# ACCT_WHY, and start.sh then runs SLURM without accounting.
# Needs from start.sh: BASE, AUTH, SOCK (munge socket), CLUSTER; SLURM_CONF exported.
DBD_PORT=${SLURMDBD_PORT:-6819}
DB_PORT=${SLURM_DB_PORT:-6820}  # not 3306: a system MariaDB may already listen there
DB=$BASE/mysql
ACCT_WHY=

acct_fail() { ACCT_WHY=$1; return 1; }

acct_install() {  # the packages, if missing; apt-get update already ran when $1 = updated
  command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null && return 0
  [ "${1:-}" = updated ] || apt-get update -qq || true
  # policy-rc.d (Docker images) keeps the package's own MariaDB service from starting; on a
  # machine with systemd it starts on port 3306 and is left alone.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmdbd mariadb-server >"$BASE/log/apt-accounting.log" 2>&1 \
    || acct_fail "apt-get install slurmdbd mariadb-server failed ($BASE/log/apt-accounting.log)"
}

# $1 = what, $2 = seconds, rest = a command that succeeds when ready; each try is bounded by
# `timeout` in the caller (a client may block for seconds, e.g. on an unusable munge socket).
acct_wait() {
  local what=$1 seconds=$2 deadline=$((SECONDS + $2)); shift 2
  while [ "$SECONDS" -lt "$deadline" ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  acct_fail "$what (waited $seconds s)"
}

acct_start_db() {  # a fresh data directory every start: the job ids restart at 1 with the state
  rm -rf "$DB"; mkdir -p "$DB/data"; chown -R mysql:mysql "$DB"
  mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" --skip-test-db \
      --auth-root-authentication-method=socket --skip-name-resolve \
      >"$BASE/log/mariadb-install.log" 2>&1 \
    || acct_fail "mariadb-install-db failed ($BASE/log/mariadb-install.log)" || return 1
  # Lock timeout as slurmdbd recommends; its "innodb_buffer_pool_size not recommended" (it wants
  # a share of the RAM) is harmless at this scale and left. No TCP but on 127.0.0.1.
  setsid mariadbd --no-defaults --user=mysql --datadir="$DB/data" --socket="$DB/mysqld.sock" \
      --pid-file="$DB/mysqld.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
      --skip-name-resolve --log-error="$DB/mariadb.log" --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
  echo $! >"$BASE/run/mariadbd.pid"  # mariadbd's own pid: setsid execs in place (no fork)
  acct_wait "MariaDB did not answer on $DB/mysqld.sock ($DB/mariadb.log)" 30 \
      timeout 5 mariadb-admin --no-defaults --socket="$DB/mysqld.sock" ping || return 1
  # (Its log lies in $DB, not $BASE/log: mariadbd runs as mysql.) Root logs in through the
  # socket (unix_socket auth); slurmdbd with a password over TCP.
  DB_PASS=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  local sql="CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  mariadb --no-defaults --socket="$DB/mysqld.sock" -u root <<<"$sql" \
      >"$BASE/log/mariadb-setup.log" 2>&1 \
    || acct_fail "creating the database and its user failed ($BASE/log/mariadb-setup.log)"
}

acct_start_dbd() {  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF
  local conf
  conf=$(dirname "$SLURM_CONF")/slurmdbd.conf
  rm -f "$conf"
  # 0600 and owned by its SlurmUser (root, as in slurm.conf): slurmdbd refuses anything else,
  # and the file holds the database password.
  (umask 077; cat >"$conf" <<CONF
AuthType=${ACCT_AUTHTYPE}
${ACCT_AUTHINFO}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
  )
  chown root:root "$conf"; chmod 600 "$conf"
  slurmdbd </dev/null >"$BASE/log/slurmdbd.stderr" 2>&1 \
    || acct_fail "slurmdbd did not start ($BASE/log/slurmdbd.log, slurmdbd.stderr)" || return 1
  # The first start creates the schema (tens of tables): give it a while.
  acct_wait "slurmdbd did not answer sacctmgr on port $DBD_PORT ($BASE/log/slurmdbd.log)" 60 \
      timeout 10 sacctmgr -n -P show cluster
}

acct_register() {  # the cluster (with it root's association) and the test users' associations
  local users=root log=$BASE/log/sacctmgr.log
  [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && users="root,$SUDO_USER"
  { timeout 20 sacctmgr -i add cluster "$CLUSTER" &&
    timeout 20 sacctmgr -i add account tests Cluster="$CLUSTER" Description=ci Organization=ci &&
    timeout 20 sacctmgr -i add user "$users" Account=tests DefaultAccount=tests Cluster="$CLUSTER"
  } >"$log" 2>&1 || acct_fail "sacctmgr could not register cluster $CLUSTER ($log)" || return 1
  [ -n "$(timeout 10 sacctmgr -n -P show assoc cluster="$CLUSTER" user=root format=account)" ] \
    || acct_fail "no association for root on cluster $CLUSTER ($log)"
}

acct_start() {  # 0: slurmdbd is up and the cluster registered; else ACCT_WHY says why
  acct_start_db && acct_start_dbd && acct_register
}

acct_registered() {  # slurmctld has reached slurmdbd: the cluster row names its host
  [ -n "$(timeout 10 sacctmgr -n -P show cluster "$CLUSTER" format=controlhost 2>/dev/null)" ]
}

acct_stop() {  # the accounting daemons only (start.sh's fallback); stop.sh stops everything
  stop_pid "$BASE/run/slurmdbd.pid"
  stop_pid "$BASE/run/mariadbd.pid" 120  # InnoDB shutdown: seconds
}
