"""Instruments of a training step, for the pack benchmarks and the tests that hold its costs: how many aten ops
(and kernels) a call dispatches, and the CPU allocator's peak during it.

    n, result = count_ops(fn, record=None)      every aten op `fn` dispatches (TorchDispatchMode)
    peak, result = allocator_peak(fn)           bytes, above what was allocated before (the profiler's memory events)
"""
from __future__ import annotations

from typing import Any, Callable


def count_ops(fn: Callable[[], Any], record: list | None = None) -> tuple[int, Any]:
    """(number of aten ops `fn` dispatches, its result); `record` (a list) receives each op's name, output shapes and
    whether it is a view (no kernel: metadata only)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.n += 1
            if record is not None:
                outs = out if isinstance(out, (tuple, list)) else [out]
                record.append((str(func), [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)], func.is_view))
            return out

    with Counter() as counter:
        result = fn()
    return counter.n, result


def allocator_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(the CPU allocator's peak bytes allocated during `fn` above what was allocated before it, its result): the
    profiler's memory events (every allocation and free of the CPU allocator) summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, result
