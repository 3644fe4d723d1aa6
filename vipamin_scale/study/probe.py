"""The linear probe: L2 logistic regression (L-BFGS, to convergence) on the frozen backbone's pooled features.

The gate's reference (a study's schedule must let prompt tuning reach it on the full data) and, as the
method `probe`, a row of the few-shot tables. Its C is selected like any lr of the study
(`tune.select.Selection` over study.probe_C, by the mean val accuracy over the selection draws, with the
same edge rounds and tie rule). Features are computed once per (data root, split, limit) with the
backbone the run config names (pooled as model.pool: the CLS token, else the mean of the other tokens),
in float64, on this process's device.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig


class LinearProbe:
    def __init__(self) -> None:
        self.cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.backbone = None

    def features(self, cfg: DictConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features (n, d) float64, labels (n,)) of `split` of the run config's data."""
        from vipamin_scale.data import build_loader, resolve_root
        from vipamin_scale.distributed import device
        from vipamin_scale.models import load_backbone, normalization

        limit = cfg.data.max_train_samples if split == cfg.data.train_split else None
        key = (str(resolve_root(cfg.data)), split, limit, cfg.model.name, cfg.model.img_size, cfg.model.pool)
        if key not in self.cache:
            if self.backbone is None:
                self.backbone = load_backbone(cfg).eval().to(device())
            mean, std = normalization(cfg, self.backbone)
            xs, ys = [], []
            loader = build_loader(cfg.data, split, train=False, img_size=cfg.model.img_size, mean=mean, std=std,
                                  limit=limit)
            with torch.no_grad():
                for images, labels, _ in loader:
                    tokens = self.backbone.forward_features(images.to(device()))  # (b, N, d)
                    pooled = tokens[:, 0] if cfg.model.pool == "cls" else tokens[:, 1:].mean(1)  # (b, d)
                    xs.append(pooled.double().cpu())
                    ys.append(labels)
            self.cache[key] = (torch.cat(xs).numpy(), torch.cat(ys).numpy())
        return self.cache[key]

    def fit(self, cfg: DictConfig, C: float):
        from sklearn.linear_model import LogisticRegression

        X, y = self.features(cfg, cfg.data.train_split)
        return LogisticRegression(C=C, max_iter=20_000, tol=1e-8).fit(X, y)

    def accuracy(self, cfg: DictConfig, C: float, splits: tuple[str, ...]) -> dict[str, float]:
        """{split: accuracy} of the probe fitted at C on the run config's training split."""
        clf = self.fit(cfg, C)
        out = {}
        for split in splits:
            X, y = self.features(cfg, split)
            out[split] = float((clf.predict(X) == y).mean())
        return out


def probe_result(accs: dict[str, float], val_split: str, test_split: str, C: Optional[float]) -> dict[str, Any]:
    """A probe fit as a run's result.json reads (final_eval: val, test), so the tables read both alike."""
    return {"method": "probe", "C": C, "final_eval": {"acc": accs.get(val_split)}, "test": {"acc": accs.get(test_split)}}
