#!/bin/bash
# Prompt-length study: one array task per (prompt length, init, seed), each a full init + tuning run
# (slurm/vith_vipamin.sh's body with EXPERIMENT=vitl_vipamin by default: configs/experiment/vitl_vipamin.yaml,
# ViT-L/14 on one node), all under one sweep
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
# PACK=1: one task per (length, seed), LENGTHS x SEEDS entries (--array=0-5 above), the seed fastest;
# the task trains every init of INITS as one pack in one process (`vipamin-scale train -m
# hydra/launcher=packed`: each run equal to its solo run, in the same run directories; the
# initializer runs in-process, no prompts file), on one GPU, under engine=ddp (a pack of several runs
# needs it; ENGINE=... otherwise); EXPERIMENT, MODEL, DATA, PROMPT, PRECISION, DTYPE, BATCH, MODEL_CKPT
# as in vith_vipamin.sh, VIPAMIN_SCALE the command (default: python -m vipamin_scale.cli). That process
# runs as a job step (srun), as every trainer of these scripts does, never as the batch shell: Slurm's
# --signal=USR1@120 (no B:) and `scancel --signal=USR1 JOBID` signal the job's steps, not the batch shell,
# so one #SBATCH line serves both modes.
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
PACK=${PACK:-0}
NINITS=$(( PACK == 1 ? 1 : ${#INITS[@]} ))  # PACK=1: a task's inits are one pack
TOTAL=$(( ${#LENGTHS[@]} * NINITS * NSEEDS ))
if (( TASK >= TOTAL )); then
    if (( PACK == 1 )); then
        echo "error: array index $TASK but LENGTHS x SEEDS (PACK=1) has $TOTAL entries" \
             "(${LENGTHS[*]} x ${SEEDS[*]:-no seed}): use --array=0-$(( TOTAL - 1 ))" >&2
    else
        echo "error: array index $TASK but LENGTHS x INITS x SEEDS has $TOTAL entries" \
             "(${LENGTHS[*]} x ${INITS[*]} x ${SEEDS[*]:-no seed}): use --array=0-$(( TOTAL - 1 ))" >&2
    fi
    exit 2
fi
export EXPERIMENT=${EXPERIMENT:-vitl_vipamin}
export PROMPT_LENGTH=${LENGTHS[$(( TASK / (NINITS * NSEEDS) ))]}
export INIT=${INITS[$(( TASK / NSEEDS % NINITS ))]}
SWEEP=${SWEEP:-$REPO/runs/prompt-length-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID}}}
if (( PACK == 1 )); then
    ARGS=("experiment=$EXPERIMENT")
    [[ -n ${MODEL:-} ]] && ARGS+=("model=$MODEL")
    [[ -n ${DATA:-} ]] && ARGS+=("data=$DATA")
    [[ -n ${PROMPT:-} ]] && ARGS+=("prompt=$PROMPT")
    ARGS+=("prompt.length=$PROMPT_LENGTH" "init=$(IFS=,; echo "${INITS[*]}")" "engine=${ENGINE:-ddp}")
    if [[ -n ${PRECISION:-} ]]; then  # model.dtype follows it unless DTYPE says otherwise, as in vith_vipamin.sh
        ARGS+=("train.precision=$PRECISION" "model.dtype=${DTYPE:-$([[ $PRECISION == bf16 ]] && echo bf16 || echo fp32)}")
    elif [[ -n ${DTYPE:-} ]]; then
        ARGS+=("model.dtype=$DTYPE")
    fi
    ARGS+=("train.resume=true")
    SUBDIR="\${hydra:runtime.choices.init}-${PROMPT:-deep}-len$PROMPT_LENGTH"
    if (( ${#SEEDS[@]} > 0 )); then
        SEED=${SEEDS[$(( TASK % NSEEDS ))]}
        SUBDIR=$SUBDIR-seed$SEED
        ARGS+=("init.seed=$SEED" "train.seed=$SEED")
        [[ -n ${DATA_ROOT:-} ]] && DATA_ROOT=${DATA_ROOT//\{seed\}/$SEED}
    fi
    [[ -n ${DATA_ROOT:-} ]] && ARGS+=("data.root=$DATA_ROOT")
    [[ -n ${MODEL_CKPT:-} ]] && ARGS+=("model.checkpoint=$MODEL_CKPT")
    [[ -n ${BATCH:-} ]] && ARGS+=("data.batch_size=$BATCH")
    VENV=${VENV:-$REPO/.venv}
    # shellcheck disable=SC1091
    [[ -f $VENV/bin/activate ]] && source "$VENV/bin/activate"
    read -r -a CMD <<< "${VIPAMIN_SCALE:-python -m vipamin_scale.cli}"
    cd "$REPO"
    exec srun --kill-on-bad-exit=1 --nodes=1 --ntasks=1 "${CMD[@]}" train -m hydra/launcher=packed "${ARGS[@]}" \
        "hydra.sweep.dir=$SWEEP" "hydra.sweep.subdir=$SUBDIR" "$@"
fi
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
