#!/usr/bin/env bash
# One node, N GPUs:  bash scripts/launch_multi_gpu.sh N [RECIPE.yaml] [key=value ...]
set -euo pipefail
NGPU=${1:?number of GPUs}; shift
exec accelerate launch --config_file "$(dirname "$0")/accelerate_multi_gpu.yaml" \
  --num_processes "$NGPU" -m pipeline.cli run "$@"
