"""Dask clusters for `--cluster` (sweep and prepare alike): a local one, a dask-jobqueue one
(SLURM / HTCondor / PBS) built from params/cluster/<kind>.yaml, or a running scheduler."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pneumo.errors import ClusterError

JOBQUEUE_KINDS = ("slurm", "htcondor", "pbs")


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
    """(dask-jobqueue cluster, jobs to start) from a YAML file of its keyword arguments plus
    `jobs` and `gpus_per_job` (see gpu_settings)."""
    import dask_jobqueue

    from pneumo.config import read_params_file

    settings = dict(read_params_file(cluster_file))
    jobs = int(settings.pop("jobs", 1))
    gpus = int(settings.pop("gpus_per_job", 0))
    if gpus:
        settings = gpu_settings(kind, settings, gpus)
    cls = {"slurm": dask_jobqueue.SLURMCluster, "htcondor": dask_jobqueue.HTCondorCluster,
           "pbs": dask_jobqueue.PBSCluster}[kind]
    try:
        cluster = cls(**settings)
    except (TypeError, ValueError) as exc:
        raise ClusterError(f"{cluster_file}: {exc}") from None
    return cluster, jobs


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
        path = Path(cluster_file or f"params/cluster/{cluster}.yaml")
        if not path.is_file():
            raise ClusterError(f"{path}: no cluster file (see params/cluster/ for examples)")
        jq, jobs = jobqueue_cluster(cluster, path)
        jq.scale(jobs=jobs)
        print(f"{cluster}: asked for {jobs} job(s); dashboard {jq.dashboard_link}", flush=True)
        return Client(jq), jq
    try:
        return Client(cluster, timeout=30), None
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"{cluster}: cannot reach a Dask scheduler ({exc})") from None


def close(client, cluster) -> None:
    """Close what dask_client made (the client first: it talks to the cluster)."""
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()
