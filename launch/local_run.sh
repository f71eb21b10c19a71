#!/usr/bin/env bash
# Runs a stage as N JAX processes on this machine (CPU collectives over gloo), each with its own
# virtual devices: the multi-host code path (per-host data slices, global arrays assembled from
# per-host shards, coordinated checkpoint writes) without a cluster.
#
#   launch/local_run.sh N [DEVICES_PER_PROCESS] -- --gin_file=local/pretrain.gin [--gin_bindings=...]
#
# Logs go to ${LOG_DIR:-runs/local_run_logs}/process_<i>.log; process 0 also prints to the console.
set -euo pipefail
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,9p' "$0"; exit 2
fi
num_processes=$1; shift
devices_per_process=4
if [[ $# -gt 0 && "$1" != "--" ]]; then devices_per_process=$1; shift; fi
[[ $# -gt 0 && "$1" == "--" ]] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
port=${COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
log_dir=${LOG_DIR:-runs/local_run_logs}
mkdir -p "$log_dir"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for ((i = 0; i < num_processes; i++)); do
  env JAX_PLATFORMS=cpu JAX_NUM_PROCESSES="$num_processes" JAX_PROCESS_ID="$i" \
      JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" \
      XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process" \
      "$python" -m musicrl_jax.main "$@" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$log_dir/process_0.log" --pid "${pids[0]}" &
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
exit $status
