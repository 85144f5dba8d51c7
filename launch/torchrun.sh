#!/usr/bin/env bash
# Launch `qwen3kd train` on N local processes (one node). Hyper-parameters live in the config.
#   launch/torchrun.sh NPROC CONFIG [key=value ...]
# Multi-node: run it on every node with NNODES, NODE_RANK and MASTER_ADDR set.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC CONFIG [key=value ...]" >&2
  exit 2
fi
nproc=$1; shift
# One intra-op thread per rank unless the caller says otherwise: ranks share the node's cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$nproc" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m qwen3kd.cli train "$@"
