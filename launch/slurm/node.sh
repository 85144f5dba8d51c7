#!/usr/bin/env bash
# One node of a qwen3kd SLURM job (launch/slurm/qwen3kd.sbatch runs it once per node with srun):
# torch.distributed.run with the node's processes, static rendezvous on the first node.
#   node.sh PYTHON NPROC COMMAND CONFIG [key=value …]
# USR1 (forwarded by srun from the batch script) goes to the ranks only: the agent itself would
# die of it, and kill them with it. The agent runs in a process group of its own, so a signal to
# this task's group cannot reach it either.
set -uo pipefail
python=$1 nproc=$2
shift 2
setsid "$python" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" \
  --node_rank="$SLURM_NODEID" --nproc_per_node="$nproc" --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" -m qwen3kd.cli "$@" &
agent=$!
trap 'pkill -USR1 -P $agent' USR1
trap 'kill -TERM $agent 2>/dev/null' TERM
rc=0
wait $agent || rc=$?
while kill -0 $agent 2>/dev/null; do  # a trapped signal interrupted `wait`
  rc=0
  wait $agent || rc=$?
done
exit $rc
