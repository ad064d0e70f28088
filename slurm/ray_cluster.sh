# shellcheck shell=bash
# Sourced by train.sbatch and evaluate.sbatch: `t2i_run_on_ray COMMAND...` starts a Ray cluster over the
# job's nodes (head on the first, one worker per other node, each a Slurm step running ray_node.sh), runs
# COMMAND on the first node with RAY_ADDRESS pointing at it, stops Ray on every node and returns COMMAND's
# exit code.
#
# Knobs (environment; sbatch passes the submitting shell's environment on):
#   --cpus-per-task / --gpus-per-task   Ray's CPUs and GPUs per node (one task per node; no GPUs means 0)
#   RAY_AUTH_TOKEN                      the cluster's token; a fresh one is made per job when unset
#   T2I_RAY_PORT_BASE                   first of 100 ports used by this job (default: from the job id)
#   T2I_RAY_TMPDIR                      node-local directory for Ray's session files (default /tmp)
#   T2I_RAY_WAIT_S                      how long nodes may take to join (default 300)
#   MLFLOW_TRACKING_URI, AWS_*          passed through to the driver and, by t2i_dist, to the workers

t2i_ray_lib_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

t2i_log() { echo "[t2i_dist slurm] $*" >&2; }

t2i_die() {
  t2i_log "error: $*"
  exit 2
}

# Count from a Slurm GPU spec: "" -> 0, "4" -> 4, "a100:4" -> 4.
t2i_gpu_count() {
  local spec="${1:-}"
  spec="${spec##*:}"
  [[ -z "$spec" ]] && spec=0
  [[ "$spec" =~ ^[0-9]+$ ]] || t2i_die "cannot read a GPU count from '$1' (use --gpus-per-task=N)"
  echo "$spec"
}

# The address other nodes reach NODE at: its NodeAddr, resolved to an IPv4 address when it is a name.
t2i_node_ip() {
  local addr
  addr=$(scontrol show node "$1" -o | grep -oE 'NodeAddr=[^ ]+' | cut -d= -f2)
  [[ -n "$addr" ]] || t2i_die "scontrol does not know node $1"
  if [[ ! "$addr" =~ ^[0-9.]+$ ]]; then
    addr=$(getent ahostsv4 "$addr" | awk 'NR == 1 {print $1}')
    [[ -n "$addr" ]] || t2i_die "cannot resolve node $1's address"
  fi
  echo "$addr"
}

# Ray's ports for this job: 100 consecutive ports from a base derived from the job id, so two jobs (or two
# users) sharing a node do not collide. Exports T2I_RAY_PORT_* for ray_node.sh.
t2i_assign_ports() {
  local base="${T2I_RAY_PORT_BASE:-$((10000 + (SLURM_JOB_ID % 500) * 100))}"
  export T2I_RAY_PORT_GCS=$base
  export T2I_RAY_PORT_DASHBOARD=$((base + 1))
  export T2I_RAY_PORT_NODE_MANAGER=$((base + 2))
  export T2I_RAY_PORT_OBJECT_MANAGER=$((base + 3))
  export T2I_RAY_PORT_AGENT_GRPC=$((base + 4))
  export T2I_RAY_PORT_AGENT_HTTP=$((base + 5))
  export T2I_RAY_PORT_METRICS=$((base + 6))
  export T2I_RAY_PORT_RUNTIME_ENV=$((base + 7))
  export T2I_RAY_PORT_CLIENT=$((base + 8))
  export T2I_RAY_PORT_WORKER_MIN=$((base + 20))
  export T2I_RAY_PORT_WORKER_MAX=$((base + 99))
}

# Token authentication is on for every node and client of this cluster. The token travels in the job's
# environment (readable only by the job's user), never in a file on shared storage.
t2i_ensure_token() {
  export RAY_AUTH_MODE=token
  if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
    RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
    export RAY_AUTH_TOKEN
  fi
}

t2i_wait_for_nodes() {
  python "$t2i_ray_lib_dir/wait_for_nodes.py" --address "$RAY_ADDRESS" --nodes "$1" \
    --timeout "${T2I_RAY_WAIT_S:-300}"
}

# Signal every step of the job but the batch script itself (scancel's default): each ray_node.sh stops
# its own Ray node and cleans up. Killing srun instead would make Slurm SIGKILL the step at once.
t2i_stop_ray() {
  local pid
  ((${#t2i_ray_step_pids[@]})) || return 0
  scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true
  local deadline=$((SECONDS + ${T2I_RAY_STOP_WAIT_S:-60}))
  for pid in "${t2i_ray_step_pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
    kill -TERM "$pid" 2>/dev/null || true # still up: srun then has Slurm kill the whole step
    wait "$pid" 2>/dev/null || true
  done
  t2i_ray_step_pids=()
}

t2i_run_on_ray() {
  [[ -n "${SLURM_JOB_ID:-}" ]] || t2i_die "run this through sbatch (SLURM_JOB_ID is not set)"
  [[ $# -gt 0 ]] || t2i_die "t2i_run_on_ray needs a command"
  command -v ray >/dev/null || t2i_die "ray is not on PATH: activate the environment with t2i_dist before sbatch"

  local nodes head num_nodes
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  num_nodes=${#nodes[@]}
  head=${nodes[0]}
  export T2I_RAY_HEAD_IP T2I_RAY_NUM_CPUS T2I_RAY_NUM_GPUS
  T2I_RAY_HEAD_IP=$(t2i_node_ip "$head")
  T2I_RAY_NUM_CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
  T2I_RAY_NUM_GPUS=$(t2i_gpu_count "${SLURM_GPUS_PER_TASK:-}")
  t2i_assign_ports
  t2i_ensure_token
  export RAY_ADDRESS="$T2I_RAY_HEAD_IP:$T2I_RAY_PORT_GCS"

  t2i_log "job $SLURM_JOB_ID: $num_nodes node(s) ${nodes[*]}; head $RAY_ADDRESS;" \
    "$T2I_RAY_NUM_CPUS CPU(s) and $T2I_RAY_NUM_GPUS GPU(s) per node"
  local tracking_uri=${MLFLOW_TRACKING_URI:-<unset>}
  tracking_uri=${tracking_uri/\/\/*@/\/\/} # drop user:password@ if the URI carries one
  t2i_log "MLFLOW_TRACKING_URI=$tracking_uri AWS_ENDPOINT_URL=${AWS_ENDPOINT_URL:-<unset>}" \
    "AWS credentials $([[ -n "${AWS_ACCESS_KEY_ID:-}" ]] && echo set || echo unset)"

  t2i_ray_step_pids=()
  trap t2i_stop_ray EXIT
  # --overlap lets the driver's own srun calls (if any) and these long-lived steps share the allocation.
  srun --overlap --nodes=1 --ntasks=1 --nodelist="$head" \
    bash "$t2i_ray_lib_dir/ray_node.sh" head &
  t2i_ray_step_pids+=($!)
  t2i_wait_for_nodes 1
  if ((num_nodes > 1)); then
    srun --overlap --nodes=$((num_nodes - 1)) --ntasks=$((num_nodes - 1)) --ntasks-per-node=1 \
      --exclude="$head" bash "$t2i_ray_lib_dir/ray_node.sh" worker &
    t2i_ray_step_pids+=($!)
    t2i_wait_for_nodes "$num_nodes"
  fi

  local rc=0
  "$@" || rc=$?
  t2i_log "driver exited with code $rc; stopping Ray on all nodes"
  t2i_stop_ray
  trap - EXIT
  return "$rc"
}
