"""The sweep's status lines, read from what each run leaves in its directory."""

from types import SimpleNamespace

from pneumo.sweeps.statusboard import StatusBoard
from pneumo.training.rundir import RunDir


def test_lines_follow_the_run_directories(tmp_path, capsys):
    runs = [SimpleNamespace(name=n) for n in ("a", "b", "c")]
    board = StatusBoard(runs, tmp_path)
    assert board.line("a") == "queued"
    board.update("a", "running")
    assert board.line("a") == "running (starting kernel)"
    RunDir(tmp_path / "a").write_status("running", epoch=2, epochs=5, val_map=0.125)
    assert board.line("a") == "running epoch 2/5  val mAP 0.125"
    RunDir(tmp_path / "a").write_status("done", epoch=5, epochs=5)
    assert board.line("a") == "finishing (saving the executed notebook)"
    RunDir(tmp_path / "b").write_metrics({"status": "finished", "best_val_map": 0.3})
    board.update("b", "done")
    assert board.line("b") == "done  best val mAP 0.3000"
    RunDir(tmp_path / "c").mark_failed("ValueError: bad data")
    board.update("c", "failed")
    assert board.line("c") == "FAILED  ValueError: bad data"
    board.close()
    printed = capsys.readouterr().out  # not a terminal: one line per change, none for queued runs
    assert "running (starting kernel)" in printed and "FAILED  ValueError: bad data" in printed
