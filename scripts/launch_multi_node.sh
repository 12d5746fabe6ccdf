#!/usr/bin/env bash
# Several nodes with torchrun. Run the same line on every node:
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node0 host> GPUS_PER_NODE=8 bash scripts/launch_multi_node.sh RECIPE.yaml [key=value ...]
# Every node must see the same data root and output_dir (shared filesystem); rank 0 alone logs to MLflow.
# Checkpoints live in output_dir: run the same line again after a failure and it resumes.
# FSDP (ViT-L/H): add run.fsdp=true.
set -euo pipefail
exec torchrun --nnodes "${NNODES:?}" --node_rank "${NODE_RANK:?}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" \
  -m pipeline.cli run "$@"
