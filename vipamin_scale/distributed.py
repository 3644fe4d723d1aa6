"""The one place that talks to torch.distributed outside `init/sharded.py`, `linalg/` and `engine/`.

Everything works with world size 1 and no process group: these helpers then return the identity.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


BACKEND_ENV = "VIPAMIN_SCALE_DIST_BACKEND"


def backend() -> str:
    """The process-group backend to use: `$VIPAMIN_SCALE_DIST_BACKEND` (nccl | gloo) when set, else
    NCCL with CUDA and gloo without. gloo on a GPU machine reduces CUDA tensors too (slower), and
    accepts several ranks on one device, which NCCL refuses."""
    choice = os.environ.get(BACKEND_ENV, "").strip().lower()
    if choice and choice not in ("nccl", "gloo"):
        raise ValueError(f"{BACKEND_ENV}: must be nccl or gloo; got {choice!r}")
    if choice == "nccl" and not torch.cuda.is_available():
        raise ValueError(f"{BACKEND_ENV}=nccl: no CUDA device is visible")
    return choice or ("nccl" if torch.cuda.is_available() else "gloo")


def init_from_env(timeout_s: float = 600.0) -> bool:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU).

    Returns True when a process group is (now) initialized, False for a plain single process.
    """
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    name = backend()
    timeout = datetime.timedelta(seconds=timeout_s)
    if name == "nccl":
        check_ranks_per_gpu(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
        torch.cuda.set_device(device())
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0 and name == "gloo" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # After a torchrun restart the agent's store still holds the dead attempt's gloo addresses
        # under the same keys; a rank reading a peer's stale key connects to a dead process
        # ("connectFullMesh: connection refused", 3 restarts in 4 here). Rendezvous under a
        # prefix of this attempt instead.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timeout)
        dist.init_process_group(name, store=dist.PrefixStore(f"vipamin_scale/restart_{restart}", store),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=timeout)
        return True
    # NCCL: name this rank's GPU, so collectives never guess it from the current context
    dist.init_process_group(backend=name, timeout=timeout, device_id=device() if name == "nccl" else None)
    return True


def check_ranks_per_gpu(local_world: int, gpus: int) -> None:
    """NCCL takes one GPU per rank: more ranks on a node than it has visible GPUs is one clear error
    before the process group forms (NCCL's own is "Duplicate GPU detected" deep in the first
    collective)."""
    if local_world > gpus:
        from vipamin_scale.config import ConfigError

        raise ConfigError(f"distributed: NCCL takes one GPU per rank, but {local_world} ranks on this node "
                          f"see {gpus} CUDA device(s); start torchrun with --nproc-per-node={gpus}, or set "
                          f"{BACKEND_ENV}=gloo to share a GPU between ranks")


def device() -> torch.device:
    """This rank's device: GPU `local_rank mod device count` (several ranks share a GPU only under
    gloo: NCCL refuses that), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group). Returns `t`.

    NCCL reduces GPU tensors only: a CPU tensor (the initializer's float64 statistics) takes a
    round trip through this rank's GPU; gloo reduces it where it is.
    """
    if is_dist():
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            buf = t.to(device())
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t.copy_(buf)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_dist():
        dist.barrier()


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()
