#!/usr/bin/env bash
# Launch `qwen3kd train` on N local processes (one node). Hyper-parameters live in the config.
#   launch/torchrun.sh NPROC CONFIG [key=value ...]
# Multi-node: run it on every node with NNODES, NODE_RANK and MASTER_ADDR set (on SLURM:
# launch/slurm/qwen3kd.sbatch does that). It runs the project's interpreter (.venv, made by
# `make demo` / `make test`), or QWEN3KD_PYTHON, or python3 of an environment you activated.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC CONFIG [key=value ...]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
python=${QWEN3KD_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=$(command -v python3); fi
fi
nproc=$1; shift
# One intra-op thread per rank unless the caller says otherwise: ranks share the node's cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$python" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$nproc" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m qwen3kd.cli train "$@"
