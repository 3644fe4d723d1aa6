"""A real, private Slurm cluster on this machine for tests: munged + slurmctld + two slurmd (n1, n2).

Everything lives in one temp directory (config, state, logs, munge socket and key); daemons are
started in the foreground mode's background (`-D`) as children of this process, so they are
stopped by PID in `stop()`, and nothing system-wide (systemd, /etc/slurm, /run/munge) is touched.
Installing the Debian packages (`slurmctld slurmd slurm-client munge`) needs root and apt.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from vipamin_scale.launch import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "munged")


def ensure_installed(timeout_s: float = 600.0) -> Optional[str]:
    """Install the packages when missing; return None when ready, else why it cannot be."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                return f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}"
    except subprocess.TimeoutExpired:
        return f"installing {' '.join(PACKAGES)} took over {timeout_s:.0f} s"
    missing = [b for b in BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]
    return f"installed, but still missing: {', '.join(missing)}" if missing else None


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    NODES = ("n1", "n2")

    def __init__(self, cpus_per_node: int = 2, min_job_age: int = 10, kill_wait: int = 3):
        self.dir = Path(tempfile.mkdtemp(prefix="vs-slurm-"))
        os.chmod(self.dir, 0o755)
        self.conf = self.dir / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.cpus, self.min_job_age, self.kill_wait = cpus_per_node, min_job_age, kill_wait
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del self.env[key]  # a test run inside a Slurm job must not leak that job's settings

    # ------------------------------------------------------------------ set-up

    def _start_munge(self) -> None:
        mdir = self.dir / "munge"
        mdir.mkdir()
        os.chmod(mdir, 0o755)  # munged: the socket directory must be searchable by all, writable by munge only
        munge = pwd.getpwnam("munge")
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        for p in (mdir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        self.munge_socket = mdir / "munge.socket"
        cmd = [_sbin("munged"), "--foreground", f"--key-file={key}",
               f"--socket={self.munge_socket}", f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
               f"--seed-file={mdir / 'munged.seed'}", "--num-threads=2"]
        self._spawn("munged", cmd, user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged's socket", "munged")

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        self.ctld_port = free_port()
        ports = {n: free_port() for n in self.NODES}
        d = self.dir
        nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={ports[n]} CPUs={self.cpus} "
                          f"RealMemory=1000 State=UNKNOWN" for n in self.NODES)
        self.conf.write_text(f"""\
ClusterName=vstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/slurmd.%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
MinJobAge={self.min_job_age}
KillWait={self.kill_wait}
InactiveLimit=0
SlurmdTimeout=60
MessageTimeout=10
JobRequeue=1
{nodes}
PartitionName=debug Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        for sub in ["ctld", *(f"slurmd.{n}" for n in self.NODES)]:
            (d / sub).mkdir()

    def start(self, timeout_s: float = 60.0) -> "LocalSlurm":
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        for node in self.NODES:
            self._spawn(f"slurmd-{node}", [_sbin("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._all_idle, timeout_s, "both nodes idle in sinfo")
        return self

    def _all_idle(self) -> bool:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True,
                              timeout=20)
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return proc.returncode == 0 and all(states.get(n) == "idle" for n in self.NODES)

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.dir / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        log.close()

    def _wait(self, ready, timeout_s: float, what: str, *daemons: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name in daemons or self.procs:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited ({self.procs[name].returncode}) waiting for {what}\n{self.logs()}")
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for path in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.stdout")) + [self.dir / "munge" / "munged.log"]:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                out.append(f"--- {path.name}\n{text[-tail:]}")
        return "\n".join(out)

    # ------------------------------------------------------------------ use

    def run(self, *cmd: str, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the record is gone)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, timeout=20)
        if proc.returncode != 0:
            return {}
        fields = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_for(self, job_id: str, predicate, timeout_s: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if predicate(info):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: timed out after {timeout_s:.0f} s waiting for {what}; last {info}\n"
                             f"{self.logs()}")

    # ------------------------------------------------------------------ tear-down

    def stop(self) -> None:
        """Cancel what is left, then stop every daemon by PID (TERM, then KILL), munged last."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", "--partition=debug", timeout=10)
                self.run("scancel", "--partition=debug", timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                pass
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=15)
