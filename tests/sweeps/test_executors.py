"""Where runs execute: this machine's slots (freed cores) and a real Dask cluster (separate worker processes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pneumo.sweeps.executors import LocalExecutor
from pneumo.sweeps.slots import Slot, slots
from pneumo.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = str(ROOT / "notebooks" / "02-train.ipynb")
TINY = {"image_size": 64, "depth": 3, "width": 4, "batch_size": 8, "n_val_images": 2}


def _sweep_file(tmp_path, synth_dir, runs, epochs=2):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "dask", "notebook": NOTEBOOK,
                                    "base": {"data_dir": str(synth_dir), "epochs": epochs, **TINY}, "runs": runs},
                                   sort_keys=False))
    return path


class _Restrictions:
    """Scheduler plugin recording the resource restrictions of every task it sees."""

    name = "record-restrictions"

    def __init__(self):
        self.seen = {}

    def transition(self, key, start, finish, *args, **kwargs):
        ts = self.scheduler.tasks.get(key)
        if ts is not None and "pneumo-run" in str(key):
            self.seen[str(key)] = dict(ts.resource_restrictions or {})

    async def start(self, scheduler):
        self.scheduler = scheduler


@pytest.fixture
def gpu_cluster():
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    plugin_cls = type("RecordRestrictions", (_Restrictions, SchedulerPlugin), {})
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
                           host="127.0.0.1", dashboard_address=None)
    client = Client(cluster)
    plugin = plugin_cls()
    client.register_plugin(plugin)
    yield cluster, client, plugin
    client.close()
    cluster.close()


@pytest.mark.slow
def test_two_run_sweep_on_a_local_cluster_with_gpu_resources(gpu_cluster, synth_dir, tmp_path):
    from pneumo.sweeps.sweep import sweep

    cluster, client, plugin = gpu_cluster
    path = _sweep_file(tmp_path, synth_dir, [{"optimizer": "adam"}, {"optimizer": "adamw"}])
    result = sweep(path, out=tmp_path / "outputs", cluster=cluster.scheduler_address)
    assert result["failed"] == []
    runs = tmp_path / "outputs" / "runs" / "dask"
    for name in ("01-adam", "02-adamw"):
        assert json.loads((runs / name / "metrics.json").read_text())["status"] == "finished"
    summary = (tmp_path / "outputs" / "sweeps" / "dask" / "summary.csv").read_text()
    assert "01-adam,done" in summary and "02-adamw,done" in summary
    # scheduler-side view: both tasks were submitted requiring one GPU each
    seen = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["record-restrictions"].seen)
    assert len(seen) == 2 and all(r == {"GPU": 1} for r in seen.values())


@pytest.mark.slow
def test_killed_worker_leads_to_a_retry_not_a_lost_run(synth_dir, tmp_path):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None)
    client = Client(cluster)
    try:
        path = _sweep_file(tmp_path, synth_dir, [{"optimizer": "adam"}], epochs=6)
        out = tmp_path / "outputs"
        proc = subprocess.Popen([sys.executable, "-m", "pneumo", "sweep", str(path), "--out", str(out),
                                 "--cluster", cluster.scheduler_address], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        run_dir = out / "runs" / "dask" / "01-adam"
        deadline = time.time() + 180
        while time.time() < deadline:
            status = run_dir / "status.json"
            try:
                if json.loads(status.read_text()).get("epoch", 0) >= 2:
                    break
            except (OSError, json.JSONDecodeError):
                pass
            time.sleep(0.1)
        busy = [w for w, keys in client.processing().items() if keys]
        assert len(busy) == 1, client.processing()
        pid = client.run(os.getpid, workers=busy)[busy[0]]
        os.kill(pid, signal.SIGKILL)  # the worker dies mid-run; its nanny starts a new one
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "finished" and metrics["epochs_done"] == 6
        assert (run_dir / "log.txt").read_text().count("=== ") >= 2  # executed again after the loss
    finally:
        client.close()
        cluster.close()


def test_freed_cores_go_to_the_runs_still_going(tmp_path):
    executor = LocalExecutor(slots([], max_parallel=4, cores=8))  # the executor's cores, not the machine's
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    executor._share_freed_cores({"a", "b"}, tmp_path)
    assert RunDir(tmp_path / "a").thread_share() == 4 == RunDir(tmp_path / "b").thread_share()
    executor._share_freed_cores({"a"}, tmp_path)
    assert RunDir(tmp_path / "a").thread_share() == 8
    gpu = LocalExecutor(slots(["0", "1"], cores=8))
    (tmp_path / "c").mkdir()
    gpu._share_freed_cores({"c"}, tmp_path)
    assert RunDir(tmp_path / "c").thread_share() is None  # GPU runs keep their threads


def test_local_executor_describes_its_slots_and_gives_the_marathon_all_its_cores():
    cpu = LocalExecutor(slots([], max_parallel=3, cores=6))
    assert cpu.describe() == "3 at a time on CPU, 2 threads each"
    assert cpu.whole_machine().slots == [Slot(None, 6)]
    gpu = LocalExecutor(slots(["2", "5"], cores=16))
    assert gpu.describe() == "2 at a time on GPU 2,5"
    assert gpu.whole_machine().slots == [Slot("2", 16)]


@pytest.mark.slow
def test_prepare_decodes_on_a_dask_cluster_to_the_same_cache(synth_dir, tmp_path):
    import numpy as np
    from distributed import Client, LocalCluster

    from pneumo.data.prepare import prepare

    local = prepare(synth_dir, out=tmp_path / "local", image_size=32, workers=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        on_dask = prepare(synth_dir, out=tmp_path / "dask", image_size=32, client=client)
    assert on_dask.features.equals(local.features)
    assert np.array_equal(np.asarray(on_dask.images()), np.asarray(local.images()))


def _lost_task():
    raise RuntimeError("worker lost")


def test_a_task_dask_gave_up_on_is_a_failed_run(tmp_path):
    from types import SimpleNamespace

    from distributed import Client, LocalCluster

    from pneumo.sweeps.executors import DaskExecutor
    from pneumo.sweeps.statusboard import StatusBoard

    run = SimpleNamespace(name="01-adam", params={})
    # in-process (inproc:// transport): nothing listens on the network
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        future = client.submit(_lost_task, pure=False)
        results = DaskExecutor(client, owns_client=False)._collect({future: run}, tmp_path,
                                                                   StatusBoard([run], tmp_path))
    assert results["01-adam"]["state"] == "failed" and "worker lost" in results["01-adam"]["error"]
    assert RunDir(tmp_path / "01-adam").state() == "failed"  # --resume runs it again


@pytest.mark.slow
def test_dask_stream_hands_each_freed_worker_the_next_run_and_reports_back(tmp_path):
    """What a search needs of a cluster: runs asked for one at a time as workers free up."""
    import nbformat
    from distributed import Client, LocalCluster

    from pneumo.sweeps.executors import DaskExecutor, ListSource
    from pneumo.sweeps.sweep import Run

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from pneumo.training.rundir import RunDir\nRunDir(run_dir).write_metrics({'status': 'finished'})")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook = tmp_path / "tiny.ipynb"
    nbformat.write(nb, notebook)

    class Recording(ListSource):
        asked, told = 0, []

        def next(self):
            self.asked += 1
            return super().next()

        def done(self, run, record, run_dir):
            self.told.append((run.name, record["state"], run_dir.state()))

    source = Recording([Run(f"r{i}", {}) for i in range(3)])
    runs_root = tmp_path / "outputs" / "runs" / "s"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        records = DaskExecutor(client, owns_client=False).stream(notebook, source, runs_root)
    assert sorted(r["run"] for r in records) == ["r0", "r1", "r2"]
    assert sorted(source.told) == [(f"r{i}", "done", "done") for i in range(3)]
    assert source.asked == 5  # two at first (one per worker), then one as each of the three ended
