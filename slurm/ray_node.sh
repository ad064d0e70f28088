#!/bin/bash
# One Ray node, run by srun as a job step task: `ray_node.sh head|worker`. Runs `ray start --block` in the
# job's own port range and temp directory, and on SIGTERM (sent when the driver is done or the job is
# cancelled) stops exactly the Ray processes it started, then removes its temp directory. Never `ray stop`:
# that kills every Ray process of the user on the node, including other jobs'.
set -euo pipefail

role=${1:?usage: ray_node.sh head|worker}
# shellcheck source=slurm/ray_cluster.sh
source "$(dirname "${BASH_SOURCE[0]}")/ray_cluster.sh"
# Node-local and short: Ray's unix sockets live below it and paths are limited to 107 bytes.
# (SLURM_NODEID counts within this step, so the role keeps head and worker directories apart.)
tmp="${T2I_RAY_TMPDIR:-/tmp}/ray-${SLURM_JOB_ID}-${role}${SLURM_NODEID}"

# Gloo (CPU collectives) picks its interface from the hostname, which on multi-homed nodes may resolve to
# the wrong network (or loopback); use the one carrying Slurm's address for this node, as Ray does.
node_ip=$(t2i_node_ip "$SLURMD_NODENAME")
if [[ -z "${GLOO_SOCKET_IFNAME:-}" ]] && command -v ip >/dev/null; then
  GLOO_SOCKET_IFNAME=$(ip -o -4 addr show | awk -v ip="$node_ip" 'index($4, ip "/") == 1 {print $2; exit}')
  if [[ -n "$GLOO_SOCKET_IFNAME" && "$GLOO_SOCKET_IFNAME" != lo ]]; then
    export GLOO_SOCKET_IFNAME
  else
    unset GLOO_SOCKET_IFNAME
  fi
fi

args=(
  --block
  --temp-dir="$tmp"
  --num-cpus="$T2I_RAY_NUM_CPUS"
  --num-gpus="$T2I_RAY_NUM_GPUS"
  --node-manager-port="$T2I_RAY_PORT_NODE_MANAGER"
  --object-manager-port="$T2I_RAY_PORT_OBJECT_MANAGER"
  --dashboard-agent-grpc-port="$T2I_RAY_PORT_AGENT_GRPC"
  --dashboard-agent-listen-port="$T2I_RAY_PORT_AGENT_HTTP"
  --metrics-export-port="$T2I_RAY_PORT_METRICS"
  --runtime-env-agent-port="$T2I_RAY_PORT_RUNTIME_ENV"
  --min-worker-port="$T2I_RAY_PORT_WORKER_MIN"
  --max-worker-port="$T2I_RAY_PORT_WORKER_MAX"
  --disable-usage-stats
  --node-ip-address="$node_ip" # the address Slurm knows the node by, so all nodes agree on it
)
if [[ -n "${SLURM_MEM_PER_NODE:-}" ]]; then
  # Ray sizes its object store from the machine's memory; on a shared node use the job's share (MB).
  args+=(--object-store-memory=$((SLURM_MEM_PER_NODE * 1024 * 1024 * 3 / 10)))
fi
if [[ "$role" == head ]]; then
  args+=(
    --head
    --port="$T2I_RAY_PORT_GCS"
    --ray-client-server-port="$T2I_RAY_PORT_CLIENT"
    --dashboard-port="$T2I_RAY_PORT_DASHBOARD"
    --dashboard-host=127.0.0.1 # reach it through `ssh -L`; it never listens on the cluster network
  )
else
  args+=(--address="$T2I_RAY_HEAD_IP:$T2I_RAY_PORT_GCS")
fi

# Ray drains a node for up to 30 s on SIGTERM (for serving); a finished batch job has nothing to drain.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
ray start "${args[@]}" &
ray_pid=$!
stopping=0
trap 'stopping=1; kill -TERM "$ray_pid" 2>/dev/null || true' TERM INT
status=0
wait "$ray_pid" || status=$?
# The first wait returns when the trap fires; the second waits for Ray's own shutdown to finish.
wait "$ray_pid" 2>/dev/null || true
rm -rf "$tmp"
((stopping)) && exit 0 # asked to stop: a clean end, whatever signal status Ray reported
exit "$status"
