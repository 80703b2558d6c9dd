"""The run directory's states as a sweep sees them, read from the files a run leaves."""

import json

import pytest

from pneumo.training.rundir import RunDir, read_json


@pytest.fixture
def run(tmp_path):
    return RunDir(tmp_path / "01-adam")


def test_states_from_pending_to_done(run):
    assert run.state() == "pending" and not run.finished()
    run.write_status("starting", epoch=0, epochs=3)
    assert run.state() == "starting"
    run.write_status("running", epoch=1, epochs=3, val_map=0.1)
    assert run.state() == "running" and run.status()["epoch"] == 1
    run.write_metrics({"status": "interrupted"})  # metrics that do not say finished are not a finished run
    assert run.state() == "running" and not run.finished()
    run.write_metrics({"status": "finished", "best_val_map": 0.3})
    assert run.state() == "done" and run.finished()


def test_a_failure_wins_over_a_stale_status_but_not_over_finished_metrics(run):
    run.write_status("running", epoch=2, epochs=3)
    run.mark_failed("ValueError: " + "x" * 1000, returncode=1)
    assert run.state() == "failed"
    assert run.failure()["returncode"] == 1 and len(run.failure()["error"]) == 500
    run.write_metrics({"status": "finished"})
    assert run.state() == "done"


def test_a_torn_status_file_is_a_run_writing_it(run):
    run.path.mkdir()
    run.status_file.write_text('{"state": "runn')
    assert run.status() == {} and run.state() == "running"
    run.metrics_file.write_text('{"status": "fini')  # torn metrics: not finished yet
    assert not run.finished() and run.state() == "running"


def test_read_json_is_empty_for_missing_torn_or_non_object_files(tmp_path):
    assert read_json(tmp_path / "missing.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json") == {}
    (tmp_path / "ok.json").write_text(json.dumps({"a": 1}))
    assert read_json(tmp_path / "ok.json") == {"a": 1}


def test_thread_share(run):
    assert run.thread_share() is None
    run.path.mkdir()
    run.give_threads(3)
    assert run.thread_share() == 3
    run.threads_file.write_text("0\n")  # nonsense is no share, not zero threads
    assert run.thread_share() is None
    run.threads_file.write_text("many\n")
    assert run.thread_share() is None


def test_start_execution_forgets_an_earlier_failure_and_thread_share(run):
    run.start_execution()  # creates the directory of a run never started
    run.mark_failed("RuntimeError: out of memory")
    run.give_threads(4)
    run.write_status("running", epoch=1)
    run.start_execution()
    assert run.failure() == {} and run.thread_share() is None
    assert run.state() == "running"  # its progress is kept: a resumed run goes on from it


def test_paths_are_under_the_run_directory(run):
    files = [run.config_file, run.status_file, run.metrics_file, run.failed_file, run.process_file,
             run.threads_file, run.notebook, run.log, run.papermill_params]
    assert all(p.parent == run.path for p in files) and len({p.name for p in files}) == len(files)
    assert run.best_checkpoint.parent == run.last_checkpoint.parent == run.checkpoints
    assert run.name == "01-adam"
