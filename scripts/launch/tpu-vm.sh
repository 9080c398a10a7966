#!/usr/bin/env bash
# Train on every worker of a Cloud TPU slice (a TPU VM pod slice such as v5p-32: 4 workers x 4 chips).
#
# NOT RUN on a real TPU slice: a recipe written against the gcloud and JAX documentation and JAX's source.
#
#   scripts/launch/tpu-vm.sh setup    # once: code + dependencies + shared filesystem on every worker
#   scripts/launch/tpu-vm.sh train    # start train.py on every worker, in the background (nohup)
#   scripts/launch/tpu-vm.sh log      # follow worker 0's output (only process 0 prints)
#   scripts/launch/tpu-vm.sh stop     # SIGTERM on every worker: a checkpoint is saved, then exit 143
#
# Every worker runs the same command. No --coordinator-address: on a Cloud TPU VM granite_jax calls
# jax.distributed.initialize(), which reads the worker list and this worker's number from the TPU VM's
# metadata server (JAX's GceTpuCluster). Re-running `train` resumes from the newest checkpoint in RUN_DIR.
set -euo pipefail

TPU_NAME=my-tpu-slice                 # gcloud compute tpus tpu-vm create $TPU_NAME --accelerator-type=v5p-32 ...
ZONE=us-east5-a
PROJECT=my-project
REPO_URL=https://github.com/YOUR_ORG/granite_jax.git
COMMIT=main                           # the same code on every worker: pin a commit for real runs
REPO_DIR='~/granite_jax'              # on each worker (quoted: expanded there)
# Shared storage for the config and data, mounted at the same path on every worker: a Filestore (NFS) share, or
# a bucket with Cloud Storage FUSE (gcsfuse). RUN_DIR may be the mount or a gs:// URL (docs/checkpoints.md#object-storage).
# Checkpoints are written by all workers together.
NFS_EXPORT=10.0.0.2:/granite          # Filestore IP:/share (or replace the mount line in setup with gcsfuse)
SHARED=/mnt/shared
CONFIG=$SHARED/configs/my-run.yaml    # the same config on every worker; its data paths on SHARED too
RUN_DIR=$SHARED/runs/my-run
OVERRIDES=""                          # e.g. "steps=20000 mesh={fsdp: 16}"

on_all_workers() {  # run a shell command on every worker of the slice, at the same time
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$1"
}

case "${1:-}" in
  setup)
    on_all_workers "set -e
      sudo mkdir -p $SHARED && (mountpoint -q $SHARED || sudo mount -t nfs $NFS_EXPORT $SHARED)
      [ -d $REPO_DIR ] || git clone $REPO_URL $REPO_DIR
      cd $REPO_DIR && git fetch -q && git checkout -q $COMMIT
      pip install -q -r requirements.txt -r benchmarks/requirements-tpu.txt  # jax and the libtpu it pins"
    ;;
  train)
    # nohup: the run outlives the ssh session. Each worker keeps its own output in ~/granite-train.log and
    # its pid in ~/granite-train.pid (for `stop`).
    on_all_workers "cd $REPO_DIR && nohup python3 train.py --config $CONFIG run_dir=$RUN_DIR $OVERRIDES \
      > ~/granite-train.log 2>&1 < /dev/null & echo \$! > ~/granite-train.pid"
    ;;
  log)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=0 \
      --command="tail -f ~/granite-train.log"
    ;;
  stop)
    on_all_workers 'kill -TERM "$(cat ~/granite-train.pid)"'
    ;;
  *)
    echo "usage: $0 setup|train|log|stop   (edit the variables at the top first)" >&2
    exit 2
    ;;
esac
