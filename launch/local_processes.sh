#!/usr/bin/env bash
# Runs one mms_jax program as N cooperating JAX processes on this machine (CPU), the
# way a pod slice or a cluster runs it, with 127.0.0.1 as the coordinator. Used by
# tests/test_launch.py; handy to try multi-host code paths on a laptop.
#
#   bash launch/local_processes.sh -n 4 -- --config=configs/pretrain.py:tiny --workdir=/tmp/mp4
#   bash launch/local_processes.sh -n 2 --devices-per-process 4 -- --config=... --workdir=...
#
# Every process gets the same arguments plus
#   --config.distributed.coordinator_address=127.0.0.1:PORT
#   --config.distributed.num_processes=N  --config.distributed.process_id=I
# and this environment (nothing else is changed):
#   JAX_PLATFORMS=cpu     the processes share this machine's CPU, never a GPU/TPU
#   XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=D"
#                         D simulated devices per process (--devices-per-process, default 1)
#
# Logs: process I writes to LOG_DIR/process_I.log (default LOG_DIR: <workdir>/logs);
# process 0's log is also copied to this terminal. Exit status: 0 when every process
# exited 0; otherwise the first failure's status, after the other processes were
# stopped (SIGTERM, then SIGKILL after MMS_KILL_GRACE seconds). SIGINT/SIGTERM sent to
# this script are passed on as SIGTERM: the trainers then agree on a step, save a
# checkpoint and exit 0, so rerunning the same command resumes.
#
# Environment read by this script:
#   MMS_PYTHON       interpreter (default: the repository's .venv/bin/python if present,
#                    else python3). Relative paths in MAIN_ARGS are relative to the
#                    current directory, as for `python -m mms_jax.main`.
#   MMS_KILL_GRACE   seconds between SIGTERM and SIGKILL when stopping processes (30)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo "Usage: $0 -n N [--devices-per-process D] [--port P] [--log-dir DIR] -- MAIN_ARGS..."
}

num_processes="" devices=1 port="" log_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--num-processes) num_processes="${2:?-n needs a number}"; shift 2 ;;
    --devices-per-process) devices="${2:?--devices-per-process needs a number}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    --log-dir) log_dir="${2:?--log-dir needs a directory}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unexpected argument '$1' (put program arguments after --)" >&2
       usage >&2; exit 2 ;;
  esac
done
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || ! [[ "$devices" =~ ^[1-9][0-9]*$ ]] \
    || [ $# -eq 0 ]; then
  echo "error: give -n N (N >= 1) and the program arguments after --" >&2
  usage >&2
  exit 2
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${MMS_PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
if [ -z "$port" ]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [ -z "$log_dir" ]; then
  workdir=""
  for arg in "$@"; do
    case "$arg" in --workdir=*) workdir="${arg#--workdir=}" ;; esac
  done
  log_dir="${workdir:-.}/logs"
fi
mkdir -p "$log_dir"

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"

pids=()
stop_all() {  # stop_all SIGNAL: sends it to every process still running
  for pid in "${pids[@]}"; do
    kill -s "$1" "$pid" 2>/dev/null || true
  done
}
on_signal() {
  echo "[local_processes] passing SIGTERM to ${#pids[@]} processes" >&2
  stop_all TERM
}
trap on_signal INT TERM

echo "[local_processes] $num_processes processes x $devices CPU devices, coordinator" \
     "127.0.0.1:$port, logs in $log_dir" >&2
for ((i = 0; i < num_processes; i++)); do
  cmd=("$python" -m mms_jax.main "$@"
       "--config.distributed.coordinator_address=127.0.0.1:$port"
       "--config.distributed.num_processes=$num_processes"
       "--config.distributed.process_id=$i")
  if [ "$i" -eq 0 ]; then
    "${cmd[@]}" > >(tee "$log_dir/process_0.log" >&2) 2>&1 &
  else
    "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

# Wait for all; on the first failure stop the rest (they would otherwise hang in a
# collective until the coordination service times out).
status=0 killer="" running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    code=0; wait "$pid" || code=$?
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$code
      echo "[local_processes] process pid $pid exited with $code; stopping the others" >&2
      stop_all TERM
      ( sleep "${MMS_KILL_GRACE:-30}"; stop_all KILL ) &
      killer=$!
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  [ ${#running[@]} -gt 0 ] && sleep 0.2
done
[ -n "$killer" ] && kill "$killer" 2>/dev/null || true
wait 2>/dev/null || true
exit "$status"
