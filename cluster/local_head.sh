#!/bin/bash
# A Ray head on this machine for development, with token authentication, on free ports, dashboard and job
# server on loopback only.
#
#   cluster/local_head.sh start [--dir DIR] [--num-cpus N]   # prints the client environment; source it:
#   eval "$(cluster/local_head.sh env)"
#   ray job submit --working-dir . -- python -m t2i_dist.train --config ldm-tiny
#   cluster/local_head.sh stop [--dir DIR]
#
# DIR (default ${T2I_RAY_HEAD_DIR:-$HOME/.cache/t2i_dist/ray-head}) keeps the head's PID, ports, log and
# its token (auth_token, mode 600). `stop` ends exactly the `ray start` process recorded there, which takes
# its own Ray processes down with it: other Ray clusters on the machine are left alone (no `ray stop`).
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

command=${1:-}
[[ -n "$command" ]] || usage
shift
dir=${T2I_RAY_HEAD_DIR:-$HOME/.cache/t2i_dist/ray-head}
num_cpus=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --num-cpus) num_cpus=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
done

die() {
  echo "error: $*" >&2
  exit 1
}

running_pid() {
  local pid
  [[ -f "$dir/head.pid" ]] || return 1
  pid=$(cat "$dir/head.pid")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

print_env() {
  [[ -f "$dir/ports" ]] || die "no head recorded in $dir; run: $0 start --dir $dir"
  # shellcheck source=/dev/null
  source "$dir/ports"
  cat <<EOF
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$dir/auth_token
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port
export RAY_ADDRESS=127.0.0.1:$gcs_port
EOF
}

start() {
  command -v ray >/dev/null || die "ray is not on PATH: activate the environment with t2i_dist first"
  if pid=$(running_pid); then
    die "a head is already running from $dir (PID $pid); stop it with: $0 stop --dir $dir"
  fi
  mkdir -p "$dir"
  chmod 700 "$dir"
  if [[ ! -s "$dir/auth_token" ]]; then
    (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "$dir/auth_token")
  fi

  # Every port Ray would otherwise take at a fixed default, so a second head (another user, a test) fits.
  read -r gcs_port dashboard_port client_port agent_http_port agent_grpc_port metrics_port \
    runtime_env_port node_manager_port object_manager_port < <(python - <<'EOF'
import socket
sockets = [socket.socket() for _ in range(9)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
for s in sockets:
    s.close()
EOF
  )
  cat > "$dir/ports" <<EOF
gcs_port=$gcs_port
dashboard_port=$dashboard_port
EOF
  # Short and per-head: Ray's unix socket paths below it are limited to 107 bytes.
  local temp_dir
  temp_dir="${TMPDIR:-/tmp}/t2i-ray-$(id -u)-$gcs_port"
  local args=(
    --head --block --disable-usage-stats
    --node-ip-address=127.0.0.1
    --port="$gcs_port"
    --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port"
    --ray-client-server-port="$client_port"
    --dashboard-agent-listen-port="$agent_http_port" --dashboard-agent-grpc-port="$agent_grpc_port"
    --metrics-export-port="$metrics_port" --runtime-env-agent-port="$runtime_env_port"
    --node-manager-port="$node_manager_port" --object-manager-port="$object_manager_port"
    --temp-dir="$temp_dir"
  )
  [[ -z "$num_cpus" ]] || args+=(--num-cpus="$num_cpus")

  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$dir/auth_token" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
    nohup ray start "${args[@]}" > "$dir/head.log" 2>&1 < /dev/null &
  echo $! > "$dir/head.pid"
  echo "temp_dir=$temp_dir" >> "$dir/ports"

  # Ready once the job server answers an authenticated request.
  eval "$(print_env)"
  local deadline=$((SECONDS + ${T2I_RAY_HEAD_WAIT_S:-120}))
  until ray job list > /dev/null 2>&1; do
    running_pid > /dev/null || die "ray start exited; see $dir/head.log"
    ((SECONDS < deadline)) || { stop; die "the head did not answer in time; see $dir/head.log"; }
    sleep 1
  done
  echo "# Ray head up (PID $(cat "$dir/head.pid")), dashboard http://127.0.0.1:$dashboard_port" >&2
  print_env
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    echo "no running head recorded in $dir" >&2
    rm -f "$dir/head.pid"
    return 0
  fi
  kill -TERM "$pid" # `ray start --block` stops the processes it started, then exits
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "head (PID $pid) still running after 30 s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # shellcheck source=/dev/null
  source "$dir/ports"
  [[ -z "${temp_dir:-}" ]] || rm -rf "$temp_dir"
  rm -f "$dir/head.pid"
  echo "# Ray head (PID $pid) stopped" >&2
}

case "$command" in
  start) start ;;
  stop) stop ;;
  env) print_env ;;
  *) usage ;;
esac
