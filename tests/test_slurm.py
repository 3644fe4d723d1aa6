"""`slurm/vith_vipamin.sh` on a real Slurm: a private slurmctld + two slurmd (n1, n2) on this machine.

The job script runs unchanged; only its settings are overridden (environment + Hydra overrides)
for a tiny ViT on CPU with DDP/gloo, one torchrun per fake node (world size 2). The Debian
packages are installed when missing (root + apt); the tests skip only when that is impossible.
Also here, without Slurm: the preemption hook itself (SIGUSR1/SIGUSR2 or VIPAMIN_SCALE_PREEMPT_AT_STEP: checkpoint
mid-epoch or before the first step, exit, exact resume) and the scripts' command lines.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO, TINY, cli, cli_env, torchrun
from safetensors.torch import load_file

from vipamin_scale import checkpoint as ckpt
from vipamin_scale.faults import HOLD_AT_STEP_ENV, KILL_RANK_ENV, SIGNAL_AT_BUILD_ENV
from vipamin_scale.preempt import PREEMPT_AT_STEP_ENV, PREEMPT_EXIT_CODE

pytestmark = pytest.mark.slow  # a private Slurm cluster, multi-process jobs

SCRIPT = REPO / "slurm" / "vith_vipamin.sh"
# The script's settings for a tiny ViT on CPU (DDP over gloo), world size 2 = 2 nodes x 1 process.
JOB_ENV = {"MODEL": "vit_test_d64", "DATA": "digits", "ENGINE": "ddp", "PROMPT": "deep", "PROMPT_LENGTH": "4",
           "INIT": "vipamin", "NPROC_PER_NODE": "1", "VENV": str(REPO / ".venv"), "PRECISION": "fp32"}
INIT_OVERRIDES = ["init.k=3", "init.lam=0.5", "init.num_images=70", "init.batch_size=16", "model.pool=mean"]
# 256 images / a global batch of 16 (8 a rank x 2 ranks) = 16 steps an epoch, 6 epochs: long enough to be signalled mid-run.
TRAIN_OVERRIDES = ["data.max_train_samples=256", "data.batch_size=16", "data.eval_batch_size=128", "train.epochs=6",
                   "train.lr=0.5", "train.warmup_epochs=0.5", "train.log_every=1", "train.progress=false"]
SBATCH = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
          "--job-name=vs-test"]


def _fake_srun(tmp) -> str:
    """A directory whose `srun` says its options on stderr and runs the command as it is (no Slurm)."""
    (tmp / "bin").mkdir()
    (tmp / "bin" / "srun").write_text('#!/bin/bash\necho "srun $*" >&2\nwhile [[ $1 == -* ]]; do shift; done\n'
                                      'exec "$@"\n')
    (tmp / "bin" / "srun").chmod(0o755)
    return str(tmp / "bin")


def _final_trainable(run_dir):
    return ckpt.load(ckpt.latest(run_dir / "checkpoints"))["trainable"]["params"]


def _assert_same_trainable(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- without Slurm


def test_preemption_checkpoints_mid_epoch_and_resumes_exactly(tmp_path, digits_root):
    """The hook alone: 'signalled' at step 11 (epoch 1, 3 of 8 steps), resumed: the uninterrupted result."""
    args = [*TINY, "prompt.dropout=0.1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    ref = subprocess.Popen(cli("train", *args, f"hydra.run.dir={full}"), env=cli_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        proc = subprocess.run(cli("train", *args, f"hydra.run.dir={cut}"), env=cli_env(**{PREEMPT_AT_STEP_ENV: "11"}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        assert proc.returncode == PREEMPT_EXIT_CODE, proc.stdout[-3000:]
        assert "preempted at step 11: checkpoint written" in proc.stdout
        state = ckpt.load(ckpt.latest(cut / "checkpoints"))
        assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 3, 11)
        assert not (cut / "result.json").exists()
        proc = subprocess.run(cli("train", *args, f"hydra.run.dir={cut}", "train.resume=true"),
                              env=cli_env(**{PREEMPT_AT_STEP_ENV: "11"}), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _, err = ref.communicate(timeout=600)
        assert ref.returncode == 0, err[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.communicate()
    a, b = _final_trainable(full), _final_trainable(cut)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((cut / "result.json").read_text())["steps"] == 24


PREEMPT_ARGS = [*TINY, "prompt.dropout=0.1"]  # 8 steps an epoch, 3 epochs; dropout: the RNG state resumes too


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_root):
    """The run of PREEMPT_ARGS trained without a stop: what every preempted and resumed one must end at."""
    run = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(cli("train", *PREEMPT_ARGS, f"hydra.run.dir={run}"), env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _resume_to_the_end(run, uninterrupted, env):
    proc = subprocess.run(cli("train", *PREEMPT_ARGS, f"hydra.run.dir={run}", "train.resume=true"), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed from" in proc.stdout and "preempted" not in proc.stdout, proc.stdout[-3000:]
    a, b = _final_trainable(uninterrupted), _final_trainable(run)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((run / "result.json").read_text())["steps"] == 24


def test_sigusr2_mid_training_checkpoints_exits_75_and_resumes_exactly(tmp_path, uninterrupted):
    """SIGUSR2 (submitit's signal) to a training process: it stops at the next check with a checkpoint and
    PREEMPT_EXIT_CODE; resumed, it ends where the uninterrupted run does."""
    run = tmp_path / "run"
    env = cli_env(**{HOLD_AT_STEP_ENV: "10"})  # waits at step 10 (epoch 1) for the signal: it lands mid-training
    proc = subprocess.Popen(cli("train", *PREEMPT_ARGS, f"hydra.run.dir={run}"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r'"event": "train", [^\n]*"step": 10,', (run / "metrics.jsonl").read_text()
                            if (run / "metrics.jsonl").is_file() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == PREEMPT_EXIT_CODE, out[-3000:]
    assert "preempted at step 11: checkpoint written; continue with train.resume=true" in out
    state = ckpt.load(ckpt.latest(run / "checkpoints"))
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 3, 11)
    assert not (run / "result.json").exists()
    _resume_to_the_end(run, uninterrupted, env)


def test_a_signal_while_the_run_builds_stops_it_before_its_first_step(tmp_path, uninterrupted):
    """SIGUSR1 right after the backbone is built (VIPAMIN_SCALE_SIGNAL_AT_BUILD): the process does not die of
    it; it writes the checkpoint of step 0 (the initial prompts) and exits with PREEMPT_EXIT_CODE before any
    step; resumed (the switch still set, off once resumed), it ends where the uninterrupted run does."""
    run = tmp_path / "run"
    env = cli_env(**{SIGNAL_AT_BUILD_ENV: "1"})
    proc = subprocess.run(cli("train", *PREEMPT_ARGS, f"hydra.run.dir={run}"), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == PREEMPT_EXIT_CODE, proc.stdout[-3000:]
    assert "preempted at step 0: checkpoint written; continue with train.resume=true" in proc.stdout
    state = ckpt.load(ckpt.latest(run / "checkpoints"))
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 0, 0)
    metrics = run / "metrics.jsonl"
    assert not metrics.is_file() or '"event": "train"' not in metrics.read_text()
    assert not (run / "result.json").exists()
    _resume_to_the_end(run, uninterrupted, env)


def test_a_signal_to_one_rank_while_building_stops_every_rank_before_the_first_step(tmp_path, digits_root):
    """torchrun, 2 ranks, only rank 1 signalled during the build: the ranks agree (`Preemption.requested`, a
    collective) and both stop before the first step, with the checkpoint of step 0 written at world 2."""
    run = tmp_path / "run"
    proc = subprocess.run(torchrun(2, "train", *PREEMPT_ARGS, f"hydra.run.dir={run}"),
                          env=cli_env(**{SIGNAL_AT_BUILD_ENV: "1", KILL_RANK_ENV: "1"}), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode != 0 and f"exitcode  : {PREEMPT_EXIT_CODE}" in proc.stdout, proc.stdout[-3000:]
    assert "preempted at step 0: checkpoint written" in proc.stdout, proc.stdout[-3000:]
    state = ckpt.load(ckpt.latest(run / "checkpoints"))
    assert (state["global_step"], state["world_size"], len(state["rng"])) == (0, 2, 2)
    assert not (run / "result.json").exists()


def test_a_stop_asked_at_the_runs_last_check_lets_it_finish(tmp_path, uninterrupted):
    """Asked at the last step (the run's last check): it finishes (exit 0, result.json) and says so."""
    run = tmp_path / "run"
    env = cli_env(**{PREEMPT_AT_STEP_ENV: "24"})
    proc = subprocess.run(cli("train", *PREEMPT_ARGS, f"hydra.run.dir={run}"), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "asked to stop at step 24, the run's last check: finishing the run" in proc.stdout
    assert "preempted" not in proc.stdout
    assert json.loads((run / "result.json").read_text())["steps"] == 24
    a, b = _final_trainable(uninterrupted), _final_trainable(run)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_preemption_signals_are_kept_from_install_on():
    """SIGUSR1 and SIGUSR2 set one flag that a new Preemption (a sweep's next run) does not clear; `install` is
    idempotent; outside the main thread it installs nothing."""
    code = """
import os, signal, threading
import vipamin_scale.preempt as p
out = []
t = threading.Thread(target=lambda: out.append(p.install()))
t.start(); t.join()
assert out == [False] and signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
assert p.install() and p.install() and not p.signalled()
os.kill(os.getpid(), signal.SIGUSR2)
assert p.signalled()
assert p.Preemption().requested() and p.signalled()
os.kill(os.getpid(), signal.SIGUSR1)
print("alive")
"""
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "alive\n", proc.stderr[-3000:]


def test_prompt_length_sweep_maps_the_array_index_to_length_init_and_seed(tmp_path):
    """slurm/prompt_length_sweep.sh alone (its vith_vipamin.sh replaced by an echo, srun by a pass-through): the
    length varies slowest, the seed fastest; a seed sets init.seed and train.seed and fills DATA_ROOT's {seed}.
    PACK=1 starts its one process as a job step (srun), which the #SBATCH --signal=USR1@120 reaches."""
    (tmp_path / "slurm").mkdir()
    shutil.copy(REPO / "slurm" / "prompt_length_sweep.sh", tmp_path / "slurm")
    (tmp_path / "slurm" / "vith_vipamin.sh").write_text('echo "$INIT $PROMPT_LENGTH $RUN $DATA_ROOT $*"; '
                                                        'echo "experiment=$EXPERIMENT" >&2\n')
    env = {"PATH": f"{_fake_srun(tmp_path)}:/usr/bin:/bin", "REPO": str(tmp_path), "SLURM_ARRAY_JOB_ID": "7",
           "LENGTHS": "1 10 50", "INITS": "vipamin random", "SEEDS": "0 1 2", "DATA_ROOT": "/d/4shot_seed{seed}"}

    def task(i, **extra):
        return subprocess.run(["bash", str(tmp_path / "slurm" / "prompt_length_sweep.sh"), "x=1"], capture_output=True,
                              text=True, env={**env, "SLURM_ARRAY_TASK_ID": str(i), **extra})

    sweep = tmp_path / "runs" / "prompt-length-7"
    first = task(0)
    assert first.stdout.split() == ["vipamin", "1", f"{sweep}/vipamin-deep-len1-seed0", "/d/4shot_seed0",
                                    "init.seed=0", "train.seed=0", "x=1"]
    assert first.stderr == "experiment=vitl_vipamin\n"  # the ViT-L job's experiment unless EXPERIMENT says otherwise
    assert task(5).stdout.split()[:4] == ["random", "1", f"{sweep}/random-deep-len1-seed2", "/d/4shot_seed2"]
    assert task(17).stdout.split()[:2] == ["random", "50"]
    bad = task(18)
    assert bad.returncode == 2 and "LENGTHS x INITS x SEEDS has 18 entries" in bad.stderr and "--array=0-17" in bad.stderr
    one = task(3, SEEDS="", INITS="", INIT="spt", LENGTHS="1 5 10 50")  # as before: one init, no seed override
    assert one.stdout.split() == ["spt", "50", f"{sweep}/spt-deep-len50", "/d/4shot_seed{seed}", "x=1"]
    # PACK=1: a task per (length, seed), its inits one pack (the command replaced by an echo)
    packed = task(4, PACK="1", VIPAMIN_SCALE="echo")
    assert packed.stdout.split() == [
        "train", "-m", "hydra/launcher=packed", "experiment=vitl_vipamin", "prompt.length=10", "init=vipamin,random",
        "engine=ddp", "train.resume=true", "init.seed=1", "train.seed=1", "data.root=/d/4shot_seed1",
        f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra:runtime.choices.init}-deep-len10-seed1", "x=1"]
    assert packed.stderr.startswith("srun --kill-on-bad-exit=1 --nodes=1 --ntasks=1 echo train -m "), packed.stderr
    mine = task(4, PACK="1", VIPAMIN_SCALE="echo", EXPERIMENT="vith_vipamin", MODEL="vit_l16", PRECISION="fp32")
    assert mine.stdout.split()[3:10] == ["experiment=vith_vipamin", "model=vit_l16", "prompt.length=10",
                                         "init=vipamin,random", "engine=ddp", "train.precision=fp32", "model.dtype=fp32"]
    bad = task(9, PACK="1", VIPAMIN_SCALE="echo")
    assert bad.returncode == 2 and "LENGTHS x SEEDS (PACK=1) has 9 entries" in bad.stderr and "--array=0-8" in bad.stderr


def test_the_jobs_name_their_experiment_and_pass_only_the_settings_given(tmp_path):
    """slurm/vith_vipamin.sh and vitl_vipamin.sh with srun and scontrol replaced by echoes: both commands get
    `experiment=<the job's>` first, then only the settings given in the environment (ENGINE, PRECISION and
    DTYPE to `train` alone; model.dtype follows PRECISION), then the script's own and the user's overrides."""
    (tmp_path / "slurm").mkdir()
    for name in ("vith_vipamin.sh", "vitl_vipamin.sh"):
        shutil.copy(REPO / "slurm" / name, tmp_path / "slurm")
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" ---\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho n1\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "REPO": str(tmp_path), "VENV": str(venv), "SLURM_JOB_ID": "5",
           "SLURM_JOB_NODELIST": "n1", "RUN": str(tmp_path / "run")}

    def commands(script, **extra):
        proc = subprocess.run(["bash", str(tmp_path / "slurm" / script), "x=1"], capture_output=True, text=True,
                              env={**env, **extra}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out = {}
        for call in proc.stdout.split("---\n")[:-1]:  # srun's arguments: ... bash -c SCRIPT PYTHON PORT COMMAND ARGS
            args = call.splitlines()
            command = args[args.index(str(venv / "bin" / "python")) + 2:]
            out[command[0]] = command[1:]
        return out

    run = tmp_path / "run"
    plain = commands("vith_vipamin.sh")
    assert plain["init"] == ["experiment=vith_vipamin", f"out={run}/prompts.safetensors", f"hydra.run.dir={run}/init",
                             "hydra.output_subdir=null", "x=1"]
    assert plain["train"] == ["experiment=vith_vipamin", f"prompt.init_file={run}/prompts.safetensors",
                              "data.batch_size=32", "train.resume=true", f"hydra.run.dir={run}", "x=1"]
    given = commands("vitl_vipamin.sh", MODEL="vit_l16", DATA_ROOT="/d", PROMPT_LENGTH="50", ENGINE="zero3",
                     PRECISION="fp32")
    assert given["init"][:4] == ["experiment=vitl_vipamin", "model=vit_l16", "prompt.length=50", "data.root=/d"]
    assert given["train"][:7] == ["experiment=vitl_vipamin", "model=vit_l16", "prompt.length=50", "data.root=/d",
                                  "engine=zero3", "train.precision=fp32", "model.dtype=fp32"]
    assert commands("vith_vipamin.sh", EXPERIMENT="mine")["train"][0] == "experiment=mine"


def test_prompt_length_sweep_pack_task_trains_its_inits_as_one_pack(tmp_path):
    """PACK=1 for real (without Slurm: srun runs its command as it is): the task's two inits train as one pack
    into the run directories the unpacked array writes, with the seed's init.seed, train.seed and draw."""
    env = cli_env(PATH=f"{_fake_srun(tmp_path)}:{os.environ['PATH']}", REPO=str(REPO), SLURM_ARRAY_JOB_ID="7",
                  SLURM_ARRAY_TASK_ID="1", PACK="1", LENGTHS="2 3", INITS="random vipamin", SEEDS="0 5",
                  MODEL="vit_test_d64", DATA="digits", PRECISION="fp32", SWEEP=str(tmp_path / "sweep"),
                  VIPAMIN_SCALE=f"{sys.executable} -m vipamin_scale.cli")
    proc = subprocess.run(["bash", str(REPO / "slurm" / "prompt_length_sweep.sh"), "model.pool=mean",
                           "data.max_train_samples=64", "data.batch_size=32", "train.epochs=1", "train.progress=false",
                           "init.num_images=32"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for init in ("random", "vipamin"):
        run = tmp_path / "sweep" / f"{init}-deep-len2-seed5"
        result = json.loads((run / "result.json").read_text())
        assert result["pack_size"] == 2 and result["prompt_length"] == 2 and result["method"] == init
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert config["init"]["seed"] == config["train"]["seed"] == 5
        assert (config["prompt"]["deep"], config["init"]["method"], config["engine"]["name"]) == (True, init, "ddp")
        assert (config["train"]["precision"], config["model"]["dtype"]) == ("fp32", "fp32")


# ----------------------------------------------------------------------------- on Slurm


@pytest.fixture(scope="module")
def slurm():
    import slurm_support

    why = slurm_support.ensure_installed()
    if why:
        pytest.skip(f"no local Slurm: {why}")
    cluster = slurm_support.LocalSlurm()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.dir, ignore_errors=True)


def _sbatch(slurm, tmp, *, run, wait=True, env=None, timeout=480):
    cmd = ["sbatch", *SBATCH, f"--output={tmp}/slurm-%j.out", "--parsable"]
    cmd += ["--wait"] if wait else []
    cmd += [str(SCRIPT), *INIT_OVERRIDES, *TRAIN_OVERRIDES]
    job_env = {**cli_env(), **slurm.env, **JOB_ENV, "RUN": str(run), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=timeout)


def _job_log(tmp):
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp.glob("slurm-*.out")))


def _signal_requeue_and_finish(slurm, job, tmp, finish_s):
    """`scancel --signal=USR1 JOB`, then wait for the requeued job (Restarts=1; slurmctld's ~2-minute BeginTime hold
    released) to start again and to finish COMPLETED; its log."""
    sig = slurm.run("scancel", "--signal=USR1", job, timeout=30)
    assert sig.returncode == 0, sig.stderr

    def restarted(info):
        if not info:
            return True
        if info.get("Restarts") != "1":
            return False
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", timeout=30)
            return False
        # until it runs again: the requeued job is COMPLETING (its old steps ending), then held (BeginTime)
        return info.get("JobState") in ("CONFIGURING", "RUNNING", "COMPLETED")

    slurm.wait_for(job, restarted, 240, "the requeued job to start again")
    done = slurm.wait_for(job, lambda i: not i or i.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING",
                                                                            "COMPLETING", "REQUEUED"),
                          finish_s, "the requeued job to finish")
    log = _job_log(tmp)
    assert done == {} or done["JobState"] == "COMPLETED", f"{done}\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def two_node_run(slurm, tmp_path_factory, digits_root):
    """The script on 2 nodes, start to end, beside a single-process init with the same settings."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    single = tmp / "single.safetensors"
    ref = subprocess.Popen(cli("init", "model=vit_test_d64", "data=digits", "prompt=deep", "prompt.length=4",
                               "init=vipamin", *INIT_OVERRIDES, f"out={single}", f"hydra.run.dir={tmp / 'single'}"),
                           env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    proc = _sbatch(slurm, tmp, run=tmp / "run")
    elapsed = time.monotonic() - t0
    try:
        _, err = ref.communicate(timeout=300)
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.communicate()
    assert ref.returncode == 0, err[-3000:]
    assert proc.returncode == 0, f"sbatch exit {proc.returncode}: {proc.stderr}\n{_job_log(tmp)[-6000:]}\n{slurm.logs()}"
    return {"dir": tmp, "run": tmp / "run", "single": single, "elapsed": elapsed}


def test_two_nodes_init_matches_one_process_and_trains(two_node_run):
    run = two_node_run["run"]
    got, ref = load_file(str(run / "prompts.safetensors")), load_file(str(two_node_run["single"]))
    assert got.keys() == ref.keys() and got["prompts"].shape == (2, 4, 64)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=name)
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 6 * 16 and result["method"] == "file"
    assert result["test"]["count"] == 500
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())[0] == "experiment=vith_vipamin"
    log = _job_log(two_node_run["dir"])
    assert "2 nodes x 1" in log and "done:" in log


def test_a_failing_rank_fails_the_job_fast(slurm, two_node_run, tmp_path):
    """Rank 1 (node n2) dies at step 3: srun --kill-on-bad-exit stops node n1, the job fails."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(two_node_run["run"] / "prompts.safetensors", run / "prompts.safetensors")  # init skipped
    t0 = time.monotonic()
    proc = _sbatch(slurm, tmp_path, run=run, env={"VIPAMIN_SCALE_KILL_AT_STEP": "3", "VIPAMIN_SCALE_KILL_RANK": "1"},
                   timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, _job_log(tmp_path)[-4000:]
    if (run / "result.json").exists():  # rank 0 saw its peer vanish in a collective and recorded it
        assert json.loads((run / "result.json").read_text())["status"] == "failed"
    assert re.search(r"srun: error: n[12]: task [01]: ", _job_log(tmp_path))  # srun saw a task fail
    assert elapsed < 240, f"a failed rank took {elapsed:.0f} s to fail the job"
    # sbatch --wait can return while the job is still COMPLETING (seen under load): wait for its final state
    job = slurm.wait_for(proc.stdout.strip().split(";")[0], lambda info: info.get("JobState") != "COMPLETING", 60,
                         "the job's final state")
    assert job == {} or job["JobState"] == "FAILED", job


def test_a_user_error_on_one_node_is_the_jobs_one_line(slurm, two_node_run, tmp_path):
    """A corrupt sample only rank 1 (node n2) decodes: its line is the root cause on both nodes (rank 0
    stops naming it), and the job ends FAILED with exit code 2, a user error's."""
    from PIL import Image

    from vipamin_scale.data.shards import write_dataset
    from vipamin_scale.data.wds import plan_slot

    first = plan_slot([16], batch_size=16, train=True, world_size=2, rank=1, num_workers=0, worker=0, seed=0,
                      epoch=0, shuffle_buffer=1000).batches[0][0][1]  # rank 1's first sample
    samples = [(f"s{i}", Image.new("RGB", (8, 8), (15 * i, 0, 0)), i % 2) for i in range(16)]
    samples[first] = (f"s{first}", (b"\x89PNG\r\n\x1a\n garbage", "png"), 1)
    root, run = tmp_path / "data", tmp_path / "run"
    write_dataset({"train": samples, "val": samples[:4], "test": samples[:4]}, ["a", "b"], root, shuffle=False,
                  verify=False)
    run.mkdir()
    shutil.copy(two_node_run["run"] / "prompts.safetensors", run / "prompts.safetensors")  # init skipped
    proc = _sbatch(slurm, tmp_path, run=run, env={"DATA": "shards", "DATA_ROOT": str(root)}, timeout=300)
    log = _job_log(tmp_path)
    line = f"{root / 'train-000000.tar'}: key train_{first:08d}: cannot decode the png image"
    assert proc.returncode != 0 and f"error: {line}" in log, log[-4000:]
    assert f"error: stopped because rank 1 failed: {line}" in log, log[-4000:]
    assert "Connection closed" not in log and "Traceback" not in log, log[-4000:]
    job = slurm.wait_for(proc.stdout.strip().split(";")[0], lambda info: info.get("JobState") != "COMPLETING", 60,
                         "the job's final state")
    assert job == {} or (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), job


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_prompts(slurm, two_node_run, tmp_path):
    """`scancel --signal=USR1` mid-training: checkpoint at the next step, `scontrol requeue`, the
    requeued job (same id and run directory) resumes: final trainable state as uninterrupted."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(two_node_run["run"] / "prompts.safetensors", run / "prompts.safetensors")
    # each rank waits at step 20 (epoch 1 of 6) for the signal: it lands mid-training however loaded the machine
    proc = _sbatch(slurm, tmp_path, run=run, wait=False, timeout=60, env={HOLD_AT_STEP_ENV: "20"})
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    metrics = run / "metrics.jsonl"

    def training(info):
        if info.get("JobState") not in (None, "PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job ended before it was signalled: {info}\n{_job_log(tmp_path)[-4000:]}")
        return metrics.is_file() and '"event": "train"' in metrics.read_text()

    slurm.wait_for(job, training, 400, "the first training step")
    log = _signal_requeue_and_finish(slurm, job, tmp_path, 400)
    for said in ("restart 0:", "preempted at step", "restart 1:", "resumed from"):
        assert said in log, f"{said!r} is not in the job's log:\n{log[-6000:]}"
    preempted = int(log.split("preempted at step ")[1].split(":")[0])
    assert 1 <= preempted <= 21  # by the check after the hold at step 20 (log_every=1: a check every step)
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 6 * 16 and result["world_size"] == 2
    _assert_same_trainable(_final_trainable(two_node_run["run"]), _final_trainable(run))


STUDY_SCRIPT = REPO / "slurm" / "study.sh"
QUICK_STUDY = ["study=prompt_length_quick", "study.cost=false"]


@pytest.fixture(scope="module")
def slurm_array_study(slurm, tmp_path_factory):
    """The quick study with study.launcher=slurm study.workers=2: two array tasks (submitit), each a worker."""
    out = tmp_path_factory.mktemp("slurm_array") / "s"
    args = ["study", *QUICK_STUDY, "study.launcher=slurm", "study.workers=2", "study.slurm.slurm_partition=debug",
            "study.slurm.gpus_per_node=null", "study.slurm.cpus_per_task=1", "study.slurm.timeout_min=10",
            f"hydra.run.dir={out}"]
    proc = subprocess.run(cli(*args), cwd=REPO, env={**cli_env(), **slurm.env}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{slurm.logs()}"
    return out, proc


def test_a_study_job_of_two_workers_is_signalled_requeued_and_ends_as_the_uninterrupted_study(slurm, tmp_path,
                                                                                              slurm_array_study):
    """slurm/study.sh on 2 nodes (2 workers claiming packs): `scancel --signal=USR1` while both hold at their first
    step (VIPAMIN_SCALE_HOLD_AT_STEP); each stops (exit 75), the script requeues the job once, the requeued job
    continues the study, and its study.json holds the tables of the same study uninterrupted (the Slurm array's,
    itself equal to the one-process study's: test_study's torchrun workers test holds the worker count to that)."""
    from test_study import _tables

    run = tmp_path / "study"
    env = {**cli_env(), **slurm.env, "VENV": str(REPO / ".venv"), "RUN": str(run), "PRECISION": "fp32",
           HOLD_AT_STEP_ENV: "1"}
    proc = subprocess.run(["sbatch", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                           "--time=10", "--job-name=vs-study", f"--output={tmp_path}/slurm-%j.out", "--parsable",
                           str(STUDY_SCRIPT), *QUICK_STUDY], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]

    def held(info):
        if info.get("JobState") not in (None, "PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job ended before it was signalled: {info}\n{_job_log(tmp_path)[-4000:]}")
        return _job_log(tmp_path).count("holding at step 1") >= 2  # both workers wait in their first pack

    slurm.wait_for(job, held, 400, "both workers' first step")
    log = _signal_requeue_and_finish(slurm, job, tmp_path, 600)
    for said in ("restart 0:", "preempted", "the workers stopped; requeueing it", "restart 1:", "done:"):
        assert said in log, f"{said!r} is not in the job's log:\n{log[-6000:]}"
    assert _tables(json.loads((run / "study.json").read_text())) == _tables(
        json.loads((slurm_array_study[0] / "study.json").read_text()))


def test_a_study_as_a_slurm_array_of_two_workers_trains_in_both_tasks_and_prints_the_summary(slurm_array_study):
    """study.launcher=slurm study.workers=2: two array tasks, each a worker that trained runs, one submitit log each;
    this process waited and printed the study's summary."""
    out, proc = slurm_array_study
    assert "Test accuracy (%), few-shot" in proc.stdout
    assert json.loads((out / "study.json").read_text())["cells"]
    trainers = {json.loads(r.read_text())["attempts"][0]["pid"] for r in (out / "runs").rglob("run.json")}
    assert len(trainers) == 2
    assert len(list((out / ".submitit").glob("*/*_log.out"))) == 2


def test_usr1_reaches_the_pack_task_a_job_step_which_requeues_and_resumes(slurm, tmp_path, digits_root):
    """prompt_length_sweep.sh PACK=1 on Slurm: its one process is a job step, so `scancel --signal=USR1` (the
    script's --signal=USR1@120, no B:) reaches it; it checkpoints, requeues, and the requeued task finishes."""
    sweep = tmp_path / "sweep"
    env = {**cli_env(), **slurm.env, "PACK": "1", "LENGTHS": "2", "INITS": "random vipamin", "MODEL": "vit_test_d64",
           "DATA": "digits", "PRECISION": "fp32", "SWEEP": str(sweep), HOLD_AT_STEP_ENV: "20",
           "VIPAMIN_SCALE": f"{sys.executable} -m vipamin_scale.cli"}
    cmd = ["sbatch", "--array=0", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=10", "--job-name=vs-pack", f"--output={tmp_path}/slurm-%A_%a.out", "--parsable",
           str(REPO / "slurm" / "prompt_length_sweep.sh"), "model.pool=mean", "init.num_images=32", *TRAIN_OVERRIDES]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    metrics = sweep / "random-deep-len2" / "metrics.jsonl"
    slurm.wait_for(job, lambda info: metrics.is_file() and '"event": "train"' in metrics.read_text(), 300,
                   "the first training step")
    log = _signal_requeue_and_finish(slurm, job, tmp_path, 400)
    for said in ("preempted at step", "resumed from"):
        assert said in log, f"{said!r} is not in the job's log:\n{log[-6000:]}"
    for init in ("random", "vipamin"):
        result = json.loads((sweep / f"{init}-deep-len2" / "result.json").read_text())
        assert result["steps"] == 6 * 16 and result["pack_size"] == 2


def test_hydra_submitit_launcher_runs_a_sweep_as_slurm_jobs(slurm, tmp_path, digits_root):
    """`-m hydra/launcher=slurm` (vipamin_scale/configs/hydra/launcher/slurm.yaml): each sweep point a Slurm job."""
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", *TINY, "train.epochs=1",
            "data.max_train_samples=128", "prompt.length=1,4", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cli(*args), cwd=REPO, env={**cli_env(), **slurm.env}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for job, length in ((0, 1), (1, 4)):
        result = json.loads((sweep / str(job) / "result.json").read_text())
        assert result["prompt_length"] == length and result["test"]["count"] == 500
    assert list(sweep.glob(".submitit/*/*.out"))  # ran under Slurm, through submitit
    report = subprocess.run(cli("report", str(sweep)), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "2 runs: 2 finished, 0 failed, 0 incomplete." in report.stdout


def test_tune_runs_its_trials_as_slurm_jobs(slurm, tmp_path, digits_root):
    """`vipamin-scale tune tune.launcher=slurm`: every trial and final run a Slurm job, through submitit."""
    out = tmp_path / "tune"
    args = ["tune", *TINY, "data.max_train_samples=128", "+tune.space.train.lr=[0.05,2.0]", "tune.max_epochs=1",
            "tune.final_seeds=1", "tune.launcher=slurm", "tune.slurm.slurm_partition=debug",
            "tune.slurm.gpus_per_node=null", "tune.slurm.cpus_per_task=1", "tune.slurm.timeout_min=10",
            f"hydra.run.dir={out}"]
    proc = subprocess.run(cli(*args), cwd=REPO, env={**cli_env(), **slurm.env}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{slurm.logs()}"
    doc = json.loads((out / "tune.json").read_text())
    assert [t["status"] for t in doc["rungs"][0]["trials"]] == ["ok", "ok"]
    assert doc["final"]["n"] == 1 and doc["final"]["runs"][0]["test_acc"] is not None
    assert len(list((out / ".submitit").glob("*/*_log.out"))) == 3  # 2 trials + 1 final, each a Slurm job
