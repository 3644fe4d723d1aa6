"""One training loop, engine-agnostic: initialize prompts, train, evaluate, checkpoint, resume, log.

    run_training(cfg) -> result dict: what `<out_dir>/result.json` holds (plain JSON values; the
                         trained prompts and head are in the run's checkpoints, never returned)

Per epoch: every rank runs the same number of steps (the loader guarantees it), the loss is
averaged over ranks for logging, top-1 accuracy is computed over the whole eval split (counts
all-reduced). A checkpoint is written at the end of every epoch (rank 0, atomic, last K kept);
`train.resume=true` continues from the newest one, skipping the steps already taken in a
partial epoch, so a resumed run ends where an uninterrupted one would.

World size: data.batch_size is the global batch and the loader's global batches depend on
(seed, epoch) only (data/wds.py), so a step is the same samples and the same averaged gradient at
every world size: the same config trains the same prompts (up to float summation order) at world
1, 2 or 4, and a run resumed at another world size continues the same sequence (steps count global
batches). What is drawn per rank stays per rank: with prompt.dropout > 0 the dropout masks come
from each rank's torch RNG (restored per rank on resume; a new rank takes rank 0's state), so
world sizes then differ by their dropout draws.

The run directory's records go through `vipamin_scale.runs`: rank 0 holds its lock for the whole
run; a resume continues only a run of the same identity (else one line naming the differing
fields, before any compute); a resume of a finished run returns its result.json untouched. A
non-finite loss stops every rank at that step (`TrainingDiverged`, naming the step and the lr);
the checkpoints written before it stay.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import vipamin_scale.checkpoint as ckpt
import vipamin_scale.distributed as D
import vipamin_scale.runs as runs
from vipamin_scale.config import UserError, check_global_batch, eval_split, validate
from vipamin_scale.data import build_loader, check_splits, dataset_info, resolve_root
from vipamin_scale.engine import build_engine
from vipamin_scale.faults import kill_switch
from vipamin_scale.init.bpt_stats import bpt_whitening
from vipamin_scale.models import build_model, load_backbone, normalization
from vipamin_scale.models.prompted import cross_entropy
from vipamin_scale.preempt import Preemption
from vipamin_scale.progress import progress_bar
from vipamin_scale.tracking import MetricsLog, wants_diagnostics

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN/Inf: the run stops (exit 2); the last checkpoint written before it stays."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(engine, loader) -> dict[str, float]:
    engine.model.eval()
    correct = torch.zeros((), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    engine.pad_eval(len(loader))  # ZeRO-3: ranks with fewer eval batches join the others' collectives
    for images, labels, _ in loader:
        images, labels = images.to(engine.device), labels.to(engine.device)
        logits = engine.forward(images)
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double().cpu()
        correct += (logits.argmax(dim=1) == labels).sum().double().cpu()
        total += labels.numel()
    stats = torch.stack([correct, total, loss_sum])
    D.all_reduce_sum(stats)
    correct, total, loss_sum = stats.tolist()
    return {"acc": correct / max(total, 1.0), "loss": loss_sum / max(total, 1.0), "count": int(total)}


def initial_prompts(cfg: DictConfig, backbone, out_dir: Path) -> Optional[torch.Tensor]:
    """Run the configured initializer on `backbone` (the one that is trained) when prompts are not
    given by a file; None means random."""
    if cfg.prompt.init_file or cfg.init.method == "random":
        return None
    from vipamin_scale.init.run import run_init

    path = out_dir / "prompts.safetensors"
    result = run_init(cfg, path, backbone=backbone)
    return result["prompts"]


def splits_read(cfg: DictConfig) -> dict[str, str]:
    """{config field: split} of every split a training run reads (for `data.check_splits`)."""
    eval_field, eval_name = eval_split(cfg)
    reads = {"data.train_split": cfg.data.train_split, eval_field: eval_name}
    return {**reads, "data.test_split": cfg.data.test_split} if cfg.train.test_at_end else reads


def run_training(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg)
    D.init_from_env()
    check_global_batch(cfg.data.batch_size, D.world_size())
    check_splits(cfg.data, splits_read(cfg), train="data.train_split", limit=cfg.data.max_train_samples)
    out_dir = Path(cfg.train.out_dir)
    with runs.hold(out_dir):  # one writer per run directory
        # A torchrun restart (elastic, --max-restarts) always continues from the newest checkpoint.
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        resuming = cfg.train.resume or restarted
        if resuming:
            runs.check_same_run(out_dir, cfg)
            if runs.is_finished(out_dir):
                if D.rank() == 0:
                    log.info("%s holds a finished run; nothing to do (result.json kept)", out_dir)
                return runs.read_result(out_dir)
        D.barrier()  # every rank has read the records before rank 0 rewrites them
        if D.rank() == 0:
            runs.begin(out_dir, cfg)
        return _train(cfg, out_dir, resuming, restarted)


def _train(cfg: DictConfig, out_dir: Path, resuming: bool, restarted: bool) -> dict[str, Any]:
    rank, world = D.rank(), D.world_size()
    ckpt_dir = out_dir / "checkpoints"
    # The newest valid checkpoint, read before any compute (a damaged newer one is skipped, with a warning).
    resumed = ckpt.load_latest(ckpt_dir) if resuming else None
    resume_from, state = resumed if resumed is not None else (None, None)
    seed_everything(cfg.train.seed)
    metrics = MetricsLog.from_config(cfg, out_dir, enabled=rank == 0)  # a tracker that cannot start fails here

    root = resolve_root(cfg.data)
    info = dataset_info(root)
    num_classes = int(info["num_classes"])

    # The backbone is read once; the initializer and BPT's statistics run on it (on this rank's
    # device), then the model is built around it from their ready tensors.
    backbone = load_backbone(cfg).to(D.device())
    t0 = time.perf_counter()
    prompts = None if resume_from is not None else initial_prompts(cfg, backbone, out_dir)
    init_time = time.perf_counter() - t0
    whitening = bpt_whitening(cfg, backbone)  # deterministic: a resumed run recomputes the same
    model = build_model(cfg, num_classes, prompts=prompts, whitening=whitening, backbone=backbone)
    if resume_from is not None:  # before ZeRO-3 partitions the parameters
        ckpt.check_trainable(resume_from, state["trainable"],
                             {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad})
    diagnostics = None
    if resume_from is None and wants_diagnostics(cfg.train):
        from vipamin_scale.init.run import prompt_diagnostics

        diagnostics = prompt_diagnostics(cfg, model, {"prompts": model.prompt().detach().double()})  # collective
    seed_everything(cfg.train.seed)  # the initializer must not shift training's random stream
    mean, std = normalization(cfg, model.backbone)
    img_size = cfg.model.img_size
    train_loader = build_loader(cfg.data, cfg.data.train_split, train=True, img_size=img_size, mean=mean, std=std,
                                rank=rank, world_size=world, seed=cfg.train.seed, limit=cfg.data.max_train_samples)
    eval_loader = build_loader(cfg.data, eval_split(cfg)[1], train=False,
                               img_size=img_size, mean=mean, std=std, rank=rank, world_size=world)

    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    global_batch = cfg.data.batch_size  # the same samples per step at every world size
    lr = cfg.train.lr * global_batch / 256.0
    num_trainable = sum(p.numel() for p in model.trainable_parameters())  # before ZeRO-3 partitions them
    engine = build_engine(cfg, model, total_steps, warmup_steps, lr)

    start_epoch, skip_steps, global_step, best = 0, 0, 0, {"acc": -1.0, "epoch": -1}
    if resume_from is not None:
        engine.load_trainable_state(state["trainable"])
        ckpt.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        start_epoch, skip_steps, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        best = state.get("best", best)
        if skip_steps >= steps_per_epoch:
            start_epoch, skip_steps = start_epoch + 1, 0
        if rank == 0:
            log.info("resumed from %s (epoch %d, step %d)", resume_from, start_epoch, global_step)

    if rank == 0:
        if resume_from is None:
            metrics.start(OmegaConf.to_container(cfg, resolve=True), diagnostics)
        log.info("model %s: %d trainable parameters (prompts %s + head), lr %.3g (base %.3g x %d/256), "
                 "%d steps/epoch, world %d", cfg.model.name, num_trainable, tuple(model.prompt_shape), lr,
                 cfg.train.lr, global_batch, steps_per_epoch, world)

    kill = kill_switch(restarted)  # tests' fault injection (vipamin_scale/faults.py); off unless asked for
    progress = progress_bar(total_steps, "train", "step", initial=global_step, enabled=cfg.train.progress and rank == 0)
    preempt = Preemption()  # SIGUSR1 (Slurm): checkpoint at the next step boundary, requeue, exit
    train_time, images_seen, last_eval = 0.0, 0, {}
    for epoch in range(start_epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch)
        engine.model.train()
        t_epoch = time.perf_counter()
        loss_acc, loss_n = torch.zeros(2, dtype=torch.float64), 0
        for i, (images, labels, _) in enumerate(train_loader):
            if i < skip_steps:
                continue
            images, labels = images.to(engine.device), labels.to(engine.device)
            loss = cross_entropy(engine.forward(images), labels)
            _check_finite(loss, global_step + 1, epoch, engine.lr)
            engine.backward(loss)
            engine.step()
            global_step += 1
            images_seen += labels.numel() * world
            loss_acc += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
            loss_n += 1
            progress.update(1)
            if global_step % cfg.train.log_every == 0 or i == steps_per_epoch - 1:
                D.all_reduce_sum(loss_acc)
                mean_loss = (loss_acc[0] / loss_acc[1]).item()
                progress.set_postfix(loss=f"{mean_loss:.4f}", epoch=epoch)
                metrics.write({"event": "train", "epoch": epoch, "step": global_step, "loss": mean_loss, "lr": engine.lr})
                loss_acc.zero_()
            kill.after_step(global_step, rank)
            if i + 1 < steps_per_epoch and preempt.requested(global_step):
                save_checkpoint(cfg, engine, ckpt_dir, epoch, i + 1, global_step, best)
                metrics.close()
                preempt.stop(global_step)
        skip_steps = 0
        train_time += time.perf_counter() - t_epoch
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            last_eval = evaluate(engine, eval_loader)
            if last_eval["acc"] > best["acc"]:
                best = {"acc": last_eval["acc"], "epoch": epoch}
            metrics.write({"event": cfg.train.eval_split, "epoch": epoch, "step": global_step, **last_eval})
            if rank == 0:
                log.info("epoch %d: %s acc %.4f loss %.4f", epoch, cfg.train.eval_split, last_eval["acc"], last_eval["loss"])
        save_checkpoint(cfg, engine, ckpt_dir, epoch + 1, 0, global_step, best)
        if epoch + 1 < cfg.train.epochs and preempt.requested(global_step):
            metrics.close()
            preempt.stop(global_step)
    progress.close()

    result: dict[str, Any] = {
        "method": cfg.init.method if not cfg.prompt.init_file else "file",
        "prompt_length": cfg.prompt.length, "deep": cfg.prompt.deep,
        "best_val": best, "final_eval": last_eval, "trainable_params": num_trainable,
        "init_time_s": init_time, "train_time_s": train_time,
        "images_per_s": images_seen / train_time if train_time > 0 else None,
        "world_size": world, "device": str(engine.device), "steps": global_step,
        "prompt_params": sum(p.numel() for p in model.prompt.parameters() if p.requires_grad), "vpt_prompt_params": int(np.prod(model.prompt_shape)),
    }
    if cfg.train.test_at_end:
        test_loader = build_loader(cfg.data, cfg.data.test_split, train=False, img_size=img_size, mean=mean,
                                   std=std, rank=rank, world_size=world)
        result["test"] = evaluate(engine, test_loader)
        metrics.write({"event": "test", "step": global_step, **result["test"]})
    if rank == 0:
        runs.finish(out_dir, result)
    metrics.close()
    return result


def _check_finite(loss: torch.Tensor, step: int, epoch: int, lr: float) -> None:
    """Every rank stops at the first step whose loss is NaN/Inf on any rank, before its update."""
    total = torch.tensor([loss.item()], dtype=torch.float64)
    D.all_reduce_sum(total)
    if not math.isfinite(total.item()):
        raise TrainingDiverged(f"train: the loss is {total.item() / D.world_size()} at step {step} (epoch {epoch}), "
                               f"lr {lr:.4g}; stopped before that update (checkpoints written before it are kept); "
                               f"lower train.lr or check the prompts and data")


def save_checkpoint(cfg, engine, ckpt_dir: Path, epoch: int, step_in_epoch: int, global_step: int, best) -> None:
    """Every rank's RNG state is gathered; rank 0 writes (the trainable state is replicated)."""
    rngs = D.all_gather_object(ckpt.rng_state())
    state = engine.trainable_state()
    if D.rank() == 0:
        payload = {"trainable": state, "rng": rngs, "epoch": epoch, "step_in_epoch": step_in_epoch,
                   "global_step": global_step, "best": best, "world_size": D.world_size(),
                   "engine": engine.name, "config": OmegaConf.to_container(cfg, resolve=True)}
        ckpt.save(ckpt_dir, payload, global_step, cfg.train.keep_last)
    D.barrier()
