"""Dask clusters for `--cluster` (sweep and prepare alike): a local one, a dask-jobqueue one
(SLURM / HTCondor / PBS) built from params/cluster/<kind>.yaml, or a running scheduler.

A jobqueue cluster is ready when its first worker has connected: a job the scheduler refuses (a
partition that does not exist, more memory than any node has) or that does not start within the
file's start_timeout is one ClusterError line naming the job and the scheduler's reason, not a
sweep that waits forever. Jobs that end while the sweep runs (scancel, their walltime) are
submitted again (keep_jobs), so the runs they held go on in new workers."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from pneumo.errors import ClusterError

JOBQUEUE_KINDS = ("slurm", "htcondor", "pbs")
START_TIMEOUT_S = 600  # a busy cluster queues jobs for a while; start_timeout: in the file waits longer
STATUS_COMMANDS = {
    "slurm": "squeue -j {ids} and scontrol show job {first}",
    "pbs": "qstat -f {ids}",
    "htcondor": "condor_q -better-analyze {ids}",
}
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


class _SubmitRecorded:
    """Mixed into dask-jobqueue's Job: a submission the scheduler refuses is kept (submit_error)
    for wait_for_workers to report, instead of a traceback on the event loop and a job that never was."""

    submit_error: str | None = None

    async def start(self):
        from distributed.core import Status

        try:
            await super().start()
        except RuntimeError as exc:  # dask-jobqueue's "Command exited with non-zero exit code"
            self.submit_error = _command_error(str(exc))
            self.status = Status.running  # nothing to start; the wait for workers says why

    async def close(self):
        from distributed.core import Status

        await super().close()
        self.status = Status.closed  # dask-jobqueue leaves it running, which SpecCluster's close asserts against


def _command_error(text: str) -> str:
    """What the submit command said in dask-jobqueue's error (stderr, else stdout), on one line
    ("sbatch: error: " once)."""
    stdout, _, stderr = text.partition("stdout:")[2].partition("stderr:")
    said = stderr.strip() or stdout.strip() or text.strip()
    lines = [" ".join(line.split()) for line in said.splitlines() if line.strip()]
    prefix = re.match(r"\S+: error: ", lines[0]) if lines else None
    if prefix:
        lines = [lines[0]] + [line.removeprefix(prefix.group(0)) for line in lines[1:]]
    return "; ".join(lines)


def gpu_settings(kind: str, settings: dict, gpus: int) -> dict:
    """settings with the scheduler's request for gpus GPUs per job (SLURM --gres, HTCondor
    request_gpus; kept when the file already has one) and workers that advertise the resource
    GPU=<gpus>, so that Dask never gives one GPU two runs. PBS asks for GPUs in its resource_spec."""
    settings = dict(settings)
    if kind == "slurm":
        extra = list(settings.get("job_extra_directives", []))
        if not any("gres" in e or "gpus" in e for e in extra):
            extra.append(f"--gres=gpu:{gpus}")
        settings["job_extra_directives"] = extra
    elif kind == "htcondor":
        extra = dict(settings.get("job_extra_directives", {}))
        extra.setdefault("request_gpus", str(gpus))
        settings["job_extra_directives"] = extra
    settings["worker_extra_args"] = [*settings.get("worker_extra_args", []), "--resources", f"GPU={gpus}"]
    return settings


def jobqueue_cluster(kind: str, cluster_file):
    """(dask-jobqueue cluster, jobs to start, seconds to wait for the first worker) from a YAML file
    of its keyword arguments plus `jobs`, `gpus_per_job` (see gpu_settings) and `start_timeout`."""
    import dask_jobqueue

    from pneumo.config import read_params_file

    settings = dict(read_params_file(cluster_file))
    try:
        jobs = int(settings.pop("jobs", 1))
        gpus = int(settings.pop("gpus_per_job", 0))
        start_timeout = float(settings.pop("start_timeout", START_TIMEOUT_S))
    except (TypeError, ValueError) as exc:
        raise ClusterError(f"{cluster_file}: jobs, gpus_per_job and start_timeout are numbers ({exc})") from None
    if gpus:
        settings = gpu_settings(kind, settings, gpus)
    cls = {
        "slurm": dask_jobqueue.SLURMCluster,
        "htcondor": dask_jobqueue.HTCondorCluster,
        "pbs": dask_jobqueue.PBSCluster,
    }[kind]
    job_cls = type(cls.job_cls.__name__, (_SubmitRecorded, cls.job_cls), {})
    try:
        cluster = cls(job_cls=job_cls, **settings)
    except (TypeError, ValueError) as exc:
        raise ClusterError(f"{cluster_file}: {exc}") from None
    return cluster, jobs, start_timeout


def dask_client(cluster: str, max_parallel: int | None = None, cluster_file=None):
    """(Client, cluster object or None) for 'local', slurm|htcondor|pbs, or a scheduler address."""
    from distributed import Client, LocalCluster

    if not logging.getLogger("pneumo").isEnabledFor(logging.DEBUG):
        # distributed configures its loggers at import (INFO: every connection); pneumo prints what matters
        logging.getLogger("distributed").setLevel(logging.WARNING)

    if cluster == "local":
        n = max_parallel or os.cpu_count() or 1
        threads = max(1, (os.cpu_count() or 1) // n)
        local = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, dashboard_address=":0")
        print(f"local Dask cluster: {n} workers; dashboard {local.dashboard_link}", flush=True)
        return Client(local), local
    if cluster in JOBQUEUE_KINDS:
        return _jobqueue_client(cluster, Path(cluster_file or f"params/cluster/{cluster}.yaml"))
    try:
        return Client(cluster, timeout=30), None
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"{cluster}: cannot reach a Dask scheduler ({exc})") from None


def _jobqueue_client(kind: str, path: Path):
    from distributed import Client

    if not path.is_file():
        raise ClusterError(f"{path}: no cluster file (see params/cluster/ for examples)")
    jq, jobs, timeout = jobqueue_cluster(kind, path)
    client = None
    try:
        jq.scale(jobs=jobs)
        print(
            f"{kind}: asked for {jobs} job(s), waiting up to {timeout:.0f} s for the first worker; "
            f"dashboard {jq.dashboard_link}",
            flush=True,
        )
        client = Client(jq)
        wait_for_workers(client, jq, kind, timeout, path)
    except BaseException:  # Ctrl-C or an error while waiting: no job is left queued
        close(client, jq)
        raise
    return client, jq


def wait_for_workers(client, jq, kind: str, timeout: float, path) -> None:
    """Return when the first worker of jq's jobs has connected. Every job refused at submission,
    every job ended before its worker connected (a wrong python in the file), or no worker within
    timeout seconds: a ClusterError naming the jobs and what the scheduler says of them."""
    deadline, asked = time.monotonic() + timeout, 0.0
    while not client.scheduler_info().get("workers"):
        jobs = list(jq.workers.values())
        refused = [job.submit_error for job in jobs if job.submit_error]
        if jobs and len(refused) == len(jobs):
            raise ClusterError(
                f"{kind}: the job was refused at submission: {refused[0]} (queue, memory, cores, walltime in {path})"
            )
        ids = [str(job.job_id) for job in jobs if job.job_id]
        if kind == "slurm" and ids and time.monotonic() > asked + 2:
            asked, states = time.monotonic(), slurm_states(ids)
            if states is not None and all(states.get(i, "ENDED").split()[0] in ENDED | {"ENDED"} for i in ids):
                raise ClusterError(
                    f"{kind}: job(s) {', '.join(ids)} ended before a worker connected "
                    f"({_listed(ids, states)}); the job's output (slurm-<id>.out where pneumo "
                    f"runs, or log_directory in {path}) says why"
                )
        if time.monotonic() > deadline:
            states = slurm_states(ids) if kind == "slurm" and ids else None
            listed = _listed(ids, states) if states else f"job(s) {', '.join(ids) or 'not submitted'}"
            hint = STATUS_COMMANDS[kind].format(ids=",".join(ids) or "<id>", first=(ids or ["<id>"])[0])
            raise ClusterError(
                f"{kind}: no worker started within {timeout:.0f} s: {listed}; see {hint} "
                f"(start_timeout in {path} waits longer)"
            )
        time.sleep(0.5)


def slurm_states(ids: list[str]) -> dict[str, str] | None:
    """{job id: 'STATE (reason)'} from squeue (ended jobs show until SLURM's MinJobAge); None
    when squeue cannot be asked."""
    try:
        done = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i %T %r"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:  # every id unknown: long gone
        return {} if "Invalid job id" in done.stderr else None
    states = {}
    for line in done.stdout.splitlines():
        job, state, reason = (line.split(None, 2) + ["", ""])[:3]
        states[job] = f"{state} ({reason})" if reason and reason != "None" else state
    return states


def _listed(ids: list[str], states: dict[str, str]) -> str:
    return ", ".join(f"job {i} {states.get(i, 'no longer queued')}" for i in ids)


def keep_jobs(cluster, stop: threading.Event, every: float = 10.0) -> threading.Thread | None:
    """Keep a jobqueue cluster at the jobs it was asked for: a job that ended (scancel, its
    walltime) keeps its place in the cluster's plan, SpecCluster forgets the job itself after
    distributed.deploy.lost-worker-timeout, and asking for the plan again submits a new one."""
    if not hasattr(cluster, "job_cls"):
        return None
    jobs = len(cluster.worker_spec)

    def keep():
        while not stop.wait(every):
            cluster.scale(jobs=jobs)

    thread = threading.Thread(target=keep, name="pneumo-keep-jobs", daemon=True)
    thread.start()
    return thread


def close(client, cluster) -> None:
    """Close what dask_client made (the client first: it talks to the cluster)."""
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()
