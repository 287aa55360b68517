#!/usr/bin/env bash
# A data set attributed by a SLURM job array: each array task computes one shard of the rows, alone.
#
#   sbatch examples/slurm_array.sh prompts.jsonl runs/capitals          # 8 tasks, one GPU each
#   gim-fast status runs/capitals                                       # rows done and missing per shard
#
# Every task runs the same command. gim-fast attribute takes its shard from SLURM_ARRAY_TASK_ID,
# SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT (here task k of 0-7 computes shard k of 8); no task waits for or
# talks to another (no process group, no shared clock), they only write their own Parquet files into the same
# OUT folder (a file system all nodes see). A task that is preempted or fails is requeued (--requeue) or resubmitted
# (sbatch --array=K ...): it computes only what its shard is missing. The task that finishes last marks the job
# complete; `gim-fast status OUT` exits 0 only then. The shards are a fixed split of the plan, so run every task of
# one job with the same options (the same --array range, model, settings, batching).
#
# Beside it, for one multi-GPU job instead of independent tasks (one process per GPU, a gloo barrier at the end):
#   torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \
#            -m gim_fast attribute --data prompts.jsonl --out runs/capitals
#
#SBATCH --job-name=gim-attribute
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

DATA=${1:?usage: sbatch examples/slurm_array.sh DATA OUT [extra gim-fast attribute options]}
OUT=${2:?usage: sbatch examples/slurm_array.sh DATA OUT [extra gim-fast attribute options]}
shift 2

# The same as --shard $((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))/$SLURM_ARRAY_TASK_COUNT, given explicitly.
# A model bigger than the task's GPU: add --device-map auto --max-memory 0=70GiB,cpu=100GiB --offload-folder DIR.
gim-fast attribute --data "$DATA" --out "$OUT" --no-progress "$@"
gim-fast status "$OUT" || true          # this task's view: the other shards may still be running
