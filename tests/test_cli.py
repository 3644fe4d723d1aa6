"""The command line as a user meets it: a misspelt or mistyped override, or a run directory another process
holds, is one `error:` line (exit 2) before anything is written; init and diagnose hold their run directory;
a dict field set on the command line takes the value written."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import TINY, cli_env, held_elsewhere
from omegaconf import OmegaConf

from vipamin_scale import runs
from vipamin_scale.cli import main


@pytest.mark.parametrize("override, says", [
    ("model.pol=cls", "error: model.pol: no such field; did you mean model.pool?"),
    ("+model.pol=cls", "error: model.pol: no such field; did you mean model.pool?"),  # `+` adds nothing read
    ("trian.lr=0.1", "error: trian.lr: no such field; did you mean train.lr?"),
    ("train.lr=abc", "error: train.lr: 'abc' is not a float"),
    ("prompt.deep=maybe", "error: prompt.deep: 'maybe' is not a boolean"),
    ("engine=zero4", "error: engine=zero4: no such option; the options are ddp, deepspeed, fairscale, fsdp2, "
                     "zero1, zero2, zero3"),
    ("experiment=vith_vipamn", "error: experiment=vith_vipamn: no such option; the options are vith_vipamin, "
                               "vitl_vipamin"),  # the top-level configs/ of this clone
    ("tune.space=[1,2]", "error: tune.space: [1, 2] is not a dict"),
], ids=["field", "added_field", "section", "float", "bool", "group_option", "experiment", "dict_field"])
def test_bad_override_is_one_line_before_anything_is_written(override, says, tmp_path, capfd):
    run = tmp_path / "run"
    code = main(["train", "model=vit_test_d64", override, f"hydra.run.dir={run}"])
    err = capfd.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines() == [says], err
    assert not run.exists()



@pytest.mark.parametrize("command", ["init", "diagnose", "train"])
def test_a_run_directory_in_use_is_refused_before_anything_is_written(command, tmp_path, capfd):
    """Another live process holds the run directory: one line naming it, and nothing (Hydra's `.hydra/`,
    its log) is written there."""
    run = tmp_path / "run"
    run.mkdir()
    with held_elsewhere(run) as pid:
        code = main([command, *TINY, f"out={tmp_path / 'p.safetensors'}", f"hydra.run.dir={run}"])
    err = capfd.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith(f"error: train.out_dir: {run} is in use by pid {pid}"), err
    assert list(run.iterdir()) == []


@pytest.mark.parametrize("command", ["init", "diagnose"])
def test_init_and_diagnose_hold_the_run_directory(command, tmp_path):
    """The commands take the lock themselves (a process that took it after the CLI's check still wins)."""
    from vipamin_scale import compose
    from vipamin_scale.cli import HYDRA_TASKS

    run = tmp_path / "run"
    cfg = compose([*TINY, f"out={tmp_path / 'p.safetensors'}", f"hydra.run.dir={run}"])
    run.mkdir()
    with held_elsewhere(run), pytest.raises(runs.RunLocked, match="is in use by pid"):
        HYDRA_TASKS[command](cfg)
    assert not (tmp_path / "p.safetensors").exists()


SPACE = "{train: {lr: {log: [0.05, 0.5], num: 3}}}"


@pytest.mark.slow
def test_a_dict_field_set_on_the_command_line_takes_that_value(tmp_path):
    """`tune.space={...}` (issue 32's command, which Hydra alone refuses in eight lines) replaces the preset's
    space; `tune.slurm={...}` replaces the defaults; a key of a dict field is set or added (`+` not needed).
    Through the real CLI: exit 0, nothing on stderr, the values in the composed config (`--cfg job`), and
    the same config from `vipamin_scale.compose`."""
    import vipamin_scale

    overrides = ["tune=lr", f"tune.space={SPACE}", "tune.space.init.lam=[0.1,0.5]", "tune.slurm={slurm_partition: gpu}",
                 "tune.slurm.mem_gb=64", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "vipamin_scale.cli", "tune", "--cfg", "job", *overrides],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    tune = yaml.safe_load(proc.stdout)["tune"]
    assert tune["space"] == {"train": {"lr": {"log": [0.05, 0.5], "num": 3}}, "init": {"lam": [0.1, 0.5]}}
    assert tune["slurm"] == {"slurm_partition": "gpu", "mem_gb": 64}
    cfg = vipamin_scale.compose(overrides)
    assert OmegaConf.to_container(cfg.tune.space) == tune["space"] and cfg.tune.slurm.mem_gb == 64
    bad = subprocess.run([sys.executable, "-m", "vipamin_scale.cli", "tune", "tune.space=[1,2]"], env=cli_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.splitlines() == ["error: tune.space: [1, 2] is not a dict"]
