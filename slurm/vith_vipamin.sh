#!/bin/bash
# VIPAMIN-Deep prompt initialization + prompt tuning of a frozen ViT-H/14, on N nodes.
#
#   sbatch slurm/vith_vipamin.sh [hydra overrides...]          (from the repository root)
#   DATA_ROOT=/data/vtab/cifar100 MODEL_CKPT=/ckpt/mae_vith14.pth sbatch --nodes=8 slurm/vith_vipamin.sh train.epochs=50
#
# One task per node (srun), each running one torchrun for that node's GPUs with a static
# rendezvous: node rank = SLURM_NODEID, master = the allocation's first node, port from the job id.
# 1. `vipamin-scale init` (sharded across all ranks) writes $RUN/prompts.safetensors (skipped when
#    it exists, e.g. after a requeue);  2. `vipamin-scale train prompt.init_file=...` tunes them.
#
# What the job trains is an experiment, `experiment=$EXPERIMENT`: configs/experiment/vith_vipamin.yaml
# (model, data, prompt, init, engine, precision) by default. Every setting below is an environment
# variable (default after `:-`); one left empty keeps the experiment's value; arguments are Hydra
# overrides given to both commands (INIT_ARGS / TRAIN_ARGS: overrides for one of them only).
# Preemption: Slurm sends SIGUSR1 120 s before the time limit (or `scancel --signal=USR1 JOBID`
# at any time); the trainer checkpoints at the next step boundary, runs `scontrol requeue`, and
# the requeued job (same id, same $RUN) resumes from that checkpoint (train.resume=true below).
#
#SBATCH --job-name=vith-vipamin
#SBATCH --nodes=4
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
# shellcheck disable=SC1091
source "$VENV/bin/activate"

EXPERIMENT=${EXPERIMENT:-vith_vipamin}  # configs/experiment/*: vith_vipamin (ViT-H/14, ddp) | vitl_vipamin ...
MODEL=${MODEL:-}                     # vipamin_scale/configs/model/* (the experiment's: vit_h14)
MODEL_CKPT=${MODEL_CKPT:-}           # model.checkpoint (MAE / MoCo-v3 / timm file); empty: none
DATA=${DATA:-}                       # vipamin_scale/configs/data/* (the experiment's: shards)
DATA_ROOT=${DATA_ROOT:-}             # data.root (shards written by `vipamin-scale shards`)
PROMPT=${PROMPT:-}                   # vipamin_scale/configs/prompt/*: deep | shallow | bpt ... (the experiment's: deep)
PROMPT_LENGTH=${PROMPT_LENGTH:-}     # prompt.length (the experiment's: 10)
INIT=${INIT:-}                       # vipamin_scale/configs/init/*: vipamin | vipamin_paper | spt | random ...
# train only, vipamin_scale/configs/engine/*: ddp (the fastest while the frozen backbone fits on one GPU: ViT-H in
# bf16 is 1.3 GB) | fsdp2 or zero3 (a backbone too big for one GPU: blocks sharded over the ranks) | zero1 | zero2
ENGINE=${ENGINE:-}
PRECISION=${PRECISION:-}             # train only, train.precision: bf16 | fp32 | fp16 (the experiment's: bf16)
DTYPE=${DTYPE:-}                     # train only, model.dtype: the frozen backbone stored in bf16 | fp32
if [[ -z $DTYPE && -n $PRECISION ]]; then  # by default it follows PRECISION (bf16 storage needs bf16 compute)
    DTYPE=$([[ $PRECISION == bf16 ]] && echo bf16 || echo fp32)
fi
RUN=${RUN:-$REPO/runs/${SLURM_JOB_NAME:-vipamin}-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID}}${SLURM_ARRAY_TASK_ID:+-$SLURM_ARRAY_TASK_ID}}
PROMPTS=${PROMPTS:-$RUN/prompts.safetensors}
INIT_ARGS=${INIT_ARGS:-}             # extra overrides for `init` only (space separated)
TRAIN_ARGS=${TRAIN_ARGS:-}           # extra overrides for `train` only (space separated)
MAX_RESTARTS=${MAX_RESTARTS:-0}      # torchrun --max-restarts (in-job restarts; requeue is separate)

NNODES=${SLURM_NNODES:-1}
GPUS=${SLURM_GPUS_ON_NODE:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' || true)
MASTER_ADDR=${MASTER_ADDR:-${HEAD_ADDR:-$HEAD_NODE}}
# train uses MASTER_PORT+1, so ports go in steps of 2: the jobs of an array (consecutive ids) may share a node
MASTER_PORT=${MASTER_PORT:-$(( 20000 + 2 * (SLURM_JOB_ID % 20000) ))}
export NNODES NPROC_PER_NODE MASTER_ADDR MASTER_PORT MAX_RESTARTS
# data.batch_size is the GLOBAL batch (each GPU takes BATCH / GPUs): 32 per GPU by default, e.g. 1024 on
# 4 nodes x 8 GPUs; a data.batch_size=... override on the command line wins
BATCH=${BATCH:-$(( 32 * NNODES * NPROC_PER_NODE ))}
THREADS=$(( ${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}

# The experiment, then each setting given (an override on the command line wins over the experiment)
COMMON=("experiment=$EXPERIMENT")
[[ -n $MODEL ]] && COMMON+=("model=$MODEL")
[[ -n $DATA ]] && COMMON+=("data=$DATA")
[[ -n $PROMPT ]] && COMMON+=("prompt=$PROMPT")
[[ -n $PROMPT_LENGTH ]] && COMMON+=("prompt.length=$PROMPT_LENGTH")
[[ -n $INIT ]] && COMMON+=("init=$INIT")
[[ -n $MODEL_CKPT ]] && COMMON+=("model.checkpoint=$MODEL_CKPT")
[[ -n $DATA_ROOT ]] && COMMON+=("data.root=$DATA_ROOT")
TRAIN_ONLY=()
[[ -n $ENGINE ]] && TRAIN_ONLY+=("engine=$ENGINE")
[[ -n $PRECISION ]] && TRAIN_ONLY+=("train.precision=$PRECISION")
[[ -n $DTYPE ]] && TRAIN_ONLY+=("model.dtype=$DTYPE")

# One torchrun per node (vipamin_scale.launch: torchrun that exits with the first failing rank's code,
# 2 for a user error). The task ignores SIGUSR1 and SIGUSR2 (inherited through exec), so the launcher
# survives them; the trainer processes handle both from their start (vipamin_scale/preempt.py).
launch() {  # launch PORT COMMAND [overrides...]
    local port=$1; shift
    srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks-per-node=1 --ntasks="$NNODES" \
        bash -c 'trap "" USR1 USR2; exec "$0" -m vipamin_scale.launch --nnodes="$NNODES" --node-rank="$SLURM_NODEID" \
            --nproc-per-node="$NPROC_PER_NODE" --master-addr="$MASTER_ADDR" --master-port="$1" \
            --max-restarts="$MAX_RESTARTS" -m vipamin_scale.cli "${@:2}"' \
        "$VENV/bin/python" "$port" "$@"
}

mkdir -p "$RUN"
echo "[$(date -u +%FT%TZ)] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${NNODES} nodes x ${NPROC_PER_NODE}," \
     "master ${MASTER_ADDR}:${MASTER_PORT}, experiment ${EXPERIMENT}, run ${RUN}"

if [[ ! -f $PROMPTS ]]; then
    # shellcheck disable=SC2086
    launch "$MASTER_PORT" init "${COMMON[@]}" "out=$PROMPTS" "hydra.run.dir=$RUN/init" "hydra.output_subdir=null" $INIT_ARGS "$@"
fi
# shellcheck disable=SC2086
launch "$(( MASTER_PORT + 1 ))" train "${COMMON[@]}" "${TRAIN_ONLY[@]}" "prompt.init_file=$PROMPTS" \
    "data.batch_size=$BATCH" "train.resume=true" "hydra.run.dir=$RUN" $TRAIN_ARGS "$@"
echo "[$(date -u +%FT%TZ)] job ${SLURM_JOB_ID} done: $RUN/result.json"
