"""Where a sweep's runs execute: this machine's process slots, or a Dask cluster.

Both take the same runs and return the same records; the run itself is always
`sweep.execute_run` (one papermill process writing into its run directory), so results land in
the same outputs/runs/<sweep>/ layout either way. Scheduling beyond one machine is Dask's
(distributed, dask-jobqueue for SLURM / HTCondor / PBS), not ours.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path

from pneumo.errors import ClusterError

log = logging.getLogger(__name__)

JOBQUEUE_KINDS = ("slurm", "htcondor", "pbs")


class LocalExecutor:
    """Runs on this machine: each run takes a free slot (a GPU, or a share of the CPU cores)."""

    def __init__(self, slots: list[dict]):
        self.slots = slots

    def describe(self) -> str:
        if self.slots[0]["CUDA_VISIBLE_DEVICES"]:
            return f"{len(self.slots)} at a time on GPU " + ",".join(s["CUDA_VISIBLE_DEVICES"] for s in self.slots)
        return f"{len(self.slots)} at a time on CPU, {self.slots[0]['PNEUMO_THREADS']} threads each"

    def whole_machine(self) -> LocalExecutor:
        """One slot with every core (and the first GPU): for the marathon."""
        env = dict(self.slots[0])
        cores = str(os.cpu_count() or 1)
        env.update({"PNEUMO_THREADS": cores, "OMP_NUM_THREADS": cores, "MKL_NUM_THREADS": cores})
        return LocalExecutor([env])

    def run(self, notebook: Path, runs, runs_root: Path) -> list[dict]:
        """Ctrl-C stops every run and leaves them resumable."""
        from pneumo.sweep import StatusBoard, execute_run

        free: queue.Queue = queue.Queue()
        for env in self.slots:
            free.put(env)
        stop = threading.Event()
        board = StatusBoard(runs, runs_root)
        results: dict[str, dict] = {}
        lock = threading.Lock()
        running: set = set()
        waiting = [len(runs)]

        def worker(run):
            env = free.get()
            try:
                if stop.is_set():
                    return
                with lock:
                    waiting[0] -= 1
                    running.add(run.name)
                    board.update(run.name, "running")
                result = execute_run(notebook, run, run.dir(runs_root), env, stop)
                with lock:
                    running.discard(run.name)
                    results[run.name] = result
                    board.update(run.name, result["state"])
                    if not waiting[0]:
                        self._share_freed_cores(running, runs_root)
            finally:
                free.put(env)

        threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in runs]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                time.sleep(1.0)
                with lock:
                    board.update()
        except KeyboardInterrupt:
            stop.set()
            print("\nstopping runs (they resume with --resume) ...", file=sys.stderr, flush=True)
            for t in threads:
                t.join()
            raise
        finally:
            board.close()
        return [results.get(r.name, {"run": r.name, "state": "interrupted"}) for r in runs]

    def _share_freed_cores(self, running: set, runs_root: Path) -> None:
        """Nothing left to start: split the cores among the runs still going. Each picks up its
        share at its next epoch (run_dir/threads), so the last runs of a CPU sweep do not
        finish on one core while the others idle."""
        if not running or self.slots[0]["CUDA_VISIBLE_DEVICES"]:
            return
        from pneumo.io import atomic_write_text

        share = max(1, (os.cpu_count() or 1) // len(running))
        for name in running:
            atomic_write_text(runs_root / name / "threads", f"{share}\n")

    def close(self) -> None:
        pass


def _dask_task(notebook: str, run, run_dir: str, gpu: bool) -> dict:
    """Executed on a Dask worker: one papermill run with the worker's own GPU or threads."""
    import threading

    from distributed import get_worker

    from pneumo.sweep import execute_run

    worker = get_worker()
    nthreads = getattr(worker, "nthreads", None) or getattr(worker.state, "nthreads", 1)
    # A GPU worker is started with CUDA_VISIBLE_DEVICES of its own GPU (one worker per GPU):
    # the run inherits it. A CPU worker lends the run its threads.
    env = {} if gpu else {"CUDA_VISIBLE_DEVICES": "", "PNEUMO_THREADS": str(nthreads),
                          "OMP_NUM_THREADS": str(nthreads)}
    record = execute_run(Path(notebook), run, Path(run_dir), env, threading.Event())
    record["worker"] = worker.address
    return record


class DaskExecutor:
    """Runs as tasks on a Dask cluster: one task per run, GPU=1 resource where workers have GPUs."""

    def __init__(self, client, cluster=None, owns_client: bool = True):
        self.client, self.cluster, self.owns_client = client, cluster, owns_client

    def _gpu_workers(self) -> bool:
        workers = self.client.scheduler_info().get("workers", {})
        return any(w.get("resources", {}).get("GPU") for w in workers.values())

    def describe(self) -> str:
        workers = self.client.scheduler_info().get("workers", {})
        gpu = "one GPU per run (resource GPU=1)" if self._gpu_workers() else "CPU workers"
        return f"Dask cluster {self.client.scheduler.address}: {len(workers)} workers, {gpu}"

    def whole_machine(self) -> DaskExecutor:
        return self

    def run(self, notebook: Path, runs, runs_root: Path) -> list[dict]:
        from distributed import as_completed

        from pneumo.io import atomic_write_json
        from pneumo.sweep import StatusBoard

        gpu = self._gpu_workers()
        resources = {"GPU": 1} if gpu else None
        board = StatusBoard(runs, runs_root)
        futures = {}
        for run in runs:
            # pure=False: a re-submitted run (--resume) is new work, not a cached result
            future = self.client.submit(_dask_task, str(notebook), run, str(run.dir(runs_root)), gpu,
                                        resources=resources, key=f"pneumo-run-{runs_root.name}-{run.name}-{time.time_ns()}",
                                        pure=False)
            futures[future] = run
            board.update(run.name, "running")
        results = {}
        try:
            pending = as_completed(list(futures), with_results=False)
            while not pending.is_empty():
                for future in pending.next_batch(block=False) or []:
                    run = futures[future]
                    try:
                        record = future.result()
                    except Exception as exc:  # KilledWorker after repeated worker loss, or a lost task
                        error = f"{type(exc).__name__}: {exc}"
                        atomic_write_json(run.dir(runs_root) / "failed.json", {"error": error[:500]})
                        record = {"run": run.name, "state": "failed", "seconds": 0.0, "error": error}
                    results[run.name] = record
                    board.update(run.name, record["state"])
                time.sleep(1.0)
                board.update()
        except KeyboardInterrupt:
            print("\ncancelling the cluster's runs (they resume with --resume) ...", file=sys.stderr, flush=True)
            self.client.cancel(list(futures))
            raise
        finally:
            board.close()
        return [results.get(r.name, {"run": r.name, "state": "interrupted"}) for r in runs]

    def close(self) -> None:
        if self.owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def jobqueue_cluster(kind: str, cluster_file):
    """A dask-jobqueue cluster from a YAML file of its keyword arguments plus `jobs` and `gpus_per_job`.

    gpus_per_job adds the scheduler's GPU request (SLURM --gres, HTCondor request_gpus) unless the
    file already has one, and starts each worker with the resource GPU=<n>, so that Dask never
    gives one GPU two runs.
    """
    import dask_jobqueue

    from pneumo.config import read_params_file

    settings = dict(read_params_file(cluster_file))
    jobs = int(settings.pop("jobs", 1))
    gpus = int(settings.pop("gpus_per_job", 0))
    if gpus:
        if kind == "slurm":
            extra = list(settings.get("job_extra_directives", []))
            if not any("gres" in e or "gpus" in e for e in extra):
                extra.append(f"--gres=gpu:{gpus}")
            settings["job_extra_directives"] = extra
        elif kind == "htcondor":
            extra = dict(settings.get("job_extra_directives", {}))
            extra.setdefault("request_gpus", str(gpus))
            settings["job_extra_directives"] = extra
        worker_args = list(settings.get("worker_extra_args", []))
        worker_args += ["--resources", f"GPU={gpus}"]
        settings["worker_extra_args"] = worker_args
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


def make_executor(cluster: str | None, max_parallel: int | None = None, cluster_file=None):
    """The executor for --cluster: None (this machine), 'local', slurm|htcondor|pbs, or an address."""
    from pneumo.sweep import slot_environments, visible_gpus

    if not cluster:
        return LocalExecutor(slot_environments(visible_gpus(), max_parallel))
    return DaskExecutor(*dask_client(cluster, max_parallel, cluster_file))
