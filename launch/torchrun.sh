#!/usr/bin/env bash
# torchrun entry for any vipamin-scale command, single- or multi-node.
#
#   launch/torchrun.sh train model=vit_h14 ... hydra.run.dir=runs/h14      # one node, all GPUs
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=head launch/torchrun.sh init ... out=prompts.safetensors
#
# Environment (all optional):
#   NNODES (1)  NODE_RANK (0)  NPROC_PER_NODE (GPUs on this node, else 1)  MASTER_ADDR (127.0.0.1)
#   MASTER_PORT (29500)  MAX_RESTARTS (0; with >0 a restarted job resumes from its newest checkpoint)
#   RDZV_ENDPOINT (host:port: c10d rendezvous instead of the static NODE_RANK form)
# torchrun through vipamin_scale/launch.py: on a failure it exits with the rank that failed first's code
# (2 for a user error; torchrun alone exits 1).
# Every rank must write to the same directory: without a hydra.run.dir=... argument one is made
# from the date, here, once, and passed to all ranks.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[[ $# -ge 1 ]] || { echo "usage: $0 COMMAND [hydra overrides...]" >&2; exit 2; }
cmd="$1"; shift

gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
nproc="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
args=("$@")
if ! printf '%s\n' "${args[@]+"${args[@]}"}" | grep -q '^hydra.run.dir='; then
  args+=("hydra.run.dir=runs/$(date +%Y-%m-%d_%H-%M-%S)_${cmd}")
fi

rdzv=(--nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" --master-addr="${MASTER_ADDR:-127.0.0.1}"
      --master-port="${MASTER_PORT:-29500}")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rdzv=(--nnodes="${NNODES:-1}" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-vipamin}")
fi
exec "$py" -m vipamin_scale.launch "${rdzv[@]}" --nproc-per-node="$nproc" \
  --max-restarts="${MAX_RESTARTS:-0}" -m vipamin_scale.cli "$cmd" "${args[@]}"
