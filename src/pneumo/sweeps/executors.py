"""Where a sweep's runs execute: this machine's slots, or a Dask cluster.

Both take the same runs and return the same records; the run itself is always
`runner.execute_run` (one papermill process writing into its run directory), so results land in
the same outputs/runs/<sweep>/ layout either way. Scheduling beyond one machine is Dask's
(distributed, dask-jobqueue for SLURM / HTCondor / PBS; built in pneumo.sweeps.cluster), not ours.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path

from pneumo.sweeps.cluster import close as close_dask
from pneumo.sweeps.cluster import dask_client, keep_jobs
from pneumo.sweeps.runner import execute_run
from pneumo.sweeps.slots import Slot, slots, visible_gpus
from pneumo.sweeps.statusboard import StatusBoard
from pneumo.training.rundir import RunDir


class ListSource:
    """Runs handed out in their order (a runs: / grid: sweep); a search has its own source."""

    def __init__(self, runs):
        self.runs = list(runs)

    def next(self):
        return self.runs.pop(0) if self.runs else None

    def done(self, run, record: dict, run_dir: RunDir) -> None:
        pass


class LocalExecutor:
    """Runs on this machine: each run takes a free slot (a GPU, or a share of the CPU cores)."""

    def __init__(self, slots: list[Slot]):
        self.slots = slots

    @property
    def cores(self) -> int:
        """The CPU threads this executor hands out: its slots' together."""
        return sum(slot.threads for slot in self.slots)

    def describe(self) -> str:
        if self.slots[0].gpu:
            return f"{len(self.slots)} at a time on GPU " + ",".join(slot.gpu for slot in self.slots)
        return f"{len(self.slots)} at a time on CPU, {self.slots[0].threads} threads each"

    def whole_machine(self) -> LocalExecutor:
        """One slot with every core (and the first GPU): for the marathon."""
        return LocalExecutor([Slot(self.slots[0].gpu, self.cores)])

    def run(self, notebook: Path, runs, runs_root: Path) -> list[dict]:
        """The runs of a list, in its order; Ctrl-C stops every run and leaves them resumable."""
        source = ListSource(runs)
        results = {r["run"]: r for r in self.stream(notebook, source, runs_root)}
        return [results.get(r.name, {"run": r.name, "state": "interrupted"}) for r in runs]

    def stream(self, notebook: Path, source, runs_root: Path) -> list[dict]:
        """Each slot takes its next run from source (source.next(), None when there is no more)
        the moment it is free, and hands back the outcome (source.done): a search asks its study
        for a trial then. Returns the records of the runs that ended. Ctrl-C stops every run."""
        stop, lock, board = threading.Event(), threading.Lock(), StatusBoard([], runs_root)
        results: list[dict] = []
        running: set = set()
        errors: list[BaseException] = []

        def slot_worker(slot):
            try:
                while not stop.is_set():
                    with lock:
                        run = source.next()
                        if run is None:  # nothing left to start: the runs still going get the cores
                            self._share_freed_cores(running, runs_root)
                            return
                        running.add(run.name)
                        board.add(run)
                        board.update(run.name, "running")
                    run_dir = RunDir(runs_root / run.name)
                    result = execute_run(notebook, run, run_dir, slot, stop)
                    with lock:
                        running.discard(run.name)
                        results.append(result)
                        board.update(run.name, result["state"])
                        source.done(run, result, run_dir)
            except BaseException as exc:  # the source's own failure (a database gone): stop the sweep
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=slot_worker, args=(slot,), daemon=True) for slot in self.slots]
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
        if errors:
            raise errors[0]
        return results

    def _share_freed_cores(self, running: set, runs_root: Path) -> None:
        """Nothing left to start: split the cores among the runs still going. Each picks up its
        share at its next epoch (run_dir/threads), so the last runs of a CPU sweep do not
        finish on one core while the others idle."""
        if not running or self.slots[0].gpu:
            return
        share = max(1, self.cores // len(running))
        for name in running:
            RunDir(runs_root / name).give_threads(share)

    def close(self) -> None:
        pass


def _dask_task(notebook: str, run, run_dir: str, gpu: bool) -> dict:
    """Executed on a Dask worker: one papermill run with the worker's own GPU or threads."""
    from distributed import get_worker

    worker = get_worker()
    nthreads = getattr(worker, "nthreads", None) or getattr(worker.state, "nthreads", 1)
    # A GPU worker is started with CUDA_VISIBLE_DEVICES of its own GPU (one worker per GPU):
    # the run inherits it. A CPU worker lends the run its threads.
    slot = None if gpu else Slot(None, nthreads)
    record = execute_run(Path(notebook), run, RunDir(run_dir), slot, threading.Event())
    record["worker"] = worker.address
    return record


class DaskExecutor:
    """Runs as tasks on a Dask cluster: one task per run, GPU=1 resource where workers have GPUs."""

    def __init__(self, client, cluster=None, owns_client: bool = True):
        self.client, self.cluster, self.owns_client = client, cluster, owns_client
        self._stop_keeping = threading.Event()
        keep_jobs(cluster, self._stop_keeping)  # a SLURM/HTCondor/PBS job that ended is submitted again

    def _gpu_workers(self) -> bool:
        workers = self.client.scheduler_info().get("workers", {})
        return any(w.get("resources", {}).get("GPU") for w in workers.values())

    def _planned(self) -> int:
        """Workers the cluster was asked for (a jobqueue cluster's jobs start one by one); 0: unknown."""
        return len(getattr(self.cluster, "plan", ()) or ())

    def describe(self) -> str:
        workers = len(self.client.scheduler_info().get("workers", {}))
        gpu = "one GPU per run (resource GPU=1)" if self._gpu_workers() else "CPU workers"
        count = f"{workers} of {self._planned()}" if self._planned() > workers else f"{workers}"
        return f"Dask cluster {self.client.scheduler.address}: {count} workers, {gpu}"

    def whole_machine(self) -> DaskExecutor:
        return self

    def run(self, notebook: Path, runs, runs_root: Path) -> list[dict]:
        gpu = self._gpu_workers()
        board = StatusBoard(runs, runs_root)
        futures = {self._submit(notebook, run, runs_root, gpu): run for run in runs}
        for run in runs:
            board.update(run.name, "running")
        with self._cancelled_on_interrupt(futures), contextlib.closing(board):
            results = self._collect(futures, runs_root, board)
        return [results.get(r.name, {"run": r.name, "state": "interrupted"}) for r in runs]

    @contextlib.contextmanager
    def _cancelled_on_interrupt(self, futures: dict):
        """Ctrl-C cancels the cluster's runs (they resume with --resume) and goes on up."""
        try:
            yield
        except KeyboardInterrupt:
            print("\ncancelling the cluster's runs (they resume with --resume) ...", file=sys.stderr, flush=True)
            self.client.cancel(list(futures))
            raise

    def _submit(self, notebook: Path, run, runs_root: Path, gpu: bool):
        # pure=False: a re-submitted run (--resume) is new work, not a cached result
        return self.client.submit(_dask_task, str(notebook), run, str(runs_root / run.name), gpu,
                                  resources={"GPU": 1} if gpu else None,
                                  key=f"pneumo-run-{runs_root.name}-{run.name}-{time.time_ns()}", pure=False)

    def _collect(self, futures: dict, runs_root: Path, board: StatusBoard) -> dict[str, dict]:
        """Records by run name as tasks end; a task Dask gave up on is a failed run."""
        from distributed import as_completed

        results = {}
        pending = as_completed(list(futures), with_results=False)
        while not pending.is_empty():
            for future in pending.next_batch(block=False) or []:
                run = futures[future]
                record = self._record(future, run, runs_root)
                results[run.name] = record
                board.update(run.name, record["state"])
            time.sleep(1.0)
            board.update()
        return results

    @staticmethod
    def _record(future, run, runs_root: Path) -> dict:
        try:
            return future.result()
        except Exception as exc:  # KilledWorker after repeated worker loss, or a lost task
            error = f"{type(exc).__name__}: {exc}"
            RunDir(runs_root / run.name).mark_failed(error)
            return {"run": run.name, "state": "failed", "seconds": 0.0, "error": error}

    def stream(self, notebook: Path, source, runs_root: Path) -> list[dict]:
        """As many runs at once as the cluster has workers, each ended run making room for the
        next one source gives (a search's next trial); returns the records of the runs that ended."""
        from distributed import as_completed

        gpu = self._gpu_workers()
        width = max(1, self._planned(), len(self.client.scheduler_info().get("workers", {})))
        board, futures, results = StatusBoard([], runs_root), {}, []
        pending = as_completed([], with_results=False)

        def submit() -> bool:
            run = source.next()
            if run is not None:
                board.add(run)
                board.update(run.name, "running")
                future = self._submit(notebook, run, runs_root, gpu)
                futures[future] = run
                pending.add(future)
            return run is not None

        with self._cancelled_on_interrupt(futures), contextlib.closing(board):
            while len(futures) < width and submit():
                pass
            for future in pending:
                run = futures.pop(future)
                record = self._record(future, run, runs_root)
                results.append(record)
                board.update(run.name, record["state"])
                source.done(run, record, RunDir(runs_root / run.name))
                submit()
        return results

    def close(self) -> None:
        self._stop_keeping.set()
        close_dask(self.client if self.owns_client else None, self.cluster)


def make_executor(cluster: str | None, max_parallel: int | None = None, cluster_file=None):
    """The executor for --cluster: None (this machine), 'local', slurm|htcondor|pbs, or an address."""
    if not cluster:
        return LocalExecutor(slots(visible_gpus(), max_parallel))
    return DaskExecutor(*dask_client(cluster, max_parallel, cluster_file))
