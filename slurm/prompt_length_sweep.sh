#!/bin/bash
# Prompt-length study: one array task per prompt length, each a full init + tuning run
# (slurm/vith_vipamin.sh's body; ViT-L/14 on one node by default), all under one sweep
# directory that `vipamin-scale report` turns into a table and plots:
#
#   DATA_ROOT=/data/vtab/cifar100 sbatch slurm/prompt_length_sweep.sh [hydra overrides...]
#   LENGTHS="1 5 10 50 100" INIT=spt sbatch --array=0-4 slurm/prompt_length_sweep.sh
#   vipamin-scale report runs/prompt-length-<array job id>
#
# --array must have one index per entry of LENGTHS (0-based).
#
#SBATCH --job-name=prompt-length
#SBATCH --array=0-4
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
read -r -a LENGTHS <<< "${LENGTHS:-1 5 10 50 100}"
TASK=${SLURM_ARRAY_TASK_ID:-0}
if (( TASK >= ${#LENGTHS[@]} )); then
    echo "error: array index $TASK but LENGTHS has ${#LENGTHS[@]} entries: ${LENGTHS[*]}" >&2
    exit 2
fi
export MODEL=${MODEL:-vit_l14}
export ENGINE=${ENGINE:-zero2}
export PROMPT_LENGTH=${LENGTHS[$TASK]}
SWEEP=${SWEEP:-$REPO/runs/prompt-length-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID}}}
export RUN=$SWEEP/${INIT:-vipamin}-${PROMPT:-deep}-len${PROMPT_LENGTH}
exec bash "$REPO/slurm/vith_vipamin.sh" "$@"
