"""One papermill process per run: what a failed execution leaves for the sweep and the user."""

import threading
from types import SimpleNamespace

from pneumo.sweeps.runner import _last_error, execute_run
from pneumo.sweeps.slots import Slot
from pneumo.training.rundir import RunDir


def test_last_error_is_the_runs_own_exception_line(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("Executing cell 2\n\x1b[0;31mValueError\x1b[0m: learning rate too high\n"
                   "Traceback (most recent call last):\n"
                   "papermill.exceptions.PapermillExecutionError: \n---\nValueError: learning rate too high\n"
                   "PapermillExecutionError: stop\n")
    assert _last_error(log) == "ValueError: learning rate too high"
    log.write_text("no exception here\nkernel died\n")
    assert _last_error(log) == "kernel died"
    assert _last_error(tmp_path / "missing.txt") == "no output"


def test_a_failed_execution_is_recorded_and_an_old_thread_share_forgotten(tmp_path):
    run_dir = RunDir(tmp_path / "outputs" / "runs" / "s" / "01-adam")
    run_dir.path.mkdir(parents=True)
    run_dir.give_threads(7)  # left by an earlier execution: must not steer this one
    run = SimpleNamespace(name="01-adam", params={"optimizer": "adam"})
    record = execute_run(tmp_path / "missing.ipynb", run, run_dir, Slot(None, 2), threading.Event())
    assert record["state"] == "failed" and "missing.ipynb" in record["error"]
    assert run_dir.state() == "failed" and run_dir.failure()["error"] == record["error"]
    assert run_dir.process()["returncode"] != 0 and run_dir.thread_share() is None
    params = run_dir.papermill_params.read_text()
    assert "threads: 2" in params and f"run_dir: {run_dir.path}" in params  # the slot's threads reach the notebook
    assert "papermill 01-adam (CUDA_VISIBLE_DEVICES='')" in run_dir.log.read_text()


def test_a_run_that_already_ended_is_reported_not_trained_again(tmp_path):
    """A search trial whose sweep was killed after its run finished but before the study heard:
    enqueued again as stale, it reports what the run wrote (the notebook would refuse a finished run)."""
    run = SimpleNamespace(name="trial-000", params={"optimizer": "adam"})
    for status, state in (("finished", "done"), ("pruned", "pruned")):
        run_dir = RunDir(tmp_path / status / "outputs" / "runs" / "s" / "trial-000")
        run_dir.path.mkdir(parents=True)
        run_dir.write_metrics({"status": status, "best_val_map": 0.5})
        record = execute_run(tmp_path / "missing.ipynb", run, run_dir, Slot(None, 2), threading.Event())
        assert record["state"] == state and record.get("reused") and not run_dir.log.exists()
