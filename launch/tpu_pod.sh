#!/usr/bin/env bash
# Run the same training command on every host of a Cloud TPU VM pod slice (multi-controller JAX).
# jax.distributed.initialize() detects the pod by itself (config.distributed.mode='auto'); use a gs://
# workdir so all hosts share checkpoints. Preemption (maintenance events) sends SIGTERM: the run saves
# the current step and exits 0; re-running this script resumes from the workdir.
#
# Usage: launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- <main.py flags>
#   launch/tpu_pod.sh my-v5p-64 us-east5-a my-proj -- --config=configs/unifluid_2b.py \
#       --workdir=gs://my-bucket/runs/u2b --config.mesh.fsdp=-1
# Env: REPO_DIR (path of this repo on the VMs, default ~/unifluid_jax), SETUP=1 to (re)install first.
set -euo pipefail
TPU=$1; ZONE=$2; shift 2
PROJECT_FLAG=()
if [[ $# -gt 0 && "$1" != "--" ]]; then PROJECT_FLAG=(--project="$1"); shift; fi
[[ "${1:-}" == "--" ]] && shift
REPO_DIR=${REPO_DIR:-'~/unifluid_jax'}
ARGS=$(printf '%q ' "$@")
SETUP_CMD=""
if [[ "${SETUP:-0}" == "1" ]]; then
  SETUP_CMD="cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]' && .venv/bin/pip install -q --no-deps -e . && "
fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
  --command="${SETUP_CMD}cd $REPO_DIR && .venv/bin/python -m unifluid_jax.main $ARGS 2>&1 | tee -a /tmp/unifluid_train.log"
