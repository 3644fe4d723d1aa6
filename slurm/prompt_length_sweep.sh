#!/bin/bash
# Prompt-length study: one array task per (prompt length, init, seed), each a full init + tuning run
# (slurm/vith_vipamin.sh's body; ViT-L/14 on one node by default), all under one sweep
# directory that `vipamin-scale report` turns into a table and plots (mean ± sd over the seeds):
#
#   DATA_ROOT=/data/vtab/cifar100 sbatch slurm/prompt_length_sweep.sh [hydra overrides...]
#   LENGTHS="1 5 10 50 100" INIT=spt sbatch --array=0-4 slurm/prompt_length_sweep.sh
#   LENGTHS="1 10 50" INITS="vipamin random" SEEDS="0 1 2" DATA_ROOT=/data/fewshot/4shot_seed{seed} \
#       sbatch --array=0-17 slurm/prompt_length_sweep.sh
#   vipamin-scale report runs/prompt-length-<array job id>
#
# --array must have one index per (length, init, seed): LENGTHS x INITS x SEEDS entries, 0-based;
# the length varies slowest, the seed fastest (so --array=0-5 above is P = 1, both inits, 3 seeds).
# INITS (default: $INIT, default vipamin) are vipamin_scale/configs/init/* options. SEEDS (default: none, no seed
# override): each seed s sets init.seed=s train.seed=s for both commands, so every init of a seed
# starts from the same random tensor (VIPAMIN starts from it too), the same head and the same batch
# order; a `{seed}` in DATA_ROOT becomes s (one few-shot draw a seed, shared by all inits: see
# `vipamin-scale shards --protocol fewshot`). Each run: $SWEEP/<init>-<prompt>-len<P>[-seed<s>].
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
read -r -a INITS <<< "${INITS:-${INIT:-vipamin}}"
read -r -a SEEDS <<< "${SEEDS:-}"
TASK=${SLURM_ARRAY_TASK_ID:-0}
NSEEDS=$(( ${#SEEDS[@]} > 0 ? ${#SEEDS[@]} : 1 ))
TOTAL=$(( ${#LENGTHS[@]} * ${#INITS[@]} * NSEEDS ))
if (( TASK >= TOTAL )); then
    echo "error: array index $TASK but LENGTHS x INITS x SEEDS has $TOTAL entries" \
         "(${LENGTHS[*]} x ${INITS[*]} x ${SEEDS[*]:-no seed}): use --array=0-$(( TOTAL - 1 ))" >&2
    exit 2
fi
export MODEL=${MODEL:-vit_l14}
export ENGINE=${ENGINE:-zero2}
export PROMPT_LENGTH=${LENGTHS[$(( TASK / (${#INITS[@]} * NSEEDS) ))]}
export INIT=${INITS[$(( TASK / NSEEDS % ${#INITS[@]} ))]}
SWEEP=${SWEEP:-$REPO/runs/prompt-length-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID}}}
RUN=$SWEEP/$INIT-${PROMPT:-deep}-len$PROMPT_LENGTH
SEED_ARGS=()
if (( ${#SEEDS[@]} > 0 )); then
    SEED=${SEEDS[$(( TASK % NSEEDS ))]}
    RUN=$RUN-seed$SEED
    SEED_ARGS=("init.seed=$SEED" "train.seed=$SEED")
    [[ -n ${DATA_ROOT:-} ]] && export DATA_ROOT=${DATA_ROOT//\{seed\}/$SEED}
fi
export RUN
exec bash "$REPO/slurm/vith_vipamin.sh" "${SEED_ARGS[@]}" "$@"
