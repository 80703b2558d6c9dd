"""A one-node SLURM cluster for the tests, from Debian's packages (slurmctld, slurmd, munge).

Everything lives in a temporary directory: a fresh munge key and munged's socket, slurm.conf
(SlurmctldHost=<hostname>(127.0.0.1), one node at 127.0.0.1 with this machine's CPUs and memory as
`slurmd -C` reports them, proctrack/linuxproc, task/none, no accounting, non-default ports) and the
controller's state and slurmd's spool. slurmctld and slurmd run in the foreground (-D) as this
(root) user; SLURM_CONF points the clients (sbatch, squeue, scancel) at it. Finished jobs are
written to jobcomp.txt (JobState=COMPLETED / CANCELLED / TIMEOUT ...), since there is no accounting
database for sacct. Without the packages, or not as root, the tests skip; in CI they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel", "scontrol")
PARTITION = "pneumo"
MAX_MINUTES = 30  # the partition's time limit: a job asking for more pends (PartitionTimeLimit)


def which(command: str) -> str | None:
    """A client on the PATH, or a daemon in /usr/sbin (which a PATH may lack)."""
    return shutil.which(command, path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin")


def require(ok: bool, reason: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run this test (.ci/run installs it)")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Slurm:
    root: Path
    node: str
    cpus: int
    memory_mb: int
    env: dict
    processes: list = field(default_factory=list)

    @property
    def partition(self) -> str:
        return PARTITION

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def queue(self) -> dict[str, tuple[str, str]]:
        """{job id: (name, state)} of the jobs squeue lists."""
        out = self.run("squeue", "-h", "-o", "%i %j %T").stdout
        return {i: (name, state) for i, name, state in (line.split() for line in out.splitlines())}

    def ended(self) -> dict[str, str]:
        """{job id: JobState} of the jobs that ended, from SLURM's job completion log."""
        path = self.root / "jobcomp.txt"
        text = path.read_text() if path.is_file() else ""
        return dict(re.findall(r"JobId=(\d+) .*?JobState=(\S+)", text))

    def wait_until_empty(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.queue() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not self.queue(), self.queue()

    def cluster_file(self, directory: Path, **changes) -> Path:
        """params/cluster/slurm.yaml with what a site changes (docs/cluster.md): the partition, no
        account, no GPUs, the environment's python, cores and memory of this node; then changes."""
        settings = yaml.safe_load((ROOT / "params" / "cluster" / "slurm.yaml").read_text())
        site = {
            "queue": self.partition,
            "account": None,
            "gpus_per_job": 0,
            "jobs": 2,
            "cores": 1,
            "memory": f"{min(4096, self.memory_mb // 4)}MB",
            "walltime": "00:10:00",
            "python": sys.executable,
            "job_script_prologue": ["export PNEUMO_NO_PROGRESS=1"],
            "local_directory": str(directory),
            "start_timeout": 60,
            "scheduler_options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
        }  # loopback only
        path = directory / "slurm.yaml"
        path.write_text(yaml.safe_dump({**settings, **site, **changes}, sort_keys=False))
        return path

    def stop(self) -> None:
        """Cancel every job, then end the daemons (TERM, then KILL)."""
        try:
            jobs = list(self.queue())
            if jobs:
                self.run("scancel", *jobs, check=False)
                self.wait_until_empty(30)
        except (subprocess.SubprocessError, AssertionError, OSError, ValueError):
            pass  # the daemons go anyway
        for proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _node_line(node: str) -> tuple[str, int, int]:
    """This machine as slurmd sees it (a node configured with more than it has is drained)."""
    out = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, timeout=60, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("NodeName="))
    hardware = line.split(None, 1)[1]
    cpus = int(re.search(r"CPUs=(\d+)", hardware).group(1))
    memory = int(re.search(r"RealMemory=(\d+)", hardware).group(1))
    return f"NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN", cpus, memory


def _slurm_conf(root: Path, node: str, node_line: str) -> str:
    return "\n".join(
        [
            "ClusterName=pneumotest",
            f"SlurmctldHost={node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={root / 'jobcomp.txt'}",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=300",
            "InactiveLimit=0",
            node_line,
            f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime={MAX_MINUTES} State=UP",
            "",
        ]
    )


def _start(slurm: Slurm, name: str, args: list[str]) -> None:
    log = open(slurm.root / f"{name}.out", "wb")
    slurm.processes.append(
        subprocess.Popen(args, env=slurm.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    )
    log.close()


def _wait_idle(slurm: Slurm, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in slurm.processes:
            if proc.poll() is not None:
                logs = "\n".join(p.read_text()[-1500:] for p in sorted(slurm.root.glob("*.out")))
                pytest.fail(f"{proc.args[0]} exited ({proc.returncode}):\n{logs}")
        state = slurm.run("sinfo", "-h", "-n", slurm.node, "-o", "%T", check=False).stdout.strip()
        if state == "idle":
            return
        time.sleep(0.3)
    pytest.fail(f"the node is not idle after {timeout} s: {state!r}; see {slurm.root}")


def start_slurm() -> Slurm:
    """munged, slurmctld and slurmd on 127.0.0.1, waited on until sinfo shows the node idle."""
    missing = [c for c in COMMANDS if which(c) is None]
    require(not missing, f"no {', '.join(missing)} (apt-get install slurmd slurmctld slurm-client munge)")
    require(os.geteuid() == 0, "slurmd runs jobs as their user: the SLURM tests run as root (as CI does)")
    # munged insists on a socket directory everyone can traverse, and sockets have short paths
    root = Path(tempfile.mkdtemp(prefix="pneumo-slurm-"))
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir()
    for path in (root, root / "munge"):
        path.chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    node = socket.gethostname().split(".")[0]
    node_line, cpus, memory = _node_line(node)
    (root / "slurm.conf").write_text(_slurm_conf(root, node, node_line))
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    slurm = Slurm(root, node, cpus, memory, env)
    munge = root / "munge"
    _start(
        slurm,
        "munged",
        [
            which("munged"),
            "-F",
            f"--key-file={key}",
            f"--socket={munge / 'munge.socket'}",
            f"--log-file={munge / 'munged.log'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
        ],
    )
    try:
        deadline = time.monotonic() + 30
        while not (munge / "munge.socket").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        _start(slurm, "slurmctld", [which("slurmctld"), "-D", "-i"])
        _start(slurm, "slurmd", [which("slurmd"), "-D"])
        _wait_idle(slurm)
    except BaseException:
        slurm.stop()
        raise
    return slurm


def run_jobs(runs_root: Path) -> dict[str, str]:
    """{run name: SLURM job id} of the papermill processes now executing runs under runs_root:
    a run executes inside the job whose SLURM_JOB_ID its process inherited."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"papermill" not in argv[:3] and not any(a.endswith(b"papermill") for a in argv[:3]):
            continue
        paths = [Path(a.decode(errors="replace")) for a in argv if str(runs_root).encode() in a]
        job = next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"SLURM_JOB_ID=")), None)
        if paths and job:
            found[paths[0].relative_to(runs_root).parts[0]] = job
    return found
