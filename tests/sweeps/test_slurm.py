"""`--cluster slurm` against a real one-node SLURM cluster (slurm_fixture: munged, slurmctld and
slurmd on 127.0.0.1): runs are papermill executions inside SLURM jobs that dask-jobqueue submits
with sbatch, and the faults a cluster brings (a cancelled job, a job that cannot start) are what
the user is told. Without SLURM's packages the tests skip; in CI (CI set) they fail instead."""

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from slurm_fixture import run_jobs, start_slurm

from pneumo.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = str(ROOT / "notebooks" / "02-train.ipynb")
TINY = {"image_size": 64, "depth": 3, "width": 4, "batch_size": 8, "n_val_images": 0, "save_images": False}


@pytest.fixture(scope="module")
def slurm():
    import shutil

    cluster = start_slurm()
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)


def _sweep_file(tmp_path, synth_dir, runs, epochs, **extra) -> Path:
    path = tmp_path / "sweep.yaml"
    spec = {
        "name": "slurm",
        "notebook": NOTEBOOK,
        "base": {"data_dir": str(synth_dir), "epochs": epochs, **TINY},
        "runs": runs,
        **extra,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _pneumo(slurm, *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**slurm.env, "PNEUMO_NO_PROGRESS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pneumo", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _watched_sweep(slurm, args: list, cwd: Path, runs_root: Path, on_poll=None, timeout: float = 300):
    """Run `pneumo sweep`, polling squeue and the runs' processes as it goes: (its output, return
    code, {job id: (name, state)} squeue listed, {run: job id} each run's process ran in)."""
    env = {**slurm.env, "PNEUMO_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumo", "sweep", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    queued, runs, deadline = {}, {}, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            queued.update(slurm.queue())
            runs.update(run_jobs(runs_root))
            if on_poll:
                on_poll(runs)
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
        output, _ = proc.communicate()
    return output, proc.returncode, queued, runs


def test_a_run_inside_a_slurm_job_trains_as_one_process(tmp_path, monkeypatch):
    """Inside a SLURM job (a Dask worker's) with srun on the PATH, Lightning would take the job for
    its launcher and hint at srun in every run; pneumo's Trainer uses a plain environment."""
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    from pneumo.config import TrainConfig
    from pneumo.training.fit import _quiet_lightning, _trainer

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name, value in {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NAME": "dask-worker",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_lightning()
        assert SLURMEnvironment.detect()  # what Lightning would have taken
        trainer, _ = _trainer(TrainConfig(epochs=1), RunDir(tmp_path / "run"), [], "cpu", fresh=False)
    assert type(trainer._accelerator_connector.cluster_environment) is LightningEnvironment
    assert trainer.world_size == 1 and trainer.global_rank == 0
    assert not [w for w in caught if "srun" in str(w.message)]


def _canceller(slurm, run: RunDir, cancelled: list):
    """on_poll for _watched_sweep: scancel the job running `run` once it has a checkpoint and its second epoch."""

    def cancel(runs):
        name, status = run.path.name, run.path / "status.json"
        if cancelled or name not in runs or not run.last_checkpoint.is_file() or not status.is_file():
            return
        if json.loads(status.read_text() or "{}").get("epoch", 0) >= 2:
            cancelled.append(runs[name])
            slurm.run("scancel", runs[name])  # as a user or an administrator would

    return cancel


@pytest.mark.slow
def test_a_sweep_on_slurm_runs_in_jobs_and_a_cancelled_job_hands_its_run_on(slurm, synth_dir, tmp_path):
    """Two runs in two jobs (one long enough to lose its job to scancel: it resumes from
    last.ckpt in the other), then the marathon: the --out layout of a sweep on one machine."""
    path = _sweep_file(
        tmp_path,
        synth_dir,
        [{"optimizer": "adam", "epochs": 20}, {"optimizer": "adamw"}],
        epochs=1,
        marathon={"epochs": 2},
    )
    out = tmp_path / "outputs"
    runs_root = out / "runs" / "slurm"
    long_run, cancelled = RunDir(runs_root / "01-adam-epochs20"), []
    output, code, queued, runs = _watched_sweep(
        slurm,
        [path, "--out", out, "--marathon", "--cluster", "slurm", "--cluster-file", slurm.cluster_file(tmp_path)],
        tmp_path,
        runs_root,
        on_poll=_canceller(slurm, long_run, cancelled),
    )
    assert code == 0 and cancelled, output[-3000:]
    assert "slurm: asked for 2 job(s)" in output and re.search(
        r"Dask cluster tcp://127.0.0.1:\d+: (1 of 2|2) workers", output
    )
    workers = {job for job, (name, _) in queued.items() if name == "dask-worker"}
    assert len(workers) >= 2 and "RUNNING" in {state for _, state in queued.values()}, queued
    # each run's papermill process was one of those jobs' processes (its SLURM_JOB_ID)
    assert set(runs) == {"01-adam-epochs20", "02-adamw", "marathon"} and set(runs.values()) <= workers, runs
    assert slurm.ended().get(cancelled[0]) == "CANCELLED" and runs["01-adam-epochs20"] != cancelled[0]
    metrics = long_run.metrics()
    assert metrics["status"] == "finished" and [h["epoch"] for h in metrics["history"]] == list(range(1, 21))
    log = long_run.log.read_text()
    assert log.count("papermill 01-adam-epochs20") == 2
    second = log.split("papermill 01-adam-epochs20")[2]
    assert "epoch 1/20 " not in second and "epoch 20/20 " in second  # continued from last.ckpt, not from 0
    for name in ("02-adamw", "marathon"):
        assert RunDir(runs_root / name).metrics()["status"] == "finished"
    assert not [p for p in runs_root.glob("*/log.txt") if "srun" in p.read_text()]  # no Lightning hint about SLURM
    summary = (out / "sweeps" / "slurm" / "summary.csv").read_text()
    assert "01-adam-epochs20,done" in summary and "02-adamw,done" in summary and "\nmarathon,marathon," in summary
    assert (out / "models" / "slurm" / "v1" / "model.onnx").is_file()
    slurm.wait_until_empty(30)  # the sweep cancels its jobs when it ends
    assert all(slurm.ended().get(job) == "CANCELLED" for job in workers), slurm.ended()


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"queue": "nope"},
            "the job was refused at submission: sbatch: error: invalid partition specified: nope; "
            "Batch job submission failed: Invalid partition name specified",
        ),
        (
            {"memory": "1000GB"},
            "the job was refused at submission: sbatch: error: Memory specification can not be "
            "satisfied; Batch job submission failed: Requested node configuration is not available",
        ),
        (
            {"walltime": "01:00:00", "start_timeout": 5},  # over the partition's 30 minutes: it pends for ever
            r"no worker started within 5 s: job (\d+) PENDING \(PartitionTimeLimit\); see squeue -j \1 and scontrol",
        ),
        (
            {"python": "/nonexistent/python"},  # the job starts, its worker cannot
            r"job\(s\) (\d+) ended before a worker connected \(job \1 FAILED \(NonZeroExitCode\)\)",
        ),
    ],
    ids=["no-partition", "too-much-memory", "pends", "no-python"],
)
def test_a_job_that_cannot_start_is_one_line_after_a_bounded_wait(slurm, synth_dir, tmp_path, change, message):
    cluster = slurm.cluster_file(tmp_path, jobs=1, **change)
    path = _sweep_file(tmp_path, synth_dir, [{"optimizer": "adam"}], epochs=1)
    start = time.monotonic()
    result = _pneumo(
        slurm,
        "sweep",
        path,
        "--out",
        tmp_path / "outputs",
        "--cluster",
        "slurm",
        "--cluster-file",
        cluster,
        cwd=tmp_path,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    print(f"{change}: {time.monotonic() - start:.1f} s: {result.stderr.strip()}")
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("pneumo: error: slurm: ") and re.search(message, lines[0]), lines[0]
    assert str(cluster) in lines[0] or "ended before" in lines[0]
    assert time.monotonic() - start < 60
    slurm.wait_until_empty(30)  # nothing left queued


@pytest.mark.slow
def test_prepare_decodes_in_slurm_jobs_to_the_same_cache(slurm, synth_dir, tmp_path):
    import numpy as np

    from pneumo.data.prepare import open_prepared, prepare

    local = prepare(synth_dir, out=tmp_path / "local", image_size=32, workers=1)
    before = set(slurm.ended())
    result = _pneumo(
        slurm,
        "prepare",
        synth_dir,
        "--out",
        tmp_path / "slurm",
        "--image-size",
        32,
        "--cluster",
        "slurm",
        "--cluster-file",
        slurm.cluster_file(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "slurm: asked for 2 job(s)" in result.stdout and "48 images" in result.stdout
    slurm.wait_until_empty(30)
    assert len(set(slurm.ended()) - before) == 2  # its two jobs came and went
    on_slurm = open_prepared(tmp_path / "slurm")
    assert on_slurm.features.equals(local.features)
    assert np.array_equal(np.asarray(on_slurm.images()), np.asarray(local.images()))
