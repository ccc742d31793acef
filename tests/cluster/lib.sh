# shellcheck shell=bash disable=SC2034  # variables are used by the scripts sourcing this
# Helpers shared by up, down, apiserver-start, apiserver-stop (sourced, not run).
# DIR/pids holds one "name pid starttime" line per process started; starttime
# (field 22 of /proc/PID/stat) guards against signalling a recycled pid.

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=$HERE/bin
STOP_TIMEOUT=${CLUSTER_STOP_TIMEOUT:-10}     # seconds between TERM and KILL
READY_TIMEOUT=${CLUSTER_READY_TIMEOUT:-120}  # seconds to wait for /readyz

die() { echo "cluster: $*" >&2; exit 1; }

# absdir DIR: print DIR as an absolute path (DIR must exist).
absdir() { (cd "$1" && pwd); }

# starttime PID: the process's start time in clock ticks; fails if gone or a zombie.
starttime() {
  local stat f
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  read -r -a f <<< "${stat##*) }"         # drop "pid (comm) "; f[0] = state, f[19] = starttime
  [ "${f[0]}" != Z ] && [ "${f[0]}" != X ] || return 1
  echo "${f[19]}"
}

# record DIR NAME PID: append to DIR/pids.
record() { echo "$2 $3 $(starttime "$3" || echo 0)" >> "$1/pids"; }

# is_ours PID STARTTIME: is the process still the one we started?
is_ours() { local st; st=$(starttime "$1") && [ "$st" = "$2" ]; }

# stop_pid PID STARTTIME: TERM, wait up to STOP_TIMEOUT, then KILL and wait.
stop_pid() {
  local pid=$1 st=$2 i
  is_ours "$pid" "$st" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    is_ours "$pid" "$st" || return 0
    sleep 0.1
  done
  echo "cluster: pid $pid ignored TERM for ${STOP_TIMEOUT}s, sending KILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    is_ours "$pid" "$st" || return 0
    sleep 0.1
  done
  echo "cluster: pid $pid still there after KILL" >&2
  return 1
}

# stop_named DIR NAME: stop the processes recorded under NAME and drop their lines.
stop_named() {
  local dir=$1 want=$2 name pid st rc=0 keep=""
  [ -f "$dir/pids" ] || return 0
  while read -r name pid st; do
    [ -n "$name" ] || continue
    if [ "$name" = "$want" ]; then
      stop_pid "$pid" "$st" || rc=1
    else
      keep+="$name $pid $st"$'\n'
    fi
  done < "$dir/pids"
  printf '%s' "$keep" > "$dir/pids"
  return $rc
}

# port_free PORT: no TCP socket of this network namespace uses PORT.
port_free() {
  local hex
  hex=$(printf ':%04X ' "$1")
  ! grep -qs "$hex" /proc/net/tcp /proc/net/tcp6
}

# free_port: a random unused port below the kernel's ephemeral range, so that
# outgoing connections never take it (the apiserver re-binds it on restart).
free_port() {
  local hi p i
  read -r hi _ < /proc/sys/net/ipv4/ip_local_port_range
  [ "$hi" -gt 12000 ] || hi=32768
  for ((i = 0; i < 1000; i++)); do
    p=$((10000 + (RANDOM * 32768 + RANDOM) % (hi - 10000)))
    if port_free "$p"; then echo "$p"; return 0; fi
  done
  die "no free port found"
}

# show_logs DIR [NAME...]: print the tail of DIR/NAME.log, or of every log in DIR.
show_logs() {
  local dir=$1 f files=()
  shift
  if [ $# -eq 0 ]; then files=("$dir"/*.log); else for f; do files+=("$dir/$f.log"); done; fi
  for f in "${files[@]}"; do
    [ -f "$f" ] || continue
    echo "===== $f (last 60 lines) =====" >&2
    tail -n 60 "$f" >&2
  done
}
