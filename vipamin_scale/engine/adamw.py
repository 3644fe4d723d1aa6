"""The pack's optimizer: AdamW over stacked parameters with per-run lr and weight decay, one set of ops per
parameter whatever the number of runs (the DDP engine's, for packs of any size and solo runs alike).

    opt = PackAdamW([(name, param, decays), ...], weight_decays)     param: (K, *solo shape), or the solo shape at K = 1
    sched = PackSchedule(opt, base_lrs, factors, total_steps)        run k's lr at step s: base_lrs[k] * factors[k](s)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); sched.step()

The update of run k is torch's AdamW (`torch.optim.adam._single_tensor_adam`, decoupled weight decay, betas
(0.9, 0.999), eps 1e-8) on run k's rows, op for op, with the scalars torch computes in Python computed in the
same float64 arithmetic on the device, per run:

    p_k     *= fp32(1 - lr_k * wd_k)                         (parameters whose SOLO ndim > 1: matrices and prompts)
    m       .lerp_(g, 1 - beta1)
    v       .mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom    = v.sqrt() / sqrt(1 - beta2^t) + eps
    p_k     += (fp32(-lr_k / (1 - beta1^t)) * m_k) / denom_k   (addcdiv: torch's value * t1 / t2)

so on the CPU each run's parameters and moments equal torch's AdamW on its solo run bit for bit (tests/test_pack.py,
tests/test_engines.py: DDP against ZeRO and fairscale's torch AdamW), and a step launches the same kernels at
K = 1 and K = 64. The step count t is the pack's (its runs step in lockstep); nothing is read back to the host.

The schedule: run k's lr at step s is `base_lr_k * factor_k(s)` as torch's LambdaLR computes it (each run may have
its own base lr and warmup, the length is the pack's): the factors of every step are computed once on the host,
one column per distinct schedule, and kept on the device; a step takes its row there. Its state is LambdaLR's, two
groups per run (decay, no decay, as `engine.base.param_groups` makes them), so a run's checkpoint is the solo
run's whichever engine trains it. The optimizer's state is torch's format too (moments by index in `names` order).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8


class PackAdamW:
    """AdamW over `params` [(name, tensor, decays)], run k's part being row k (or the tensor at K = 1); `weight_decays`
    (K,) per run; the lr (K,) is set by `PackSchedule` before each step (`self.lr`, float64 on the device)."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor, bool]], weight_decays: Sequence[float]):
        self.names = [n for n, _, _ in params]
        self.params = [p for _, p, _ in params]
        self.decays = [d for _, _, d in params]
        device = self.params[0].device
        self.weight_decays = torch.tensor(list(weight_decays), dtype=torch.float64, device=device)  # (K,)
        self.lr = torch.zeros_like(self.weight_decays)  # (K,) this step's lr per run (PackSchedule)
        self.steps = 0  # AdamW's t, shared by the runs
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] = []  # (exp_avg, exp_avg_sq) per param, made at step 1

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """torch's `Optimizer.state` view: {param: {step, exp_avg, exp_avg_sq}} (empty before the first step)."""
        step = torch.tensor(float(self.steps))
        return {p: {"step": step, "exp_avg": m, "exp_avg_sq": v} for p, (m, v) in zip(self.params, self.moments)}

    @staticmethod
    def _per_run(values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(K,) per-run values shaped to broadcast over `p`'s leading run dimension: (K, 1, ..., 1)."""
        return values.view(-1, *[1] * (p.ndim - 1))

    @torch.no_grad()
    def step(self) -> None:
        if not self.moments:
            self.moments = [(torch.zeros_like(p, memory_format=torch.preserve_format),
                             torch.zeros_like(p, memory_format=torch.preserve_format)) for p in self.params]
        self.steps += 1
        beta1, beta2 = BETAS
        bias_correction1 = 1 - beta1 ** self.steps
        bias_correction2_sqrt = (1 - beta2 ** self.steps) ** 0.5
        decay = (1 - self.lr * self.weight_decays).float()  # (K,) torch: param.mul_(1 - lr * weight_decay)
        neg_step = (self.lr / bias_correction1).neg_().float()  # (K,) torch: addcdiv_'s value=-step_size
        for p, decays, (exp_avg, exp_avg_sq) in zip(self.params, self.decays, self.moments):
            grad = p.grad
            if grad is None:  # no gradient this step (torch skips the parameter): nothing moves
                continue
            if decays:
                p.mul_(self._per_run(decay, p))
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(EPS)
            p.addcdiv_(exp_avg * self._per_run(neg_step, p), denom)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # -- torch's Optimizer state format --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"state": {i: {step, exp_avg, exp_avg_sq}}, "param_groups": [{"params": [0, ..., n - 1]}]}: the
        moments by index in `names` order (as torch's AdamW state_dict over groups in that order)."""
        step = torch.tensor(float(self.steps))
        return {"state": {i: {"step": step, "exp_avg": m, "exp_avg_sq": v} for i, (m, v) in enumerate(self.moments)},
                "param_groups": [{"params": list(range(len(self.params)))}]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        moments = state["state"]
        if not moments:  # saved before the first step
            self.steps, self.moments = 0, []
            return
        if sorted(moments) != list(range(len(self.params))):
            raise KeyError(f"PackAdamW: the state holds moments of parameters {sorted(moments)}, this optimizer "
                           f"steps {len(self.params)}")
        steps = {float(s["step"]) for s in moments.values()}
        if len(steps) > 1:
            raise ValueError(f"PackAdamW: the runs of a pack step together; the state's steps differ: {sorted(steps)}")
        self.steps = int(steps.pop())
        self.moments = [(moments[i]["exp_avg"].to(p.device, p.dtype).clone(),
                         moments[i]["exp_avg_sq"].to(p.device, p.dtype).clone()) for i, p in enumerate(self.params)]


class PackSchedule:
    """Every run's lr at every step, `base_lrs[k] * factors[k](step)` in LambdaLR's arithmetic, with LambdaLR's
    interface and state (two groups per run), so the loop and the checkpoints see what a torch scheduler gives
    them. The factors are computed once on the host for every step, one column per distinct schedule (runs given
    the same callable share it), and kept on the optimizer's device (steps + 1, S); a step's lrs are that row's
    factors times the runs' base lrs, float64 on the device (a double product, as Python's), read by no one on
    the host: `run_lr` recomputes the same product in Python."""

    def __init__(self, optimizer: PackAdamW, base_lrs: Sequence[float], factors: Sequence[Callable[[int], float]],
                 total_steps: int):
        self.optimizer, self.factors, self.total_steps = optimizer, list(factors), total_steps
        distinct = list({id(f): f for f in self.factors}.values())
        device = optimizer.lr.device
        self.columns = torch.stack([torch.tensor([f(s) for s in range(total_steps + 1)], dtype=torch.float64)
                                    for f in distinct], dim=1).to(device)  # (steps + 1, S)
        self.column_of_run = torch.tensor([[id(g) for g in distinct].index(id(f)) for f in self.factors],
                                          dtype=torch.long, device=device)  # (K,)
        self.last_epoch = 0
        self._set_bases(list(base_lrs))

    def _set_bases(self, base_lrs: list[float]) -> None:
        self.base_lrs = base_lrs
        self.bases = torch.tensor(base_lrs, dtype=torch.float64, device=self.columns.device)  # (K,)
        self._set()

    def _row(self) -> int:
        return min(self.last_epoch, self.total_steps)

    def _set(self) -> None:
        factors = self.columns[self._row()].index_select(0, self.column_of_run)  # (K,): no copy to or from the host
        self.optimizer.lr = self.bases * factors  # (K,) float64, each LambdaLR's base_lr * factor(step)

    def step(self) -> None:
        self.last_epoch += 1
        self._set()

    def run_lr(self, k: int) -> float:
        """Run k's lr of the next step (a host float, computed as the device's)."""
        return self.base_lrs[k] * self.factors[k](self._row())

    def get_last_lr(self) -> list[float]:
        """LambdaLR's: the lr of every group (two per run)."""
        return [self.run_lr(k) for k in range(len(self.base_lrs)) for _ in range(2)]

    def state_dict(self) -> dict[str, Any]:
        """LambdaLR's state_dict over two groups per run (tests/test_pack.py holds it equal to torch's)."""
        return {"base_lrs": [lr for lr in self.base_lrs for _ in range(2)], "last_epoch": self.last_epoch,
                "_step_count": self.last_epoch + 1, "_is_initial": False, "_get_lr_called_within_step": False,
                "_last_lr": self.get_last_lr(), "lr_lambdas": [None] * (2 * len(self.base_lrs))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bases = list(state["base_lrs"][::2])
        if len(bases) != len(self.base_lrs):
            raise ValueError(f"PackSchedule: a state of {len(bases)} runs for a pack of {len(self.base_lrs)}")
        self.last_epoch = int(state["last_epoch"])
        self._set_bases(bases)  # LambdaLR restores the saved base lrs, and so does this
