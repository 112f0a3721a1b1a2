#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice (e.g. v5p-64): the same command runs on all
# workers; jax.distributed.initialize() finds the pod topology itself (MMJAX_DISTRIBUTED=auto).
#
#   TPU_NAME=my-pod ZONE=us-east5-a WORKDIR=gs://bucket/runs/x \
#     scripts/launch_tpu_pod.sh --config configs/default.py --config.parallel.mode=mesh
#
# WORKDIR must be storage every host sees (a GCS bucket or a shared filesystem): checkpoints are
# written collectively and only process 0 writes metrics.jsonl. The repo is expected at ~/mmjax
# on every worker (copy it with `gcloud compute tpus tpu-vm scp --worker=all`).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ~/mmjax && pip install -q -e . 'jax[tpu]' &&
  MMJAX_DISTRIBUTED=auto python -m mmjax.train --workdir $WORKDIR $ARGS"
