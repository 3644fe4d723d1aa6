"""Packs (issue 22): K runs in one process over one backbone, each equal to its solo run; runs fail alone;
a killed pack resumes bit-identically; the loop's step does not sync the host (issue 24). The pack step
(issue 33): each batch copied once, the K runs' prompts never copied per sample, heads, losses and the
optimizer as single ops equal to each solo run and to torch's AdamW; an oracle written in plain PyTorch
for the trainer itself. Shared inits (issue 32, item 7): one capture per distinct init."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli_env, free_port

import vipamin_scale
import vipamin_scale.distributed as D
from vipamin_scale import checkpoint as ckpt
from vipamin_scale.config import ConfigError
from vipamin_scale.train import PackTrainer, check_pack, train_pack

WORKER = Path(__file__).resolve().parent / "dist_scripts" / "pack_worker.py"
SHORT = ["train.epochs=2", "data.max_train_samples=64", "init.num_images=64", "init.k=2"]  # 2 steps/epoch
# VPT runs that differ in what a pack allows: initializer, lr, wd, train.seed (another loader), init.seed
VPT = {"random": ["init=random"],
       "vipamin": ["init=vipamin", "init.num_images=64", "init.k=2", "train.lr=0.2", "train.weight_decay=0.01",
                   "train.seed=1"],
       "spt": ["init=spt", "init.num_images=64", "init.seed=3", "train.lr=0.3"],
       "diverges": ["init=random", "train.lr=1e30"]}
BPT = {"bpt_random": ["init=random", "prompt.kind=bpt", "prompt.bpt=whiten_fixed"],
       "bpt_vipamin": ["init=vipamin", "init.num_images=64", "init.k=2", "prompt.kind=bpt", "prompt.bpt=whiten_fixed",
                       "train.lr=0.2", "train.seed=1"]}
TOL = 1e-5


def _cfg(out_dir, *overrides):
    return vipamin_scale.compose([*TINY, *SHORT, *overrides, f"train.out_dir={out_dir}"])


def _losses(run):
    """[(step, loss)] of the train records (a step logged again after a resume: the last record)."""
    records = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r["event"] == "train"}
    return sorted(records.items())


def _same_run(packed: Path, solo: Path, exact: bool = False) -> None:
    """metrics losses, final prompts and head (solo parameter names), result.json accuracies."""
    a, b = json.loads((packed / "result.json").read_text()), json.loads((solo / "result.json").read_text())
    if b.get("status") == "failed":
        assert a["status"] == "failed" and a["error"] == b["error"], (a["error"], b["error"])
        assert json.loads((packed / "run.json").read_text())["status"] == "failed"
        return
    la, lb = _losses(packed), _losses(solo)
    assert [s for s, _ in la] == [s for s, _ in lb]
    assert max(abs(x - y) for (_, x), (_, y) in zip(la, lb)) <= (0 if exact else TOL), (la, lb)
    pa = ckpt.load(ckpt.latest(packed / "checkpoints"))["trainable"]["params"]
    pb = ckpt.load(ckpt.latest(solo / "checkpoints"))["trainable"]["params"]
    assert sorted(pa) == sorted(pb)
    for name in pa:
        diff = (pa[name] - pb[name]).abs().max().item()
        assert diff <= (0 if exact else TOL), (name, diff)
    for key in ("final_eval", "test") if "test" in b else ("final_eval",):
        for metric in ("acc", "loss"):
            assert abs(a[key][metric] - b[key][metric]) <= (0 if exact else TOL), (key, metric, a[key], b[key])


def test_check_pack_names_the_field(tmp_path):
    base = ["model=vit_test_d64", "data=digits"]
    cfg = lambda name, *o: vipamin_scale.compose([*base, *o, f"train.out_dir={tmp_path / name}"])  # noqa: E731
    check_pack([cfg("a", "train.lr=0.1", "init=vipamin", "train.seed=3"), cfg("b", "train.weight_decay=0.5")])
    with pytest.raises(ConfigError, match=r"^train\.epochs: the runs of a pack must share it \(5 in run 0, 3 in run 1"):
        check_pack([cfg("a"), cfg("b", "train.epochs=3")])
    with pytest.raises(ConfigError, match=r"^prompt\.length: the runs of a pack must share it"):
        check_pack([cfg("a"), cfg("b", "prompt.length=3")])
    with pytest.raises(ConfigError, match=r"^train\.out_dir: runs 0 and 1 of the pack both write into"):
        check_pack([cfg("a"), cfg("a", "train.lr=0.2")])
    with pytest.raises(ConfigError, match=r"^prompt\.dropout: 0\.1 draws its masks from the global RNG"):
        check_pack([cfg("a", "prompt.dropout=0.1"), cfg("b", "prompt.dropout=0.1")])
    check_pack([cfg("a", "prompt.dropout=0.1")])  # alone it is the solo run
    with pytest.raises(ConfigError, match=r"^engine\.name: packs of several runs train with engine\.name=ddp"):
        check_pack([cfg("a", "engine=fsdp2"), cfg("b", "engine=fsdp2")])


@pytest.mark.slow
def test_packed_runs_equal_their_solo_runs_and_fail_alone(tmp_path, digits_root):
    """World 1, in process: VPT runs (random, vipamin, spt, and one that diverges) in one pack, two BPT
    runs in another; each equals its solo run (the diverging one fails with the same record)."""
    for name, overrides in {**VPT, **BPT}.items():
        train_pack([_cfg(tmp_path / "solo" / name, *overrides)])
    for group in (VPT, BPT):
        results = train_pack([_cfg(tmp_path / "pack" / name, *o) for name, o in group.items()])
        assert [r.get("status", "ok") for r in results] == ["failed" if n == "diverges" else "ok" for n in group]
    for name in {**VPT, **BPT}:
        _same_run(tmp_path / "pack" / name, tmp_path / "solo" / name)
    error = json.loads((tmp_path / "pack" / "diverges" / "result.json").read_text())["error"]
    assert error.startswith("TrainingDiverged: train: the loss is ") and " at step 2 (epoch 0), lr " in error
    assert json.loads((tmp_path / "pack" / "random" / "result.json").read_text())["pack_size"] == 4


@pytest.mark.slow
def test_packed_runs_equal_solo_at_world_2_and_a_killed_pack_resumes_exactly(tmp_path, digits_root):
    """One torchrun launch (gloo, 2 ranks) trains every run solo and in packs; then a pack of two,
    SIGKILLed after step 3 (faults.py) and re-run with the same command, equals it uninterrupted, bit for bit."""
    spec = [[[str(tmp_path / "solo" / n), *SHORT, *o]] for n, o in {**VPT, **BPT}.items()]
    spec += [[[str(tmp_path / "pack" / n), *SHORT, *o] for n, o in group.items()] for group in (VPT, BPT)]
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                           f"--master-port={free_port()}", str(WORKER), str(spec_file)],
                          env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in {**VPT, **BPT}:
        assert json.loads((tmp_path / "pack" / name / "result.json").read_text()).get("world_size", 2) == 2
        _same_run(tmp_path / "pack" / name, tmp_path / "solo" / name)

    two = {n: VPT[n] for n in ("random", "vipamin")}
    for kind, env in (("whole", cli_env()), ("killed", cli_env(VIPAMIN_SCALE_KILL_AT_STEP="3"))):
        spec_file.write_text(json.dumps([[[str(tmp_path / kind / n), *SHORT, *o, "train.resume=true"]
                                          for n, o in two.items()]]))
        proc = subprocess.run([sys.executable, str(WORKER), str(spec_file)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == (-9 if kind == "killed" else 0), proc.stderr[-3000:]
    for name in two:
        assert ckpt.latest(tmp_path / "killed" / name / "checkpoints").name == "ckpt-00000002.safetensors"
        assert not (tmp_path / "killed" / name / "result.json").exists()
    spec_file.write_text(json.dumps([[[str(tmp_path / "killed" / n), *SHORT, *o, "train.resume=true"]
                                      for n, o in two.items()]]))
    proc = subprocess.run([sys.executable, str(WORKER), str(spec_file)], env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in two:
        _same_run(tmp_path / "killed" / name, tmp_path / "whole" / name, exact=True)


def test_a_pack_killed_between_two_runs_checkpoint_writes_resumes_exactly(tmp_path, digits_root):
    """keep_last=1, SIGKILL right after the first run of a pack of two wrote its step-4 checkpoint and before
    the second wrote its own (faults.py): every run still holds step 2 (no run prunes before all have
    written), so the same command resumes the pack there and equals it uninterrupted, bit for bit."""
    two = {n: [*VPT[n], "train.keep_last=1", "train.resume=true"] for n in ("random", "vipamin")}
    spec_file = tmp_path / "spec.json"
    for kind, env in (("whole", cli_env()), ("killed", cli_env(VIPAMIN_SCALE_KILL_AFTER_CHECKPOINT="3"))):
        spec_file.write_text(json.dumps([[[str(tmp_path / kind / n), *SHORT, *o] for n, o in two.items()]]))
        proc = subprocess.run([sys.executable, str(WORKER), str(spec_file)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == (-9 if kind == "killed" else 0), proc.stderr[-3000:]
    names = {n: [p.name for p in ckpt.list_checkpoints(tmp_path / "killed" / n / "checkpoints")] for n in two}
    assert names == {"random": ["ckpt-00000002.safetensors", "ckpt-00000004.safetensors"],
                     "vipamin": ["ckpt-00000002.safetensors"]}, names
    proc = subprocess.run([sys.executable, str(WORKER), str(spec_file)], env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in two:
        _same_run(tmp_path / "killed" / name, tmp_path / "whole" / name, exact=True)
        assert [p.name for p in ckpt.list_checkpoints(tmp_path / "killed" / name / "checkpoints")] == [
            "ckpt-00000004.safetensors"]  # keep_last=1 holds once every run has written
        # the log too: what the cut attempt logged past step 2 was dropped, not left beside its redo
        log = (tmp_path / "killed" / name / "metrics.jsonl").read_text()
        assert log == (tmp_path / "whole" / name / "metrics.jsonl").read_text() and '"step": 4' in log


def test_the_step_does_not_sync_the_host(tmp_path, digits_root, monkeypatch):
    """A run of 4 steps with train.log_every=4: no host sync called by the package inside a step, and at
    most 2 (the fused collective and its read) per check, over the whole epoch loop but evaluation.
    (torch's own CPU AdamW reads its step counter with .item(); on CUDA it does not: not counted.)"""
    counts = {"step": 0, "epoch": 0}
    where: list[str] = []
    package = str(Path(vipamin_scale.__file__).parent)

    def counting(fn):
        def wrapped(*args, **kwargs):
            if where and sys._getframe(1).f_code.co_filename.startswith(package):
                counts[where[-1]] += 1
            return fn(*args, **kwargs)
        return wrapped

    def inside(name, fn):
        def wrapped(*args, **kwargs):
            where.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                where.pop()
        return wrapped

    for attr in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, attr, counting(getattr(torch.Tensor, attr)))
    copies = {"blocking": 0, "non_blocking": 0}  # the batch's copies to the device happen inside the step
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if where and where[-1] == "step" and any(isinstance(a, (torch.device, str)) for a in [*args, kwargs.get("device")]):
            copies["non_blocking" if kwargs.get("non_blocking") else "blocking"] += 1
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    for attr in ("all_reduce_sum", "all_reduce_max", "all_gather", "all_gather_object", "broadcast", "barrier"):
        monkeypatch.setattr(D, attr, counting(getattr(D, attr)))
    monkeypatch.setattr(PackTrainer, "train_step", inside("step", PackTrainer.train_step))
    monkeypatch.setattr(PackTrainer, "train_epoch", inside("epoch", PackTrainer.train_epoch))
    monkeypatch.setattr(PackTrainer, "evaluate", inside("eval", PackTrainer.evaluate))  # not counted
    counts["eval"] = 0
    (result,) = train_pack([vipamin_scale.compose([*TINY, "train.epochs=1", "data.max_train_samples=128",
                                                   "train.log_every=4", "train.test_at_end=false",
                                                   f"train.out_dir={tmp_path / 'run'}"])])
    assert result["steps"] == 4
    assert counts["step"] == 0, counts
    assert counts["epoch"] <= 2, counts
    assert copies == {"blocking": 0, "non_blocking": 4 * 2}, copies  # images and labels, once a step, not waited on


def test_plan_packs_groups_compatible_runs_costliest_first(tmp_path):
    from vipamin_scale.packs import plan_packs

    cfgs = [vipamin_scale.compose(["model=vit_test_d64", *o, f"train.out_dir={tmp_path / str(i)}"])
            for i, o in enumerate([["train.lr=0.1"], ["prompt.length=3"], ["init=vipamin"], ["train.seed=2"],
                                   ["prompt.length=3", "train.lr=0.2"]])]
    assert cfgs[0].prompt.length > 3  # the default length: its packs cost more than P = 3's
    assert plan_packs(cfgs) == [[0, 2, 3], [1, 4]]
    assert plan_packs(cfgs, pack_size=2) == [[0, 2], [1, 4], [3]]
    with pytest.raises(ConfigError, match=r"^hydra\.launcher\.pack_size: must be >= 1"):
        plan_packs(cfgs, pack_size=0)


def test_plan_packs_gives_each_worker_a_share_of_uneven_groups(tmp_path):
    """Two workers, a costly group (P 100, 6 runs) beside a cheap one (P 1, 6 runs): the costly group is cut so that
    no pack holds more than a worker's share of the whole, the cheap one stays whole; costliest first."""
    from vipamin_scale.packs import plan_packs

    cfgs = [vipamin_scale.compose(["model=vit_test_d64", f"prompt.length={p}", f"train.lr={0.1 * (i + 1)}",
                                   f"train.out_dir={tmp_path / f'{p}_{i}'}"]) for p in (1, 100) for i in range(6)]
    cost = {1: 1.0, 100: 10.0}

    def by_length(cfg):
        return cost[int(cfg.prompt.length)]

    assert plan_packs(cfgs, workers=1, cost=by_length) == [list(range(6, 12)), list(range(6))]
    # the whole: 66, a worker's share 33: the P 100 group (60) in 2 packs of 3 (30 each), P 1 (6) whole
    assert plan_packs(cfgs, workers=2, cost=by_length) == [[6, 7, 8], [9, 10, 11], list(range(6))]
    assert plan_packs(cfgs, pack_size=2, workers=2, cost=by_length) == [[6, 7], [8, 9], [10, 11], [0, 1], [2, 3],
                                                                         [4, 5]]


def test_runs_resuming_from_other_steps_never_share_a_pack(tmp_path, digits_root):
    """A pack trains in lockstep from one step: plan_packs keeps resuming runs apart by the checkpoint they
    resume from, and a pack given such runs directly refuses before any training, naming them (it used to
    start every run at step 0 beside the other run's newer checkpoint, which then outranked the new ones)."""
    from vipamin_scale.packs import plan_packs

    train_pack([_cfg(tmp_path / "done", *VPT["random"], "train.keep_last=1")])
    cut = tmp_path / "cut"  # a run cut after a checkpoint (its files as a killed run leaves them)
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt.latest(tmp_path / "done" / "checkpoints"), cut / "checkpoints")
    cfgs = [_cfg(cut, *VPT["random"], "train.resume=true"),
            _cfg(tmp_path / "new", *VPT["random"], "train.resume=true", "train.seed=5"),
            _cfg(tmp_path / "other", *VPT["random"], "train.seed=6")]
    assert plan_packs(cfgs) == [[1, 2], [0]]  # the pack of two costs more
    with pytest.raises(ConfigError, match=rf"^train\.resume: a pack resumes its runs at one step, but {tmp_path / 'new'} "
                                          rf"has no checkpoint while {cut} has; train them in separate packs"):
        train_pack(cfgs[:2])
    assert [p.name for p in ckpt.list_checkpoints(cut / "checkpoints")] == [
        ckpt.latest(tmp_path / "done" / "checkpoints").name]
    assert not ckpt.list_checkpoints(tmp_path / "new" / "checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True])
def test_hydra_packed_launcher_spreads_packs_over_torchrun_ranks(tmp_path, digits_root, resume):
    """`vipamin-scale train -m hydra/launcher=packed` under torchrun (2 ranks): 4 jobs in packs of 2, each trained
    alone (world 1), by claim when the runs continue (train.resume=true), else round-robin (a run another rank
    finished would be refused as an earlier sweep's); every job directory holds Hydra's records and a run's."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "vipamin_scale.cli", "train", "-m", "hydra/launcher=packed",
            "hydra.launcher.pack_size=2", *TINY, *SHORT, "train.epochs=1", "train.lr=0.05,0.16", "init=random,vipamin",
            f"train.resume={str(resume).lower()}", f"hydra.sweep.dir={sweep}", f"hydra.run.dir={tmp_path / 'unused'}"]
    proc = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        result = json.loads((job / "result.json").read_text())
        assert result["pack_size"] == 2 and result["world_size"] == 1 and result["steps"] == 2
        assert (job / ".hydra" / "overrides.yaml").is_file()
        assert json.loads((job / "run.json").read_text())["status"] == "finished"
    said = "rank 1 is one of 2 workers claiming them" if resume else "rank 1 of 2: packs round-robin"
    assert said in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_packed_sweep_whose_runs_are_refused_exits_2_with_each_runs_line(tmp_path, digits_root):
    """A finished sweep run again without train.resume: one `error:` line per run, the solo run's line, exit 2
    (as `vipamin-scale train` alone); under another config with train.resume=true: each run's mismatch line;
    the runs' directories (Hydra's records included) as they were; with train.resume=true: exit 0."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "vipamin_scale.cli", "train", "-m", "hydra/launcher=packed", *TINY, *SHORT,
            "train.epochs=1", "train.test_at_end=false", "init=random,vipamin", f"hydra.sweep.dir={sweep}"]
    first = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    solo = subprocess.run([sys.executable, "-m", "vipamin_scale.cli", "train", *TINY, *SHORT, "train.epochs=1",
                           "train.test_at_end=false", "init=random", f"hydra.run.dir={sweep / '0'}"], env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert solo.returncode == 2 and len(solo.stderr.splitlines()) == 1, solo.stderr
    before = [_tree(sweep / job) for job in "01"]  # (the solo run's Hydra wrote its .hydra/ into job 0 first)
    again = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 2, again.stderr[-4000:]
    line = solo.stderr.strip()
    assert again.stderr.splitlines() == [line, line.replace(str(sweep / "0"), str(sweep / "1"))]
    other = subprocess.run([*args, "train.lr=0.3", "train.resume=true"], env=cli_env(), capture_output=True, text=True,
                           timeout=600)
    assert other.returncode == 2 and [line.split(" holds a run made under another config ")[1] for line in
                                      other.stderr.splitlines()] == ["(train.lr: 0.5 -> 0.3); use the same config "
                                                                     "or a new directory"] * 2
    assert [_tree(sweep / job) for job in "01"] == before  # records, checkpoints and Hydra's own
    resumed = subprocess.run([*args, "train.resume=true"], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr[-4000:]


def test_a_run_with_bad_data_fails_alone(tmp_path):
    """Two draws of a task in one pack, one with an undecodable image: that run fails with its solo
    run's record (the same one line); the other ends as it would alone."""
    from PIL import Image

    from vipamin_scale.data.shards import write_dataset

    samples = [(f"s{i}", Image.new("RGB", (8, 8), (20 * i, 0, 0)), i % 2) for i in range(16)]
    write_dataset({"train": samples, "val": samples[:4]}, ["a", "b"], tmp_path / "good", shuffle=False, verify=False)
    samples[5] = ("s5", (b"\x89PNG\r\n\x1a\n garbage", "png"), 1)
    write_dataset({"train": samples, "val": samples[:4]}, ["a", "b"], tmp_path / "bad", shuffle=False, verify=False)
    data = ["data=shards", "data.batch_size=8", "data.max_train_samples=null", "train.epochs=1", "train.test_at_end=false"]
    cfg = lambda kind, root: vipamin_scale.compose([*TINY, *data, f"data.root={tmp_path / root}",  # noqa: E731
                                                    f"train.out_dir={tmp_path / kind / root}"])
    for root in ("good", "bad"):
        train_pack([cfg("solo", root)])
    good, bad = train_pack([cfg("pack", "good"), cfg("pack", "bad")])
    assert bad["status"] == "failed" and "cannot decode the png image" in bad["error"], bad
    assert "status" not in good and good["steps"] == 2
    for root in ("good", "bad"):
        _same_run(tmp_path / "pack" / root, tmp_path / "solo" / root)


@pytest.mark.slow
def test_hydra_packed_sweep_with_a_failed_run_exits_as_the_basic_launcher(tmp_path, digits_root):
    """A sweep whose second run diverges: every run's records are written, then the failed run's one
    `error:` line and exit 2 (what `vipamin-scale train -m` prints and returns under the basic launcher)."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "vipamin_scale.cli", "train", "-m", "hydra/launcher=packed", *TINY, *SHORT,
            "train.epochs=1", "train.lr=0.05,1e30,0.16", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-4000:]
    results = [json.loads((sweep / str(i) / "result.json").read_text()) for i in range(3)]
    assert [r.get("status", "ok") for r in results] == ["ok", "failed", "ok"]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert lines == ["error: " + results[1]["error"].split(": ", 1)[1]] and "the loss is nan" in lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_run_its_directory_refuses_is_left_out_before_any_compute(tmp_path, monkeypatch):
    """run_packed asks each run's directory first (runs.refusal): a fresh run over a finished one, or a resume
    under another config, gets the solo run's refusal as its record, its directory untouched, and no pack
    trains it; the other runs train."""
    import vipamin_scale.packs as packs

    done = _cfg(tmp_path / "done", "train.epochs=1", "train.test_at_end=false")
    train_pack([done])
    before = _tree(tmp_path / "done")
    packed = []
    real = packs.train_pack
    monkeypatch.setattr(packs, "train_pack", lambda cfgs: packed.append([c.train.out_dir for c in cfgs]) or real(cfgs))
    again = _cfg(tmp_path / "done", "train.epochs=1", "train.test_at_end=false")
    other = _cfg(tmp_path / "done", "train.epochs=1", "train.test_at_end=false", "train.lr=0.3", "train.resume=true")
    new = _cfg(tmp_path / "new", "train.epochs=1", "train.test_at_end=false")
    refused, mismatch, ok = packs.run_packed([again, other, new], keep_going=True)
    assert refused == {"status": "failed", "refused": True, "error": (
        f"RunExists: train.out_dir: {tmp_path / 'done'} holds a run (finished: checkpoint ckpt-00000002.safetensors); "
        "continue it with train.resume=true, start it over with train.overwrite=true, or use another directory")}
    assert mismatch["refused"] and mismatch["error"].startswith(
        f"RunMismatch: train.resume: {tmp_path / 'done'} holds a run made under another config (train.lr: 0.5 -> 0.3)")
    assert "status" not in ok and ok["steps"] == 2
    assert packed == [[str(tmp_path / "new")]] and _tree(tmp_path / "done") == before
    assert packs.sweep_code([refused, ok]) == 2


def test_a_pack_that_fails_as_a_whole_is_recorded_per_run_and_the_next_pack_goes_on(tmp_path):
    """run_packed(keep_going=True) (the Hydra and tune launchers): a pack whose shared backbone cannot load
    records the error for each of its runs; the next pack trains."""
    from vipamin_scale.packs import run_packed

    bad = _cfg(tmp_path / "bad", "train.epochs=1", f"model.checkpoint={tmp_path / 'missing.safetensors'}")
    good = _cfg(tmp_path / "good", "train.epochs=1", "train.test_at_end=false")
    with pytest.raises(ConfigError, match="^model.checkpoint: no such file"):
        run_packed([bad, good])
    failed, ok = run_packed([bad, good], keep_going=True)
    assert failed["status"] == "failed" and failed["error"].startswith("ConfigError: model.checkpoint: no such file")
    assert json.loads((tmp_path / "bad" / "result.json").read_text())["error"] == failed["error"]
    assert "status" not in ok and ok["steps"] == 2


def test_a_pack_failing_with_a_bug_is_told_apart_from_a_user_error(tmp_path, monkeypatch, caplog):
    """keep_going: a pack whose training raises a bug (not a user error) records its runs failed with
    "bug", logs the traceback, and the next pack trains; the sweep's exit code is 1 for a bug, 2 for a
    user error only, 0 for none (Hydra's basic launcher: a traceback and 1; one line and 2)."""
    import logging

    import vipamin_scale.packs as packs

    real = packs.train_pack

    def buggy(cfgs):
        if "buggy" in str(cfgs[0].train.out_dir):
            raise ZeroDivisionError("an internal mistake")
        return real(cfgs)

    monkeypatch.setattr(packs, "train_pack", buggy)
    bad = _cfg(tmp_path / "buggy", "train.epochs=1", "train.test_at_end=false")
    good = _cfg(tmp_path / "good", "train.epochs=1", "train.test_at_end=false")
    with caplog.at_level(logging.ERROR, logger="vipamin_scale.packs"):
        failed, ok = packs.run_packed([bad, good], pack_size=1, keep_going=True)
    assert failed["status"] == "failed" and failed["bug"] is True and failed["error"].startswith("ZeroDivisionError")
    assert "bug" not in json.loads((tmp_path / "buggy" / "result.json").read_text())  # the record is the solo run's
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    assert "status" not in ok and ok["steps"] == 2
    user = {"status": "failed", "error": "TrainingDiverged: train: the loss is nan"}
    assert [packs.sweep_code(r) for r in ([ok], [ok, user], [user, failed], [None, ok])] == [0, 2, 1, 0]


# ----------------------------------------------------------------------------- the pack step (issue 33)


def _bench():
    import vipamin_scale.profiling

    return vipamin_scale.profiling  # the instruments of bench_pack.py: count_ops, allocator_peak


def _runs(K: int, P: int = 4, **overrides):
    """K tiny runs' models around one backbone (run k: init.seed = k), and their pack."""
    from vipamin_scale.config import default_config
    from vipamin_scale.models import build_model, load_backbone
    from vipamin_scale.models.packed import PromptedPack

    cfgs = [default_config(model__name="vit_test_d64", model__img_size=32, model__checkpoint=None, prompt__length=P,
                           init__seed=k, **overrides) for k in range(K)]
    backbone = load_backbone(cfgs[0])
    models = [build_model(c, num_classes=10, backbone=backbone) for c in cfgs]
    return models, PromptedPack(models).train()


@pytest.mark.parametrize("overrides", [dict(model__pool="mean"), dict(model__pool="cls", prompt__kind="bpt",
                                                                       prompt__bpt="lowrank", prompt__bpt_rank=8)])
def test_the_packs_heads_and_losses_are_each_runs_own(overrides):
    """One forward of a pack of 3 (VPT with each run's fc_norm; BPT low rank), the K heads as one batched matmul and
    the K losses as one cross-entropy: each run's logits, loss and gradient (its rows of the stacked parameters)
    equal its solo model's within 1e-6; a subset of live runs leaves the others' rows with zero gradient. The ops of
    forward + losses + backward do not grow with K."""
    from vipamin_scale.models.packed import run_losses

    models, pack = _runs(3, **overrides)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3 * 5, 3, 32, 32, generator=g), torch.randint(0, 10, (15,), generator=g)
    logits = pack(x)
    losses = run_losses(logits, y, 3)
    losses.sum().backward()
    stacked = dict(pack.runs.named_parameters())
    for k, model in enumerate(models):
        model.train()
        z = model(x[5 * k:5 * k + 5])
        loss = torch.nn.functional.cross_entropy(z, y[5 * k:5 * k + 5])
        loss.backward()
        assert (z - logits[5 * k:5 * k + 5]).abs().max() <= 1e-6 and abs(loss.item() - losses[k].item()) <= 1e-6
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert (stacked[name].grad[k] - p.grad).abs().max() <= 1e-6, (k, name)
    for p in stacked.values():
        p.grad = None
    run_losses(pack(x[:10], [0, 2]), y[:10], 2).sum().backward()
    assert all(torch.equal(p.grad[1], torch.zeros_like(p.grad[1])) for p in stacked.values())
    assert (pack(x[:10], [0, 2])[5:] - models[2](x[5:10])).abs().max() <= 1e-6

    bench = _bench()

    def ops(K: int) -> int:
        _, pack = _runs(K, **overrides)
        xs, ys = torch.randn(2 * K, 3, 32, 32, generator=g), torch.randint(0, 10, (2 * K,), generator=g)
        return bench.count_ops(lambda: run_losses(pack(xs), ys, K).sum().backward())[0]

    assert ops(2) == ops(8)


def test_the_packs_adamw_is_torch_adamw_for_every_run():
    """50 steps of 3 runs with their own lr, weight decay and warmup: each run's parameters (its rows of the stacked
    tensors) and moments equal torch's AdamW + LambdaLR on its solo run bit for bit; the schedule's state is each
    solo LambdaLR's; a step is the same ops at K = 1 and K = 64."""
    from vipamin_scale.engine.adamw import PackAdamW, PackSchedule
    from vipamin_scale.engine.base import cosine_with_warmup

    torch.manual_seed(0)
    K, T, lrs, wds, warmups = 3, 50, [0.1, 0.02, 0.5], [1e-4, 0.0, 0.3], [0, 3, 7]
    shapes = {"prompts": (2, 4, 8), "weight": (10, 8), "bias": (10,)}
    solo = [{n: torch.nn.Parameter(torch.randn(s)) for n, s in shapes.items()} for _ in range(K)]
    stacked = {n: torch.nn.Parameter(torch.stack([solo[k][n].detach() for k in range(K)])) for n in shapes}
    opt = PackAdamW([(n, stacked[n], len(shapes[n]) > 1) for n in shapes], wds)
    sched = PackSchedule(opt, lrs, [cosine_with_warmup(T, w) for w in warmups], T)
    refs = []
    for k in range(K):
        o = torch.optim.AdamW([dict(params=[solo[k]["prompts"], solo[k]["weight"]], weight_decay=wds[k]),
                               dict(params=[solo[k]["bias"]], weight_decay=0.0)], lr=lrs[k], betas=(0.9, 0.999))
        refs.append((o, torch.optim.lr_scheduler.LambdaLR(o, cosine_with_warmup(T, warmups[k]))))
    for _ in range(T):
        grads = {n: torch.randn(K, *s) for n, s in shapes.items()}
        for n in shapes:
            stacked[n].grad = grads[n].clone()
        assert [sched.run_lr(k) for k in range(K)] == [o.param_groups[0]["lr"] for o, _ in refs]
        opt.step(), opt.zero_grad(), sched.step()
        for k, (o, s) in enumerate(refs):
            for n in shapes:
                solo[k][n].grad = grads[n][k].clone()
            o.step(), o.zero_grad(), s.step()
    for k, (o, s) in enumerate(refs):
        for n in shapes:
            assert torch.equal(stacked[n][k], solo[k][n]), (k, n)
            state = o.state[solo[k][n]]
            mine = opt.state[stacked[n]]
            assert torch.equal(mine["exp_avg"][k], state["exp_avg"]) and torch.equal(mine["exp_avg_sq"][k], state["exp_avg_sq"])
            assert float(mine["step"]) == float(state["step"]) == T
        theirs = s.state_dict()
        assert {key: v[2 * k:2 * k + 2] if isinstance(v, list) else v for key, v in sched.state_dict().items()} == theirs

    bench = _bench()

    def step_ops(K: int) -> int:
        p = torch.nn.Parameter(torch.randn(K, 4, 8))
        q = torch.nn.Parameter(torch.randn(K, 8))
        o = PackAdamW([("p", p, True), ("q", q, False)], [0.1] * K)
        PackSchedule(o, [0.1] * K, [cosine_with_warmup(10, 2)] * K, 10)
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        o.step()
        return bench.count_ops(o.step)[0]

    assert step_ops(1) == step_ops(64)


def test_a_pack_never_holds_its_prompts_per_sample():
    """Deep prompts (L_p = 2, P = 64) of K = 4 runs reach each layer as (K, P, d), broadcast inside the concatenation:
    no op of the forward, losses and backward makes a (K·b, L_p, P, d) or (K·b, P, d) tensor (what
    `repeat_interleave` made), and the step's peak memory per run (the CPU allocator's) is the solo run's."""
    from vipamin_scale.models.packed import run_losses

    K, b, P = 4, 4, 64
    bench = _bench()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(K * b, 3, 32, 32, generator=g), torch.randint(0, 10, (K * b,), generator=g)

    def step(pack, runs: int):
        return lambda: run_losses(pack(x[:runs * b]), y[:runs * b], runs).sum().backward()

    models, pack = _runs(K, P=P, model__pool="cls")
    L_p, d = 2, 64
    made: list = []
    bench.count_ops(step(pack, K), record=made)
    for op, shapes, _ in made:
        for shape in shapes:
            assert shape != (K * b, L_p, P, d) and not (shape[:1] == (K * b,) and shape[-2:] == (P, d)), (op, shape)
    step(pack, K)()  # gradients allocated, as in every step after the first
    solo, solo_pack = _runs(1, P=P, model__pool="cls")
    step(solo_pack, 1)()
    per_run = bench.allocator_peak(step(pack, K))[0] / K
    assert per_run <= 1.01 * bench.allocator_peak(step(solo_pack, 1))[0], per_run


@pytest.mark.slow
def test_each_batch_goes_to_the_device_once_and_is_shared_there(tmp_path, digits_root, monkeypatch):
    """Three runs, two of which read the same batches (train.seed 0): each step copies 2 batches (images and
    labels) to the device, not 3, every copy non_blocking; the runs equal their solo runs."""
    calls: list[bool] = []
    real_step, real_to = PackTrainer.train_step, torch.Tensor.to
    inside = []

    def step(self, batches, live):
        inside.append(True)
        try:
            return real_step(self, batches, live)
        finally:
            inside.pop()

    def to(self, *args, **kwargs):
        if inside and any(isinstance(a, (torch.device, str)) for a in [*args, kwargs.get("device")]):
            calls.append(bool(kwargs.get("non_blocking")))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(PackTrainer, "train_step", step)
    monkeypatch.setattr(torch.Tensor, "to", to)
    runs = {"a": ["train.lr=0.1"], "b": ["train.lr=0.3"], "c": ["train.seed=1"]}
    results = train_pack([_cfg(tmp_path / "pack" / n, "init=random", "train.test_at_end=false", *o) for n, o in runs.items()])
    steps = results[0]["steps"]
    assert steps == 4 and calls == [True] * (2 * 2 * steps), calls
    monkeypatch.undo()
    for n, o in runs.items():
        train_pack([_cfg(tmp_path / "solo" / n, "init=random", "train.test_at_end=false", *o)])
        _same_run(tmp_path / "pack" / n, tmp_path / "solo" / n)


# ----------------------------------------------------------------------------- an oracle for the trainer


def _oracle(cfg, backbone, epochs_of_batches, num_classes: int):
    """The run of `cfg` written in plain PyTorch from the spec and the documented schedule, sharing nothing with
    the trainer but the backbone's weights and the batches: timm's modules, VPT-Deep prompts concatenated per layer
    ([CLS, prompts, patches]; block l >= 1 gets layer l's prompts in place of l - 1's), Xavier-uniform prompts
    U(-v, v), v = sqrt(6 / (3 ph pw + d)) drawn in float64 from init.seed, a linear head N(0, 0.02²) from
    init.seed + 1 (bias 0) on the final norm's CLS, cross-entropy, torch AdamW (weight decay on the prompts and the
    head's weight), lr = train.lr x batch / 256, linear warmup ((s + 1) / w) then cosine to 0.
    Returns (prompts, head weight, head bias, the loss of every step)."""
    import copy
    import math

    bb = copy.deepcopy(backbone).eval().requires_grad_(False)
    L, P, d = len(bb.blocks), cfg.prompt.length, bb.embed_dim
    ph, pw = bb.patch_embed.patch_size
    v = math.sqrt(6 / (3 * ph * pw + d))
    g = torch.Generator().manual_seed(cfg.init.seed)
    prompts = torch.nn.Parameter((torch.rand((L, P, d), generator=g, dtype=torch.float64) * (2 * v) - v).float())
    g = torch.Generator().manual_seed(cfg.init.seed + 1)
    weight = torch.nn.Parameter(torch.randn((num_classes, d), generator=g) * 0.02)
    bias = torch.nn.Parameter(torch.zeros(num_classes))
    opt = torch.optim.AdamW([{"params": [prompts, weight], "weight_decay": cfg.train.weight_decay},
                             {"params": [bias], "weight_decay": 0.0}],
                            lr=cfg.train.lr * cfg.data.batch_size / 256, betas=(0.9, 0.999))
    per_epoch = len(epochs_of_batches[0])
    total, warmup = per_epoch * cfg.train.epochs, round(cfg.train.warmup_epochs * per_epoch)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    for batches in epochs_of_batches:
        for images, labels in batches:
            x = bb._pos_embed(bb.patch_embed(images))  # (B, 1 + N_p, d)
            B = x.shape[0]
            x = torch.cat([x[:, :1], prompts[0].expand(B, P, d), x[:, 1:]], dim=1)
            for layer, block in enumerate(bb.blocks):
                if layer > 0:
                    x = torch.cat([x[:, :1], prompts[layer].expand(B, P, d), x[:, 1 + P:]], dim=1)
                x = block(x)
            loss = torch.nn.functional.cross_entropy(bb.norm(x)[:, 0] @ weight.T + bias, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            losses.append(loss.item())
    return prompts.detach(), weight.detach(), bias.detach(), losses


@pytest.mark.slow
def test_training_equals_an_oracle_written_in_plain_pytorch(tmp_path, digits_root):
    """`vipamin-scale train` (a solo run) and a pack of two runs with their own lr, weight decay and warmup, each
    against `_oracle` on the same batches in the loader's order: every step's loss, the final prompts and the head
    within 1e-5. (The pack = solo tests compare the trainer with itself; this does not.)"""
    import vipamin_scale as api
    from vipamin_scale.data import build_loader, resolve_root
    from vipamin_scale.models import load_backbone, normalization

    base = [*TINY, "model.pool=cls", "train.epochs=2", "data.max_train_samples=128", "train.test_at_end=false"]
    runs = {"solo": ["train.lr=0.5"], "a": ["train.lr=0.5", "train.weight_decay=0.01", "train.warmup_epochs=1"],
            "b": ["train.lr=0.2", "train.seed=0", "train.warmup_epochs=0.5"]}
    cfgs = {n: vipamin_scale.compose([*base, *o, f"train.out_dir={tmp_path / n}"]) for n, o in runs.items()}
    api.train(cfgs["solo"])
    train_pack([cfgs["a"], cfgs["b"]])
    cfg = cfgs["solo"]
    backbone = load_backbone(cfg)
    mean, std = normalization(cfg, backbone)
    loader = build_loader(cfg.data, cfg.data.train_split, train=True, seed=cfg.train.seed, limit=cfg.data.max_train_samples,
                          img_size=cfg.model.img_size, mean=mean, std=std, rank=0, world_size=1)
    epochs = []
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch)
        epochs.append([(images, labels) for images, labels, _ in loader])
    for name, run_cfg in cfgs.items():
        prompts, weight, bias, losses = _oracle(run_cfg, backbone, epochs, num_classes=10)
        trained = ckpt.load(ckpt.latest(tmp_path / name / "checkpoints"))["trainable"]["params"]
        logged = [loss for _, loss in _losses(tmp_path / name)]
        assert len(logged) == len(losses) == 8 and max(abs(a - b) for a, b in zip(logged, losses)) <= TOL, (name, logged, losses)
        for mine, theirs in ((trained["prompt.prompts"], prompts), (trained["head.weight"], weight), (trained["head.bias"], bias)):
            assert (mine - theirs).abs().max() <= TOL, name
        assert not torch.equal(trained["prompt.prompts"], _oracle(run_cfg, backbone, [[]], 10)[0])  # it trained


# ----------------------------------------------------------------------------- each init computed once (issue 32, item 7)


def _count_captures(monkeypatch) -> list[int]:
    import vipamin_scale.init.run as init_run

    calls = []
    real = init_run.capture_layer_stats

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(init_run, "capture_layer_stats", counting)
    return calls


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_each_init_is_computed_once_and_each_run_equals_its_unshared_run(tmp_path, digits_root, monkeypatch):
    """A pack of four VIPAMIN runs, two lrs x two init seeds: two captures, not four; each run's prompts.safetensors
    holds its unshared solo run's tensors bit for bit and the run trains to its solo run; run.json says which file
    it came from (its digest) and whether this run computed it. With train.init_cache, a second pack of other lrs
    computes nothing (its runs read the cache's files, digest checked) and a damaged cache file is computed again."""
    grid = {f"lr{lr}_s{s}": ["init=vipamin", "init.num_images=64", "init.k=2", f"train.lr={lr}", f"init.seed={s}"]
            for s in (0, 1) for lr in (0.1, 0.3)}
    captures = _count_captures(monkeypatch)
    train_pack([_cfg(tmp_path / "pack" / n, *o) for n, o in grid.items()])
    assert len(captures) == 2
    records = {n: json.loads((tmp_path / "pack" / n / "run.json").read_text())["init"] for n in grid}
    assert [records[n]["computed"] for n in grid] == [True, False, True, False]
    assert records["lr0.3_s0"]["file"] == str(tmp_path / "pack" / "lr0.1_s0" / "prompts.safetensors")
    assert records["lr0.3_s0"]["key"] == records["lr0.1_s0"]["key"] != records["lr0.1_s1"]["key"]
    for n, o in grid.items():
        train_pack([_cfg(tmp_path / "solo" / n, *o)])
        mine, theirs = (_tensors(tmp_path / kind / n / "prompts.safetensors") for kind in ("pack", "solo"))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), n
        _same_run(tmp_path / "pack" / n, tmp_path / "solo" / n)
    assert len(captures) == 2 + 4  # the solo runs compute their own

    cache = tmp_path / "inits"
    first = {n: [*o, f"train.init_cache={cache}"] for n, o in grid.items() if n.endswith("s0")}
    train_pack([_cfg(tmp_path / "cached" / n, *o) for n, o in first.items()])
    assert len(captures) == 7 and len(list(cache.glob("*.safetensors"))) == 1
    again = {n.replace("lr", "again"): [*o, "train.lr=0.2"] for n, o in first.items()}
    train_pack([_cfg(tmp_path / "cached" / n, *o) for n, o in again.items()])
    assert len(captures) == 7  # read from the cache
    (cached,) = cache.glob("*.safetensors")
    for n in [*first, *again]:
        record = json.loads((tmp_path / "cached" / n / "run.json").read_text())["init"]
        assert record["file"] == str(cached) and record["computed"] == (n == "lr0.1_s0")
        assert record["sha256"] == json.loads(json.dumps(record))["sha256"] and len(record["sha256"]) == 64
        assert torch.equal(_tensors(tmp_path / "cached" / n / "prompts.safetensors")["prompts"],
                           _tensors(tmp_path / "solo" / "lr0.1_s0" / "prompts.safetensors")["prompts"])
    raw = bytearray(cached.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in a tensor
    cached.write_bytes(bytes(raw))
    train_pack([_cfg(tmp_path / "cached" / "damaged", *first["lr0.1_s0"])])
    assert len(captures) == 8 and torch.equal(_tensors(cached)["prompts"],
                                              _tensors(tmp_path / "solo" / "lr0.1_s0" / "prompts.safetensors")["prompts"])


def test_processes_asking_for_one_init_at_once_compute_it_once(tmp_path):
    """Two workers (threads here: fcntl locks exclude each other's open files as they exclude processes') ask
    train.init_cache for the same key at once: one computes (the other waits on the lock), both get its prompts."""
    import threading
    import time

    from vipamin_scale.init.cache import SharedInits
    from vipamin_scale.init.run import write_prompts_file

    computed = []

    def compute(cfg, out, backbone=None):
        computed.append(out)
        time.sleep(0.5)  # long enough for the other worker to reach the lock
        prompts = torch.full((2, 4, 64), float(len(computed)))
        write_prompts_file(Path(out), {"prompts": prompts}, {"method": "test"})
        return {"prompts": prompts}

    cfg = _cfg(tmp_path / "run", "init=vipamin", f"train.init_cache={tmp_path / 'cache'}")
    got = {}

    def worker(i: int) -> None:
        got[i] = SharedInits(compute).prompts(cfg, None, tmp_path / "data", tmp_path / f"run{i}")[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(computed) == 1 and torch.equal(got[0], got[1])
