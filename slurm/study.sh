#!/bin/bash
# A study (`vipamin-scale study`) on every GPU of the allocation: one worker per GPU on every node.
#
#   sbatch --nodes=4 --gpus-per-node=8 slurm/study.sh study=prompt_length model=vit_h14 \
#       model.checkpoint=/ckpt/mae_vith14.pth data=shards data.root=/data/cifar100
#   vipamin-scale study --status runs/study-<job id>         (its progress, while it runs or after)
#
# srun starts WORKERS_PER_NODE tasks on each node (default: the node's GPUs, or 1 on a CPU node), each
# `vipamin-scale study` as worker RANK = SLURM_PROCID of WORLD_SIZE = SLURM_NTASKS, on GPU LOCAL_RANK =
# SLURM_LOCALID. There is no process group: every worker plans the same selection rounds, claims the next pack
# no one holds (the run directories' locks are the claims; a pack is K runs side by side over one frozen
# backbone on that one GPU), trains it alone, and claims again; at the end of a round the workers wait for each
# other (a line every 30 s). Worker 0 also runs the linear probe and the cost of P, and writes study.json,
# study.md and the plots into $RUN. Results are the same whatever the number of workers.
#
# bf16 by default (train.precision and model.dtype, as vith_vipamin.sh): PRECISION=fp32 to change it. Every
# argument is a Hydra override of `vipamin-scale study` (the study= preset, model=, data=, ...).
# Preemption: Slurm sends SIGUSR1 to every worker (the job step; no B:, Python is not the batch shell) 120 s
# before the time limit, or `scancel --signal=USR1 JOBID` at any time. A worker in a pack checkpoints it at the
# next step; one between packs stops there; each exits 75. This script then requeues the job once, and the
# requeued job (same id, same $RUN) continues the study: ended runs are reused, interrupted ones resume.
#
#SBATCH --job-name=vipamin-study
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
VENV=${VENV:-$REPO/.venv}
NNODES=${SLURM_NNODES:-1}
GPUS=${SLURM_GPUS_ON_NODE:-0}
WORKERS_PER_NODE=${WORKERS_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}
CPUS=${SLURM_CPUS_ON_NODE:-$WORKERS_PER_NODE}
THREADS=$(( CPUS / WORKERS_PER_NODE > 0 ? CPUS / WORKERS_PER_NODE : 1 ))
PRECISION=${PRECISION:-bf16}
DTYPE=${DTYPE:-$([[ $PRECISION == bf16 ]] && echo bf16 || echo fp32)}
RUN=${RUN:-$REPO/runs/study-${SLURM_JOB_ID:-local}}
PREEMPTED=75  # a worker's exit code when it stopped on the signal (vipamin_scale/preempt.py)

mkdir -p "$RUN"
echo "[$(date -u +%FT%TZ)] job ${SLURM_JOB_ID:-} restart ${SLURM_RESTART_COUNT:-0}: ${NNODES} nodes x" \
     "${WORKERS_PER_NODE} workers, study in ${RUN}"

# VIPAMIN_SCALE_REQUEUE=0: a worker stops without requeueing; this script requeues once every worker has stopped
set +e
VIPAMIN_SCALE_REQUEUE=0 OMP_NUM_THREADS=$THREADS srun --kill-on-bad-exit=0 --nodes="$NNODES" \
    --ntasks-per-node="$WORKERS_PER_NODE" --ntasks=$(( NNODES * WORKERS_PER_NODE )) --cpus-per-task="$THREADS" \
    bash -c 'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID exec "$0" -m vipamin_scale.cli \
        study "$@"' "$VENV/bin/python" "train.precision=$PRECISION" "model.dtype=$DTYPE" "hydra.run.dir=$RUN" "$@"
rc=$?
set -e
if (( rc == PREEMPTED )) && [[ -n ${SLURM_JOB_ID:-} ]]; then
    echo "[$(date -u +%FT%TZ)] job ${SLURM_JOB_ID} preempted: the workers stopped; requeueing it"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
(( rc == 0 )) || exit "$rc"
echo "[$(date -u +%FT%TZ)] job ${SLURM_JOB_ID:-} done: $RUN/study.md"
