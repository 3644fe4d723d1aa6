#!/bin/bash
# VIPAMIN-Deep init + prompt tuning of a frozen ViT-L/14 on 2 nodes: the ViT-H job's body
# (slurm/vith_vipamin.sh: every setting and override described there) with the experiment
# configs/experiment/vitl_vipamin.yaml (ViT-L/14, DeepSpeed ZeRO-2, bf16).
#
#   DATA_ROOT=/data/vtab/cifar100 sbatch slurm/vitl_vipamin.sh [hydra overrides...]
#
#SBATCH --job-name=vitl-vipamin
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue
set -euo pipefail
export EXPERIMENT=${EXPERIMENT:-vitl_vipamin}
exec bash "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/vith_vipamin.sh" "$@"
