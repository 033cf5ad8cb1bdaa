# Stopping a daemon by its PID file (sourced by start.sh, stop.sh and accounting.sh).
stop_pid() {  # $1 = pidfile, $2 = tries 0.25 s apart before SIGKILL (default 40)
  [ -f "$1" ] || return 0
  local p tries=${2:-40}
  p=$(cat "$1")
  kill -TERM "$p" 2>/dev/null || { rm -f "$1"; return 0; }
  for _ in $(seq "$tries"); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$p" 2>/dev/null && kill -KILL "$p"
  rm -f "$1"; echo "stopped pid $p ($1)"
}
