"""The one communication layer: process-group setup and the collectives everything else uses
(`linalg/`, `init/`, `train`, `preempt`; the engines hand the group to their libraries).

Every collective takes an optional `group`: `None` is the default process group when one is
initialized and a single process otherwise; a `ProcessGroup`; or `LOCAL`, a "group" of this
process alone even inside a process group. Ranks and sizes are group ranks and sizes. With world
size 1 (no process group, `LOCAL`, or a group of one) every collective is the identity. Tensors
may live anywhere: NCCL reduces GPU tensors only, so a collective runs on the backend's device
(this rank's GPU for NCCL, the CPU otherwise) and the result comes back into the caller's tensor
(or onto its device).
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any

import torch
import torch.distributed as dist


class _LocalGroup:
    """Sentinel type: a 'group' of one process, whatever torch.distributed says."""

    def __repr__(self) -> str:
        return "LOCAL"


LOCAL: Any = _LocalGroup()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _joined(group: Any) -> bool:
    """Whether `group` reaches other processes' ranks at all (False: one process, rank 0 of 1)."""
    if group is LOCAL:
        return False
    if not is_dist():
        if group is not None:
            raise ValueError("a process group was passed but torch.distributed is not initialized")
        return False
    return True


def rank(group: Any = None) -> int:
    return dist.get_rank(group) if _joined(group) else 0


def world_size(group: Any = None) -> int:
    return dist.get_world_size(group) if _joined(group) else 1


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


def _trivial(group: Any) -> bool:
    return world_size(group) == 1


def _comm_device(group: Any) -> torch.device:
    """Where `group`'s collectives run: this rank's GPU under NCCL, else the CPU."""
    if str(dist.get_backend(group)).lower() == "nccl":
        return device()
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """In-place sum over the ranks of `group`; returns `t` (the identity with one process).

    A tensor not on the backend's device (a CPU tensor under NCCL: the initializer's float64
    statistics) takes a round trip through it.
    """
    return _all_reduce(t, dist.ReduceOp.SUM, group)


def all_reduce_max(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """In-place elementwise maximum over the ranks of `group`; returns `t`."""
    return _all_reduce(t, dist.ReduceOp.MAX, group)


def _all_reduce(t: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    return _in_place(t, group, lambda buf: dist.all_reduce(buf, op=op, group=group))


def _in_place(t: torch.Tensor, group: Any, collective: Any) -> torch.Tensor:
    """Run an in-place `collective(buf)` on `t`'s values on the group's device, then copy them back into `t`."""
    if not _trivial(group):
        buf = t.to(_comm_device(group)).contiguous()
        collective(buf)
        if buf is not t:
            t.copy_(buf)
    return t


def all_gather(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every rank's `t` (the same shape everywhere) stacked in rank order: `(size, *t.shape)`."""
    if _trivial(group):
        return t.unsqueeze(0).clone()
    buf = t.to(_comm_device(group)).contiguous()
    parts = [torch.empty_like(buf) for _ in range(world_size(group))]
    dist.all_gather(parts, buf, group=group)
    return torch.stack(parts).to(t.device)


def gather(t: torch.Tensor, dst: int = 0, group: Any = None) -> list[torch.Tensor] | None:
    """Every rank's `t` as a list (rank order) on group rank `dst`, `None` elsewhere."""
    if _trivial(group):
        return [t]
    buf = t.to(_comm_device(group)).contiguous()
    parts = [torch.empty_like(buf) for _ in range(world_size(group))] if rank(group) == dst else None
    dist.gather(buf, gather_list=parts, group=group, group_dst=dst)
    return None if parts is None else [p.to(t.device) for p in parts]


def broadcast(t: torch.Tensor, src: int, group: Any = None) -> torch.Tensor:
    """In-place broadcast from group rank `src`; returns `t`."""
    return _in_place(t, group, lambda buf: dist.broadcast(buf, group=group, group_src=src))


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (`[obj]` with one process)."""
    if _trivial(group):
        return [obj]
    parts: list[Any] = [None] * world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Group rank `src`'s picklable `obj` on every rank (`obj` itself with one process)."""
    if _trivial(group):
        return obj
    box = [obj if rank(group) == src else None]
    dist.broadcast_object_list(box, group=group, group_src=src)
    return box[0]


def barrier() -> None:
    if is_dist():
        dist.barrier()


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()


FIRST_FAILURE_KEY = "vipamin_scale/first_failure"


def first_failure(message: str, code: int, *, record: bool = True,
                  timeout_s: float = 10.0) -> tuple[int, str, int] | None:
    """The job's first failure, `(rank, message, exit code)`: this rank's, recorded now, unless another rank
    recorded one first (then theirs); with `record=False` only another's (None when none is recorded).
    Kept in the rendezvous store at MASTER_ADDR:MASTER_PORT (torchrun's agent holds it, so it outlives
    the ranks), one key per restart attempt. None without a process group or when the store cannot be
    reached (a rank that reports then speaks for itself)."""
    if not is_dist() or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    key = f"{FIRST_FAILURE_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    mine = json.dumps([rank(), message, int(code)])
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        if not record and not store.check([key]):
            return None
        first = json.loads(store.compare_set(key, "", mine) if record else store.get(key))
    except (RuntimeError, ValueError, OSError):  # DistStoreError is a RuntimeError
        return None
    return int(first[0]), str(first[1]), int(first[2])
