#!/usr/bin/env bash
# Multi-controller JAX on one machine: N processes x D fake CPU devices, joined on 127.0.0.1.
# Usage: launch/local_multiprocess.sh [NUM_PROCESSES=2] [DEVICES_PER_PROCESS=4] -- <main.py flags>
#   launch/local_multiprocess.sh 2 4 -- --config=configs/lm_tiny.py --workdir=/tmp/lm_mp \
#       --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2
# Logs: <workdir>/launch.p<i>.log (process 0 also prints to the console).
# SIGTERM / SIGINT are forwarded to every process (preemption: each saves the same step), the launcher waits
# for all of them, and exits with the worst (highest) status of any process.
set -euo pipefail
NPROC=${1:-2}; NDEV=${2:-4}
shift 2 || true
[[ "${1:-}" == "--" ]] && shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PORT=${PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
WORKDIR=$(printf '%s\n' "$@" | sed -n 's/^--workdir=//p' | tail -1)
LOGDIR=${WORKDIR:-/tmp}; mkdir -p "$LOGDIR"
pids=()
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward INT TERM   # set before starting: a signal during the launch reaches the processes started so far
for ((i = 0; i < NPROC; i++)); do
  env XLA_FLAGS="--xla_force_host_platform_device_count=$NDEV" JAX_PLATFORMS=cpu \
      JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$NPROC" JAX_PROCESS_ID="$i" \
      "$PY" -m unifluid_jax.main "$@" >"$LOGDIR/launch.p$i.log" 2>&1 &
  pids+=($!)
done
tail -f "$LOGDIR/launch.p0.log" --pid="${pids[0]}" &
tailpid=$!
rc=0
for p in "${pids[@]}"; do
  # A trapped signal interrupts `wait` while the process still runs (it is saving): wait again until it ends.
  while kill -0 "$p" 2>/dev/null; do wait "$p" || true; done
  c=0; wait "$p" || c=$?   # the ended process's own status (bash keeps it)
  (( c > rc )) && rc=$c
done
kill "$tailpid" 2>/dev/null || true
exit $rc
