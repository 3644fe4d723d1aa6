"""A study's protocol as data: its methods, its cells, the config of each of its runs, and what fixes its results.

    methods(cfg)                     -> {name: Method}            study.methods, parsed and checked
    cells(cfg)                       -> [Cell]                    every (regime, shots, P, method) the study measures
    run_config(cfg, cell, params, draw, data, dir) -> (config, overrides)   one run: the run config + the method
                                                                  + the cell, and what sets it apart
    protocol_record(cfg)             -> dict                      what fixes the runs' results (a re-run must match)
    cut(cfg)                         -> {field: [preset, this]}   the protocol fields that differ from study.name's preset

Regimes. `few-shot`: for each k of study.shots, draw d (0..draws-1) takes k images per class of
data.train_split (`run.draw_roots`), the same images for every method and P; a run of draw d has
train.seed = init.seed = d. `full`: the data as configured, its first study.full_samples training images,
seeds s (train.seed = init.seed = s). Val and test are data.val_split and data.test_split, whole.

Schedules. Few-shot, n = k x classes images: batch min(data.batch_size, n), epochs
max(train.epochs, ceil(study.min_steps / (n // batch))); full data: batch min(study.full_batch, n),
study.full_epochs. Warm-up: study.warmup_fraction of the epochs, then cosine (the trainer's schedule);
the lr is the base lr x batch / 256 as in every run. Every run evaluates val once at its end (the selection's
score) and test after it (the final runs' figure; never read to select).

Methods. study.methods maps a name to its changes of the run config: a config group and its option
(`init: vipamin`, `prompt: bpt`: the packaged preset file, as `init=vipamin` on the command line) and
dotted fields (`init.spt_mode: rand`), applied in that order over the run config, so a method's own
settings win over the command line's. The value `probe` is the linear probe on frozen features.
"""
from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

import vipamin_scale.runs as runs
from vipamin_scale.config import CONFIG_DIR, ConfigError, validate

FEW, FULL = "few-shot", "full"
PROBE = "probe"  # a method's value: the linear probe on frozen features
RUN_GROUPS = ("model", "data", "prompt", "init", "engine", "train")

# What the study sets in every run itself (per cell, draw and selected point): not part of the protocol record.
SET_PER_RUN = ("prompt.length", "train.epochs", "train.warmup_epochs", "train.eval_every", "train.eval_split",
               "train.test_at_end", "train.seed", "init.seed", "init.num_images", "data.batch_size",
               "data.max_train_samples", "data.name")
# The study fields that fix its runs' results (with the run config and each method's changes). The others
# (which shots, draws, lengths, methods, seeds, the gate's use, workers, ...) choose which runs exist: more
# draws or another P in the same directory reuse the runs already there.
PROTOCOL_FIELDS = ("space", "extend_edges", "select_draws", "min_steps", "warmup_fraction", "full_samples",
                   "full_epochs", "full_batch", "probe_C")
# Study fields that say what and how to run, not what the protocol is: never a cut.
NOT_PROTOCOL = ("name", "launcher", "workers", "slurm", "pack_size", "note", "gate_from", "selected_from")


@dataclass(frozen=True)
class Method:
    name: str
    changes: dict[str, Any]  # {group: option, dotted field: value}, flattened, in the order given
    probe: bool = False
    implicit: bool = False  # the gate's probe, added when study.methods names none: no cell of its own

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass(frozen=True)
class Cell:
    """One measured cell: a method at a prompt length in a regime (shots: the few-shot k; None: full data)."""

    regime: str
    shots: Optional[int]
    length: Optional[int]  # None: the probe (no prompts)
    method: str
    n: int  # paired draws (few-shot) or seeds (full)

    @property
    def key(self) -> str:
        """`4shot/P10/vpt_random`, `full/P10/vpt_random`, `4shot/probe/linear_probe`: its directory under runs/."""
        where = f"{self.shots}shot" if self.regime == FEW else FULL
        return f"{where}/{'probe' if self.length is None else f'P{self.length}'}/{slug(self.method)}"

    @property
    def label(self) -> str:
        where = f"{self.shots}-shot" if self.regime == FEW else "full data"
        return f"{where}, {'probe' if self.length is None else f'P={self.length}'}, {self.method}"


def slug(name: str) -> str:
    """A file-name-safe form of a method's name ("BPT whiten Σ=mean" -> "bpt_whiten_sigma_mean")."""
    text = name.lower().replace("σ", "sigma").replace("λ", "lam")
    return "_".join(p for p in re.split(r"[^a-z0-9.]+", text) if p) or "method"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _flatten(changes: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{group: option, dotted: value}: nested mappings become dotted fields; a group's string stays a group."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def methods(cfg: DictConfig) -> dict[str, Method]:
    """study.methods, each checked: a known group option or an existing field (one ConfigError naming it)."""
    given = DEFAULT_METHODS if cfg.study.methods is None else _plain(cfg.study.methods)
    if not given:
        raise ConfigError("study.methods: empty; name at least two methods, e.g. {VPT random: {init: random}, "
                          "VIPAMIN: {init: vipamin}}")
    out = {}
    for name, changes in given.items():
        if changes == PROBE:
            out[name] = Method(name, {}, probe=True)
            continue
        if changes is None:
            changes = {}
        if not isinstance(changes, Mapping):
            raise ConfigError(f"study.methods.{name}: a mapping of config groups and fields, or `{PROBE}`; "
                              f"got {changes!r}")
        flat = _flatten(changes)
        for key, value in flat.items():
            if key in RUN_GROUPS:
                group_file(key, value, f"study.methods.{name}")
            elif "." not in key or OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
                raise ConfigError(f"study.methods.{name}.{key}: no such config field or group "
                                  f"(groups: {', '.join(RUN_GROUPS)})")
            elif key.split(".")[0] not in RUN_GROUPS:
                raise ConfigError(f"study.methods.{name}.{key}: a method changes the run config "
                                  f"({', '.join(RUN_GROUPS)}), not {key.split('.')[0]}.*")
        out[name] = Method(name, flat)
    slugs = [m.slug for m in out.values()]
    for m in out.values():
        if slugs.count(m.slug) > 1:
            raise ConfigError(f"study.methods: {m.name!r} and another name share the directory name {m.slug!r}")
    if cfg.study.gate and not cfg.study.gate_from and not any(m.probe for m in out.values()):
        out[GATE_PROBE] = Method(GATE_PROBE, {}, probe=True, implicit=True)
    return out


GATE_PROBE = "linear probe"  # the gate's reference when study.methods names no probe
DEFAULT_METHODS = {"VPT random": {"init": "random"}, "VIPAMIN": {"init": "vipamin"}}  # study.methods=null


def group_file(group: str, option: Any, where: str) -> Path:
    """The preset file of `group=option`, the first on Hydra's search path (`config.config_dirs`: the package's
    tree, then the top-level one), as `group=option` on the command line finds it; else a ConfigError."""
    from vipamin_scale.config import config_dirs, group_options

    found = [d / group / f"{option}.yaml" for d in config_dirs()] if isinstance(option, str) else []
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        raise ConfigError(f"{where}.{group}: no such option {option!r}; the options are "
                          f"{', '.join(group_options(group))}")
    return path


def apply_method(cfg: DictConfig, method: Method) -> DictConfig:
    """A copy of `cfg` with the method's groups merged in (as `group=option` would), then its fields set."""
    out = copy.deepcopy(cfg)
    for key, value in method.changes.items():
        if key in RUN_GROUPS:
            preset = OmegaConf.load(group_file(key, value, f"study.methods.{method.name}"))
            out[key] = OmegaConf.merge(out[key], preset)
    for key, value in method.changes.items():
        if key not in RUN_GROUPS:
            try:
                OmegaConf.update(out, key, value, merge=False)
            except Exception as exc:
                raise ConfigError(f"study.methods.{method.name}.{key}: {value!r}: {str(exc).splitlines()[0]}") from None
    return out


def draws_per_shot(cfg: DictConfig) -> dict[int, int]:
    """{k: paired draws} from study.shots and study.draws (one count per k, or one for all)."""
    shots, draws = list(cfg.study.shots), list(cfg.study.draws)
    if len(draws) == 1:
        draws = draws * len(shots)
    if len(draws) != len(shots):
        raise ConfigError(f"study.draws: one count per study.shots {shots} (or one for all); got {draws}")
    return dict(zip(shots, draws))


def gate_length(cfg: DictConfig) -> int:
    lengths = list(cfg.study.lengths)
    return int(cfg.study.gate_length if cfg.study.gate_length is not None else 10 if 10 in lengths else lengths[0])


def prompt_methods(cfg: DictConfig) -> list[str]:
    return [name for name, m in methods(cfg).items() if not m.probe]


def cells(cfg: DictConfig) -> list[Cell]:
    """Every cell the study measures, in table order: few-shot per k (P, then method), then the full data
    (the gate's cells among them unless study.gate_from reuses another study's gate)."""
    s = cfg.study
    ms = methods(cfg)
    prompt = [n for n, m in ms.items() if not m.probe]
    probes = [n for n, m in ms.items() if m.probe]
    out = []
    for k, n in draws_per_shot(cfg).items():
        out += [Cell(FEW, k, int(p), m, n) for p in s.lengths for m in prompt]
        out += [Cell(FEW, k, None, m, n) for m in probes if not ms[m].implicit]
    full = []
    if s.full_seeds > 0:
        lengths = s.full_lengths if s.full_lengths is not None else s.lengths
        chosen = s.full_methods if s.full_methods is not None else prompt
        full += [Cell(FULL, None, int(p), m, int(s.full_seeds)) for p in lengths for m in prompt if m in chosen]
        full += [Cell(FULL, None, None, m, 1) for m in probes if m in chosen]
    if s.gate and not s.gate_from:
        gate = Cell(FULL, None, gate_length(cfg), s.baselines[0], max(1, int(s.full_seeds)))
        if gate not in full:
            full.append(gate)
        if not any(c.length is None for c in full):
            full.append(Cell(FULL, None, None, probes[0], 1))
    return out + full


def check(cfg: DictConfig) -> None:
    """The study's own fields, before anything is read or trained (one ConfigError naming the field)."""
    s = cfg.study
    ms = methods(cfg)
    if not s.lengths or any(int(p) < 1 for p in s.lengths):
        raise ConfigError(f"study.lengths: prompt lengths >= 1; got {list(s.lengths)}")
    if any(int(k) < 1 for k in s.shots) or len(set(s.shots)) != len(s.shots):
        raise ConfigError(f"study.shots: distinct counts >= 1 of images per class; got {list(s.shots)}")
    per_shot = draws_per_shot(cfg)
    if any(n < 1 for n in per_shot.values()):
        raise ConfigError(f"study.draws: at least 1 draw per k; got {list(s.draws)}")
    if per_shot and s.space and not s.select_draws <= min(per_shot.values()):
        raise ConfigError(f"study.select_draws: at most the fewest draws of any k ({min(per_shot.values())}); "
                          f"got {s.select_draws}")
    if not 0 <= s.extend_edges <= 2:
        raise ConfigError(f"study.extend_edges: must be 0, 1 or 2; got {s.extend_edges}")
    if not s.baselines or any(b not in ms for b in s.baselines):
        raise ConfigError(f"study.baselines: names of study.methods ({', '.join(ms)}); got {list(s.baselines)}")
    if ms[s.baselines[0]].probe and s.gate:
        raise ConfigError(f"study.baselines: the first ({s.baselines[0]}) is the gate's prompt method; the probe "
                          f"is the gate's reference, not its subject")
    if s.gate and not s.gate_from and gate_length(cfg) not in list(s.lengths):
        raise ConfigError(f"study.gate_length: one of study.lengths {list(s.lengths)}; got {s.gate_length}")
    for name in ("full_lengths", "full_methods"):
        value = s[name]
        among = list(s.lengths) if name == "full_lengths" else list(ms)
        if value is not None and not set(value) <= set(among):
            raise ConfigError(f"study.{name}: a subset of {among}; got {list(value)}")
    if not s.shots and s.full_seeds == 0:
        raise ConfigError("study.shots: empty and study.full_seeds=0: the study would measure nothing")
    if s.selected_from and s.space:
        raise ConfigError("study.selected_from: takes the selection from another study; set study.space=null too "
                          "(else it would select again)")


# ----------------------------------------------------------------------------- one run's config


def schedule(n: int, batch: int, epochs: int, min_steps: int, warmup_fraction: float) -> dict[str, Any]:
    """Batch, epochs, steps and warm-up epochs of a run on n training images (drop_last: n // batch steps an epoch)."""
    b = min(batch, n)
    per_epoch = n // b
    ep = max(epochs, math.ceil(min_steps / per_epoch))
    return {"batch": b, "epochs": ep, "steps": ep * per_epoch, "warmup_epochs": round(ep * warmup_fraction, 3)}


def cell_schedule(cfg: DictConfig, cell: Cell, n: int) -> dict[str, Any]:
    s = cfg.study
    if cell.regime == FEW:
        return schedule(n, cfg.data.batch_size, cfg.train.epochs, s.min_steps, s.warmup_fraction)
    return schedule(n, s.full_batch, s.full_epochs, 0, s.warmup_fraction)


def params_slug(params: Mapping[str, Any]) -> str:
    """A selected point as a directory name: {train.lr: 0.1581} -> lr0.1581; none -> `as_given`."""
    if not params:
        return "as_given"
    return "_".join(f"{k.rsplit('.', 1)[-1].replace('weight_decay', 'wd')}{v}" for k, v in params.items())


def run_config(cfg: DictConfig, cell: Cell, params: Mapping[str, Any], draw: int, data: Mapping[str, Any],
               out_dir: Path, init_cache: Optional[Path] = None) -> tuple[DictConfig, list[str]]:
    """The config of one prompt run of `cell` at the point `params` (its selected or candidate settings), draw
    (or seed) `draw`, on `data` ({name, root, train_split, max_train_samples, n}: the draw's or the full data),
    and what sets it apart within the study as `field=value` strings (its regime, the method's changes, the
    cell's fields, the point, the draw: what `vipamin-scale report` groups and pairs by). `init_cache`: where
    runs that differ only in what the initializer does not read share one computed init (train.init_cache)."""
    method = methods(cfg)[cell.method]
    run = apply_method(base_config(cfg), method)
    sched = cell_schedule(cfg, cell, int(data["n"]))
    changes = {
        "prompt.length": cell.length, "data.name": data["name"], "data.root": data["root"],
        "data.train_split": data["train_split"], "data.max_train_samples": data["max_train_samples"],
        "data.batch_size": sched["batch"], "train.epochs": sched["epochs"],
        "train.warmup_epochs": sched["warmup_epochs"], "train.eval_every": sched["epochs"],
        "train.eval_split": "val", "train.test_at_end": True, "train.seed": draw, "init.seed": draw,
        "init.num_images": min(int(data["n"]), int(run.init.num_images)), **dict(params)}
    for key, value in {**changes, "train.out_dir": str(out_dir), "train.resume": True, "train.overwrite": False,
                       "train.progress": False, "train.init_cache": None if init_cache is None else str(init_cache)
                       }.items():
        OmegaConf.update(run, key, value, merge=False)
    validate(run)
    from vipamin_scale.tune.space import hydra_value

    regime = f"{cell.shots}-shot" if cell.regime == FEW else FULL
    said = [f"regime={regime}", *(f"{k}={hydra_value(v)}" for k, v in method.changes.items())]
    said += [f"{k}={hydra_value(v)}" for k, v in changes.items() if k not in ("data.root", "data.name")]
    return run, said


@functools.lru_cache(maxsize=1024)
def _split_count(root: str, split: str) -> int:
    from vipamin_scale.data import dataset_info

    info = dataset_info(root)["splits"]
    return sum(info[part]["count"] for part in split.split("+"))


def train_count(data: Any) -> int:
    """The training images a run of this data config reads: its train split, at most data.max_train_samples
    of its first component (as the loader takes them)."""
    from vipamin_scale.data import resolve_root

    root = resolve_root(data)
    parts = str(data.train_split).split("+")
    first = _split_count(str(root), parts[0])
    if data.max_train_samples is not None:
        first = min(first, int(data.max_train_samples))
    return first + sum(_split_count(str(root), p) for p in parts[1:])


def base_config(cfg: DictConfig) -> DictConfig:
    """The run config every run of the study starts from: the composed config with the study and tune
    sections at their defaults (a run records neither)."""
    from vipamin_scale.config import default_config

    base = copy.deepcopy(cfg)
    defaults = default_config()
    base.study, base.tune = defaults.study, defaults.tune
    return base


# ----------------------------------------------------------------------------- what fixes the results


def method_identity(cfg: DictConfig, method: Method) -> dict[str, Any]:
    """What the runs of `method` share, whatever their cell, point and draw: the identity (`runs.identity`) of the
    run config with the method applied, less what the study sets per run and the selected fields. The probe's:
    the backbone and data fields (what its features depend on)."""
    space = [k for k, _ in _space_leaves(cfg)]
    base = base_config(cfg)
    ident = runs.identity(base if method.probe else apply_method(base, method))
    keep = {k: v for k, v in ident.items()
            if not (k.startswith(("study.", "tune.")) or k in SET_PER_RUN or k in space)}
    return {k: v for k, v in keep.items() if k.startswith(("model.", "data."))} if method.probe else keep


def protocol_record(cfg: DictConfig) -> dict[str, Any]:
    """What fixes the study's results: the protocol fields of the study and, per method, what its runs share
    (`method_identity`). A re-run into the same directory must agree on every field, methods compared by name
    (methods may be added)."""
    return {"study": {k: _plain(cfg.study[k]) for k in PROTOCOL_FIELDS},
            "methods": {name: method_identity(cfg, m) for name, m in methods(cfg).items() if not m.implicit}}


def _space_leaves(cfg: DictConfig) -> list[tuple[str, Any]]:
    from vipamin_scale.tune.space import parse_space

    return parse_space(cfg.study.space) if cfg.study.space else []


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`a.b: old -> new` for every leaf that differs between two nested records (`runs.differences`, flattened;
    a dotted key such as a method's field stays one name)."""
    def flat(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.update(flat(value, name) if isinstance(value, Mapping) and value else {name: value})
        return out

    return runs.differences(flat(old), flat(new))


def protocol_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`field: old -> new` for every protocol field that differs (methods: those of both records)."""
    diff = [f"study.{d}" for d in differences(old.get("study", {}), new.get("study", {}))]
    for name in [m for m in new.get("methods", {}) if m in old.get("methods", {})]:
        diff += [f"(method {name}) {d}" for d in differences(old["methods"][name], new["methods"][name])]
    return diff


def preset_file(name: str) -> Path:
    """The study preset `name` (study.name: the protocol a study is a cut of), on Hydra's search path."""
    try:
        return group_file("study", name, "study.name")
    except ConfigError:
        return CONFIG_DIR / "study" / f"{name}.yaml"  # absent: `cut` names nothing


def cut(cfg: DictConfig) -> dict[str, list[Any]]:
    """{field: [the preset's value, this study's]} for every field that differs from study.name's preset
    (the preset file over the schema's defaults): the study's fields but the bookkeeping ones, and the run
    fields the preset sets. Empty for the preset itself, or when no preset is named."""
    from vipamin_scale.config import default_config

    name = cfg.study.name
    if not name or not preset_file(name).is_file():
        return {}
    preset = OmegaConf.merge(default_config(), OmegaConf.load(preset_file(name)))
    fields = {f"study.{k}" for k in cfg.study if k not in NOT_PROTOCOL}
    fields |= {k for k in _flatten(_plain(OmegaConf.load(preset_file(name)))) if not k.startswith("study.")}
    out = {}
    for key in sorted(fields):
        a, b = _plain(OmegaConf.select(preset, key)), _plain(OmegaConf.select(cfg, key))
        if a != b:
            out[key] = [a, b]
    return out


def subject(cfg: DictConfig) -> dict[str, Any]:
    """What the study runs on (not its protocol): the backbone and the data."""
    m, d = cfg.model, cfg.data
    return {"model": m.name, "checkpoint": m.checkpoint, "pretrained": m.pretrained, "img_size": m.img_size,
            "pool": m.pool, "depth": m.depth, "checkpoint_format": m.checkpoint_format, "dtype": m.dtype,
            "deep": cfg.prompt.deep, "prompt_kind": cfg.prompt.kind, "data": d.name, "data_root": d.root,
            "train_split": d.train_split, "val_split": d.val_split, "test_split": d.test_split,
            "precision": cfg.train.precision}


def in_subject(dotted: str) -> bool:
    """Whether a run field says what a study runs on (the backbone, the data's splits) rather than how."""
    return dotted.startswith("model.") or dotted in ("data.train_split", "data.val_split", "data.test_split")
