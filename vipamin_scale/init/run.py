"""`vipamin-scale init` and `vipamin-scale diagnose`: the initializer's I/O around the pure math.

run_init(cfg, out) — works unchanged under torchrun:
  1. every rank reads its own contiguous block of the B calibration images (first B of the
     training split, eval transform); the union is exactly the B images for any world size;
  2. capture (`capture.py`) → per-layer sums → all-reduce (`sharded.reduce_means`);
  3. per-layer math on rank `l mod world` (VIPAMIN) or collectively over the sharded tokens
     (SPT k-means / rand draw, `linalg/`), gathered to `(L_p, P, d)` on every rank;
  4. rank 0 writes the safetensors file atomically: tensors `prompts`, `random` (+ `match`,
     `orth` for VIPAMIN) and metadata (options, per-layer energies, B, key fingerprint, world
     size, wall time per phase), with the SHA-256 of it all (`vipamin_scale.digest`). A failure
     anywhere leaves no file behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig
from timm.models.vision_transformer import VisionTransformer

import vipamin_scale.digest as digest
import vipamin_scale.distributed as D
from vipamin_scale.config import ConfigError, subspace_energy, validate
from vipamin_scale.data import build_loader
from vipamin_scale.init import spt as spt_math
from vipamin_scale.init import vipamin as vip
from vipamin_scale.init.capture import CaptureSpec, LayerSums, capture_layer_stats, layer_weights
from vipamin_scale.init.random import xavier_prompts
from vipamin_scale.init.sharded import map_layers, reduce_means
from vipamin_scale.models import load_backbone, normalization
from vipamin_scale.models.prompted import PromptedViT, VPTPrompts, load_prompts_file
from vipamin_scale.paths import atomic_write_bytes
from vipamin_scale.progress import progress_bar
from vipamin_scale.runs import hold, write_json

log = logging.getLogger(__name__)


class Calibration:
    """The first B training images (eval transform), each rank reading its own contiguous block.

    The loader's eval mode deals contiguous sample ranges to ranks, disjoint and covering the B
    images exactly, whatever the world size. Iterating yields image batches on the model's device;
    `keys` collects this rank's sample keys in stream order (canonical order = sorted keys).
    """

    def __init__(self, cfg: DictConfig, model: PromptedViT):
        mean, std = normalization(cfg, model.backbone)
        self.loader = build_loader(cfg.data, cfg.data.train_split, train=False, img_size=cfg.model.img_size,
                                   mean=mean, std=std, rank=D.rank(), world_size=D.world_size(),
                                   limit=cfg.init.num_images, batch_size=cfg.init.batch_size)
        self.B = self.loader.num_samples
        self.device = next(model.parameters()).device
        self.keys: list[str] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.keys = []
        for images, _labels, keys in self.loader:
            self.keys.extend(keys)
            yield images.to(self.device, non_blocking=True)

    def fingerprint(self) -> str:
        keys = sorted(k for part in D.all_gather_object(self.keys) for k in part)
        return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def calibration_model(cfg: DictConfig, backbone: VisionTransformer) -> PromptedViT:
    """`backbone` (used as is, not copied) with plain prompts (`prompt.init_file`'s, else VPT's random
    ones from `init.seed`) and a 1-class head: what the calibration passes run on (the capture
    passes its own prompts; the head is irrelevant), whatever `prompt.kind` the run trains."""
    model = PromptedViT(backbone, 1, cfg.prompt.length, cfg.prompt.deep, dropout=cfg.prompt.dropout,
                        pool=cfg.model.pool, seed=cfg.init.seed)
    if cfg.prompt.init_file:
        model.prompt = VPTPrompts(load_prompts_file(cfg.prompt.init_file, model))
    return model


def _prepare(cfg: DictConfig, backbone: Optional[VisionTransformer] = None) -> PromptedViT:
    """The calibration model on this rank's device (the capture runs there; the sums it keeps are
    float64 on the CPU), around `backbone` (moved there in place) or the config's, read from disk."""
    validate(cfg)
    D.init_from_env()
    return calibration_model(cfg, load_backbone(cfg) if backbone is None else backbone).to(D.device())


def _sorted_tokens(sums: LayerSums, keys: list[str], layer: int, N_p: int, d: int) -> torch.Tensor:
    """This rank's tokens of `layer` `(n_img, N_p, d)` in canonical (key) order (n_img may be 0)."""
    if not sums.tokens.get(layer):
        return torch.zeros((0, N_p, d), dtype=torch.float64)
    X = torch.cat(sums.tokens[layer]).double().reshape(len(keys), N_p, d)
    return X[sorted(range(len(keys)), key=keys.__getitem__)]


def run_init(cfg: DictConfig, out: str | Path, backbone: Optional[VisionTransformer] = None) -> dict[str, Any]:
    """The prompts of `init.method` for `backbone` (a training run's own, which it leaves as it was
    but for its device: D.device()), or for the config's, read from disk; written to `out`."""
    out = Path(out)
    model = _prepare(cfg, backbone)
    icfg = cfg.init
    L_p, P, d = model.prompt_shape
    rows = list(range(L_p))  # prompt row l is inserted before block l
    N_p = model.backbone.patch_embed.num_patches
    if icfg.method == "vipamin":
        vip.validate_vipamin_options(icfg.k, icfg.lam, icfg.official_compat, icfg.ln_aware, icfg.orth_scale, N_p=N_p)
        _check_room_for_orthogonal(icfg, N_p + 1, d)
    R = xavier_prompts(L_p, P, d, model.patch_size, icfg.seed)  # (L_p, P, d) float64
    times: dict[str, float] = {}
    calib = Calibration(cfg, model)
    method = icfg.method
    tsqr_acc: dict[int, Any] = {}
    if method == "vipamin" and icfg.subspace == "tokens":
        from vipamin_scale.linalg import StreamingTSQR

        tsqr_acc = {l: StreamingTSQR(d) for l in rows}
    spec = CaptureSpec(
        layers=rows,
        match=method == "vipamin",
        attn_out=method == "vipamin" and icfg.subspace == "mean",
        tokens=method == "spt",
        token_source=icfg.spt_source,
        row_sink=(lambda l, s: tsqr_acc[l].update(s)) if tsqr_acc else None,
    )

    t = time.perf_counter()
    sums = LayerSums()
    if method != "random":
        bar_on = bool(cfg.train.progress) and D.rank() == 0  # train.progress: every bar of the run
        with progress_bar(len(calib.loader), "calibration", "batch", enabled=bar_on) as bar:
            sums = capture_layer_stats(model, calib, R.float(), spec, progress=lambda n: bar.update(1))
    else:
        sums.count = calib.B if D.rank() == 0 else 0
    times["capture_s"] = time.perf_counter() - t

    t = time.perf_counter()
    B, means = reduce_means(sums)
    Q_tokens = {}
    for l, acc in tsqr_acc.items():  # collective, layer by layer
        svals, V = acc.finalize()
        Q_tokens[l] = vip.basis_from_svd(svals, V, subspace_energy(icfg))
    times["allreduce_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stats = Calibrated(cfg, model, sums, calib.keys, means, R, Q_tokens, rows, N_p, calib.device)
    made, options = INITIALIZERS[method](stats)
    tensors: dict[str, torch.Tensor] = {"random": R, **made}
    times["math_s"] = time.perf_counter() - t

    t = time.perf_counter()
    fingerprint = calib.fingerprint()
    times["gather_s"] = time.perf_counter() - t
    meta = {
        "method": method, "model": cfg.model.name, "img_size": cfg.model.img_size, "deep": cfg.prompt.deep,
        "prompt_length": P, "num_layers": L_p, "B": B, "keys_sha256": fingerprint, "world_size": D.world_size(),
        "seed": icfg.seed, "wall_times": times,
    }
    meta.update(options)  # the method's options and per-layer records
    if D.rank() == 0:
        write_prompts_file(out, tensors, meta)
        log.info("init %s: wrote %s (prompts %s, B=%d, world %d; capture %.2fs, math %.2fs)", method, out,
                 tuple(tensors["prompts"].shape), B, D.world_size(), times["capture_s"], times["math_s"])
    D.barrier()
    return {"prompts": tensors["prompts"].float(), "tensors": tensors, "meta": meta}


@dataclass(frozen=True)
class Calibrated:
    """What an initializer computes its prompts from: the calibration pass's sums (`sums`, this rank's)
    and their all-reduced means, the random prompts `R` (L_p, P, d) float64, the row-space bases of
    init.subspace=tokens (`Q_tokens`), the prompt rows and the patch count N_p."""

    cfg: DictConfig
    model: PromptedViT
    sums: LayerSums
    keys: list[str]
    means: dict
    R: torch.Tensor
    Q_tokens: dict
    rows: list[int]
    N_p: int
    device: Optional[torch.device] = None  # where the per-layer math runs (the capture's device)


def _random_init(c: Calibrated) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return {"prompts": c.R}, {}


def _vipamin_init(c: Calibrated) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    icfg, (_, P, d) = c.cfg.init, c.R.shape
    shapes = {name: (P, d) for name in ("prompts", "match", "orth")}
    gathered, layers = map_layers(c.rows, lambda l: vipamin_row(icfg, c.model, c.means, c.R, c.Q_tokens, l, device=c.device), shapes)
    return gathered, dict(k=icfg.k, lam=icfg.lam, subspace=icfg.subspace, energy=subspace_energy(icfg),
                          official_compat=icfg.official_compat, ln_aware=icfg.ln_aware, orth_scale=icfg.orth_scale,
                          layers=layers)


def _spt_init(c: Calibrated) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    icfg, (_, P, d) = c.cfg.init, c.R.shape
    return ({"prompts": _spt_prompts(c.cfg, c.sums, c.keys, c.rows, P, d, c.N_p)},
            dict(spt_mode=icfg.spt_mode, spt_source=icfg.spt_source, kmeans_iters=icfg.kmeans_iters))


# init.method -> the prompts it makes from the calibration (`Calibrated`): ({"prompts": (L_p, P, d), ...
# more tensors for the file}, what the file's metadata records of the method's options), like ENGINES.
INITIALIZERS: dict[str, Callable[[Calibrated], tuple[dict[str, torch.Tensor], dict[str, Any]]]] = {
    "random": _random_init, "vipamin": _vipamin_init, "spt": _spt_init}


def vipamin_row(icfg, model: PromptedViT, means: dict, R: torch.Tensor, Q_tokens: dict, l: int,
                device: Optional[torch.device] = None) -> dict:
    """VIPAMIN's prompts for prompt row `l` from the reduced means (`reduce_means`), the random
    prompts `R` (L_p, P, d) and, for init.subspace=tokens, the row-space bases `Q_tokens`; the
    options from `icfg` (cfg.init). Returns `prompts`, `match`, `orth` (P, d) float64 on the CPU and `info`.

    The math (float64 throughout) runs on `device`: the run's (`run_init` passes the capture's, so a
    GPU run does its SVDs and pseudo-inverses in CUDA's float64); None is the CPU, where nothing moves."""
    dev = torch.device("cpu") if device is None else torch.device(device)

    def on(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(dev)

    w = {name: on(v) if torch.is_tensor(v) else v for name, v in layer_weights(model, l).items()}
    res = vip.vipamin_layer(
        E=on(means["E"][l]), K=on(means["K"][l]), R=on(R[l]), W_V=w["W_V"], b_V=w["b_V"], k=icfg.k, lam=icfg.lam,
        S=on(means["S"][l]) if icfg.subspace == "mean" else None, Q=on(Q_tokens.get(l)),
        energy=subspace_energy(icfg) if subspace_energy(icfg) < 1 else None, gamma=w["gamma"], beta=w["beta"],
        official_compat=icfg.official_compat, ln_aware=icfg.ln_aware, orth_scale=icfg.orth_scale,
        layer=l, ln_eps=w["ln_eps"])
    return {"prompts": res.prompts.cpu(), "match": res.match.cpu(), "orth": res.orth.cpu(), "info": res.info}


def _check_room_for_orthogonal(icfg, n_tokens: int, d: int) -> None:
    """Before any compute: a row space that must fill the width leaves the orthogonal module nothing.

    `subspace=mean`: rank(S) <= N_e, so N_e >= d fills the width (generically); `subspace=tokens`
    stacks B·N_e >> d rows. Either way, with lam > 0 only `init.energy < 1` leaves room.
    """
    if icfg.lam == 0 or subspace_energy(icfg) < 1:
        return
    rows = "B x N_e" if icfg.subspace == "tokens" else f"N_e = {n_tokens}"
    if icfg.subspace == "tokens" or n_tokens + (1 if icfg.ln_aware else 0) >= d:
        raise ConfigError(f"init.energy: with init.subspace={icfg.subspace} the row space spans {rows} tokens "
                          f"of width d = {d}, which leaves no orthogonal complement for init.lam={icfg.lam}; "
                          "set init.energy < 1 (e.g. 0.99) to truncate it, or init.lam=0")


def _spt_prompts(cfg: DictConfig, sums: LayerSums, keys: list[str], rows: list[int], P: int, d: int,
                 N_p: int) -> torch.Tensor:
    from vipamin_scale.linalg import distributed_rand_draw, kmeans

    icfg = cfg.init
    out = torch.zeros((len(rows), P, d), dtype=torch.float64)
    for i, l in enumerate(rows):  # collective per layer: the tokens stay sharded
        X = _sorted_tokens(sums, keys, l, N_p, d)  # (n_img, N_p, d)
        seed = icfg.seed + 1000 * l
        if icfg.spt_mode == "kmeans":
            out[i] = kmeans(X.reshape(-1, d), P, seed=seed, iters=icfg.kmeans_iters).centroids
        elif icfg.spt_mode == "rand":
            out[i] = distributed_rand_draw(X.reshape(-1, d), P, seed)
        else:
            pooled = spt_math.pool_windows(X, P, icfg.spt_mode.split("_")[0])  # (n_img, n_w, d)
            out[i] = distributed_rand_draw(pooled.reshape(-1, d), P, seed)
    return out


def write_prompts_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """The tensors (float32), each metadata value as JSON, and the SHA-256 of both (`vipamin_scale.digest`,
    verified by `models.prompted.load_prompts_file`); written atomically."""
    data = digest.to_bytes({k: v.detach().float().contiguous() for k, v in tensors.items()},
                           {k: json.dumps(v, allow_nan=False) for k, v in meta.items()})
    atomic_write_bytes(Path(path), data)


def read_prompts_metadata(path: str | Path) -> dict[str, Any]:
    """A prompts file's metadata as written (its digest left out)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k != digest.KEY}



# -- diagnose ---------------------------------------------------------------------------------

def init_command(cfg: DictConfig, out: str | Path) -> dict[str, Any]:
    """`vipamin-scale init`: `run_init` while holding the run directory (`train.out_dir`, Hydra's run
    dir) like any command that writes there (`runs.hold`: a directory in use is one error line)."""
    D.init_from_env()  # every rank learns the lock's outcome
    with hold(Path(cfg.train.out_dir)):
        return run_init(cfg, out)


def run_diagnose(cfg: DictConfig) -> dict[str, Any]:
    """Attention entropy, projection energy (after norm1 and without) and scale, per layer, of
    the given prompts (prompt.init_file, or computed with init.method) next to random prompts
    of the same shape. Prints a table; writes JSON and a PNG beside `out` (default: run dir).
    Holds the run directory (`runs.hold`) throughout."""
    D.init_from_env()  # every rank learns the lock's outcome
    with hold(Path(cfg.train.out_dir)):
        return _diagnose(cfg)


def _diagnose(cfg: DictConfig) -> dict[str, Any]:
    model = _prepare(cfg)
    L_p, P, d = model.prompt_shape
    out_dir = Path(cfg.train.out_dir)
    out = Path(cfg.out) if cfg.out else out_dir / "diagnostics.json"
    if cfg.prompt.init_file:
        prompts = model.prompt().detach().double()
        label = Path(cfg.prompt.init_file).stem
    else:
        prompts = run_init(cfg, out.with_name(out.stem + ".prompts.safetensors"),
                           backbone=model.backbone)["tensors"]["prompts"]
        label = cfg.init.method
    R = xavier_prompts(L_p, P, d, model.patch_size, cfg.init.seed)
    candidates = {label: prompts} if label == "random" else {label: prompts, "random": R}
    report = prompt_diagnostics(cfg, model, candidates)
    if D.rank() == 0:
        print(format_diagnostics(report))
        write_json(out, report, nan_as_null=True)  # strict JSON: a degenerate statistic is null
        plot_diagnostics(report, out.with_suffix(".png"))
        log.info("diagnostics written to %s and %s", out, out.with_suffix(".png"))
    D.barrier()
    return report


def prompt_diagnostics(cfg: DictConfig, model: PromptedViT, candidates: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per layer, for each named `(L_p, P, d)` prompts tensor: attention entropy (raw and / ln N),
    projection energy of the value vectors onto the patch tokens' row space (after norm1 and
    without) and scale, over the calibration images (`init.num_images`). The row space comes from
    one pass with VPT's random prompts (`init.seed`). Collective under torchrun: every rank calls it.

    Returns `{"layers", "methods": {name: {metric: [per layer]}}, "B", "prompt_shape"}`.
    """
    from vipamin_scale.init.diagnostics import projection_energy, value_vectors

    L_p, P, d = model.prompt_shape
    R = xavier_prompts(L_p, P, d, model.patch_size, cfg.init.seed)
    rows = list(range(L_p))
    calib = Calibration(cfg, model)
    heads = model.backbone.blocks[0].attn.num_heads
    n_tokens = 1 + P + model.backbone.patch_embed.num_patches

    _, base = reduce_means(capture_layer_stats(model, calib, R.float(), CaptureSpec(layers=rows, attn_out=True)))
    report: dict[str, Any] = {"layers": rows, "methods": {}, "B": calib.B, "prompt_shape": [L_p, P, d]}
    for name, p in candidates.items():
        B, m = reduce_means(capture_layer_stats(model, calib, p.float(), CaptureSpec(layers=rows, entropy=True)))
        per = {"entropy": [], "entropy_norm": [], "energy_norm1": [], "energy_raw": [], "scale": []}
        for l in rows:
            w = layer_weights(model, l)
            Q = vip.row_space_basis(base["S"][l])
            u = value_vectors(p[l], w["W_V"], w["b_V"], norm=(w["gamma"], w["beta"], w["ln_eps"]))
            H = (m["H"][l] / (heads * P)).item()
            per["entropy"].append(H)
            per["entropy_norm"].append(H / torch.log(torch.tensor(float(n_tokens))).item())
            per["energy_norm1"].append(float(projection_energy(u.norm1, Q)))
            per["energy_raw"].append(float(projection_energy(u.raw, Q)))
            per["scale"].append((p[l].norm(dim=-1).mean() / m["T"][l]).item())
        report["methods"][name] = per
    return report


_COLUMNS = (("entropy_norm", "H/lnN"), ("energy_norm1", "E(norm1)"), ("energy_raw", "E(raw)"), ("scale", "scale"))


def format_diagnostics(report: dict[str, Any]) -> str:
    names = list(report["methods"])
    head = "| layer | " + " | ".join(f"{n} {c}" for n in names for _, c in _COLUMNS) + " |"
    lines = [head, "|" + "---|" * (1 + len(names) * len(_COLUMNS))]
    for i, l in enumerate(report["layers"]):
        cells = [f"{report['methods'][n][key][i]:.3f}" for n in names for key, _ in _COLUMNS]
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_diagnostics(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(_COLUMNS), figsize=(4 * len(_COLUMNS), 3.2), constrained_layout=True)
    for ax, (key, title) in zip(axes, _COLUMNS):
        for name, per in report["methods"].items():
            ax.plot(report["layers"], per[key], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("layer")
    axes[0].legend()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
