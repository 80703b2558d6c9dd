"""The papermill sweep: validation before any run, the summary, and a real parallel sweep."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from pneumo.errors import PneumoError, SweepError
from pneumo.sweeps.sweep import load_sweep, run_name, summarize
from pneumo.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = str(ROOT / "notebooks" / "02-train.ipynb")
TINY = {"epochs": 2, "image_size": 64, "depth": 3, "width": 4, "batch_size": 8, "n_val_images": 2}


def _write(tmp_path, spec):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_run_names_are_readable():
    assert run_name(3, {"optimizer": "adamw", "lr": 0.001}) == "03-adamw-lr0.001"
    assert run_name(12, {"lr": 0.01, "batch_size": 32}) == "12-lr0.01-batch_size32"
    assert run_name(2, {"data_dir": "/data/rsna-v2/"}) == "02-data_dirrsna-v2"


def test_runs_from_list_and_grid(tmp_path, synth_dir):
    path = _write(tmp_path, {"name": "s", "notebook": NOTEBOOK, "base": {"data_dir": str(synth_dir), **TINY},
                             "runs": [{"optimizer": "adam"}],
                             "grid": {"optimizer": ["sgd", "adagrad"], "lr": [0.1, 0.01]}})
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs] == ["01-adam", "02-sgd-lr0.1", "03-sgd-lr0.01", "04-adagrad-lr0.1",
                                           "05-adagrad-lr0.01"]
    assert sweep.runs[1].params["epochs"] == 2 and sweep.runs[1].params["optimizer"] == "sgd"


def test_typo_fails_before_any_run_naming_run_and_key(tmp_path):
    path = _write(tmp_path, {"notebook": NOTEBOOK, "runs": [{"optimizer": "adam"}, {"optimizer": "sgd", "lrr": 0.1}]})
    with pytest.raises(SweepError, match="run 02-sgd-lrr0.1: parameter.*lrr.*not in the parameters cell"):
        load_sweep(path)
    path = _write(tmp_path, {"notebook": NOTEBOOK, "runs": [{"optimizer": "adam", "epochs": 0}]})
    with pytest.raises(SweepError, match="run 01-adam-epochs0: epochs must be in 1..100000"):
        load_sweep(path)
    path = _write(tmp_path, {"notebook": NOTEBOOK, "runs": []})
    with pytest.raises(SweepError, match="no runs"):
        load_sweep(path)


def test_a_huge_grid_is_refused_before_it_is_built(tmp_path):
    grid = {k: list(range(1, 11)) for k in ("epochs", "batch_size", "width", "depth", "seed", "max_images", "threads")}
    path = _write(tmp_path, {"notebook": NOTEBOOK, "grid": grid})
    with pytest.raises(SweepError, match="10000000 runs .*at most 1000 in one sweep"):
        load_sweep(path)


def test_a_data_dir_in_a_symlink_loop_is_one_line(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    path = _write(tmp_path, {"notebook": NOTEBOOK, "runs": [{"data_dir": str(tmp_path / "loop" / "x")}]})
    with pytest.raises(PneumoError, match="run 01-data_dirx: data_dir .*loop/x: cannot be resolved"):
        load_sweep(path)


def test_shipped_params_files_validate():
    for name in ("optimizers.yaml", "quick.yaml", "full.yaml"):
        sweep = load_sweep(ROOT / "params" / name)
        assert {r.params["optimizer"] for r in sweep.runs} >= {"adam", "adamw", "adamax", "sgd", "adagrad"}
        assert sweep.marathon.get("epochs", 0) > sweep.base["epochs"]


def test_print_name_is_the_sweeps_own_name(tmp_path, capsys):
    from pneumo.cli import main

    path = _write(tmp_path, {"notebook": NOTEBOOK, "runs": [{"optimizer": "adam"}]})
    assert main(["sweep", str(path), "--print-name"]) == 0
    assert capsys.readouterr().out == "sweep\n"  # the file's stem when it names none
    path.write_text(yaml.safe_dump({"name": "opt-1.5", "notebook": NOTEBOOK, "runs": [{"optimizer": "adam"}]}))
    assert main(["sweep", str(path), "--print-name"]) == 0
    assert capsys.readouterr().out == "opt-1.5\n"
    assert not (tmp_path / "outputs").exists()  # nothing ran


def test_summary_ranks_runs_and_says_what_each_left(tmp_path):
    path = _write(tmp_path, {"name": "s", "notebook": NOTEBOOK, "base": TINY,
                             "runs": [{"optimizer": "adam"}, {"optimizer": "sgd"}, {"optimizer": "adamw"}]})
    spec = load_sweep(path)
    runs_root = tmp_path / "runs" / "s"
    adam, sgd, _ = (RunDir(runs_root / r.name) for r in spec.runs)
    adam.write_metrics({"status": "finished", "best_val_map": 0.2, "wall_time_s": 10.0})
    adam.write_process(12.5, 0)
    sgd.mark_failed("ValueError: lr too high")  # adamw never started
    rows = summarize(spec, runs_root, tmp_path / "sweeps")
    assert [(r["run"], r["status"]) for r in rows] == [("01-adam", "done"), ("02-sgd", "failed"),
                                                       ("03-adamw", "pending")]
    assert rows[0]["overhead_s"] == 2.5 and rows[1]["error"] == "ValueError: lr too high"
    assert rows[0]["optimizer"] == "adam" and "epochs" not in rows[0]  # only the parameters that differ
    table = (tmp_path / "sweeps" / "s" / "summary.md").read_text()
    assert "| rank | run | status |" in table and "| 2 | 02-sgd | failed |" in table


def test_summary_flags_runs_still_improving_and_shows_the_marathon_with_its_test_score(tmp_path):
    from pneumo.deploy.registry import export_model, record_test_score

    path = _write(tmp_path, {"name": "s", "notebook": NOTEBOOK, "base": TINY,
                             "runs": [{"optimizer": "adam"}, {"optimizer": "sgd"}]})
    spec = load_sweep(path)
    runs_root = tmp_path / "runs" / "s"  # the outputs root is tmp_path: runs/, sweeps/, models/
    adam, sgd = (RunDir(runs_root / r.name) for r in spec.runs)
    history = [{"epoch": 1, "val_map": 0.1}, {"epoch": 2, "val_map": 0.3}]
    adam.write_metrics({"status": "finished", "best_val_map": 0.3, "best_epoch": 2, "epochs_done": 2,
                        "history": history})  # best at its last epoch: still improving
    sgd.write_metrics({"status": "finished", "best_val_map": 0.2, "best_epoch": 1, "epochs_done": 2,
                       "history": [{"epoch": 1, "val_map": 0.2}, {"epoch": 2, "val_map": 0.1}]})
    marathon = RunDir(runs_root / "marathon")
    _finish(marathon, {**spec.runs[0].params, "epochs": 5})
    marathon.write_metrics({"status": "finished", "best_val_map": 0.9, "best_epoch": 4, "epochs_done": 5})
    marathon.checkpoints.mkdir()
    marathon.best_checkpoint.write_bytes(b"weights")
    (runs_root / "marathon-2").mkdir()  # started, no metrics yet: no row
    rows = summarize(spec, runs_root, tmp_path / "sweeps")
    assert [(r["rank"], r["run"], r["still_improving"] == "yes") for r in rows] == [(1, "01-adam", True),
                                                                                  (2, "02-sgd", False)]
    table = (tmp_path / "sweeps" / "s" / "summary.md").read_text()
    assert "| still_improving |" in table and "| 1 | 01-adam | done | 0.3000 | 2 | 2 | yes |" in table
    assert "| marathon | marathon | done | 0.9000 | 4 | 5 |  |" in table and "marathon-2" not in table
    assert "| test_map |" not in table  # nothing exported yet

    model = export_model(marathon.path, tmp_path / "models", "s", "s")
    summarize(spec, runs_root, tmp_path / "sweeps")
    csv = (tmp_path / "sweeps" / "s" / "summary.csv").read_text().splitlines()
    assert csv[0].endswith(",model,test_map") and csv[-1].startswith("marathon,marathon,done,0.9,")
    assert csv[-1].endswith(",v1,")  # exported, not scored yet
    record_test_score(model, {"map": 0.4321, "n_images": 8}, tmp_path / "test-images")
    rows = summarize(spec, runs_root, tmp_path / "sweeps")
    assert [r["run"] for r in rows] == ["01-adam", "02-sgd"]  # the marathon is never the best run
    table = (tmp_path / "sweeps" / "s" / "summary.md").read_text()
    assert "| marathon | marathon | done | 0.9000 |" in table and table.count("| v1 | 0.4321 |") == 1
    assert "Rank `marathon`: the best run's parameters trained longer" in table


def _sweep(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pneumo", "sweep", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "PNEUMO_NO_PROGRESS": "1", "HOME": str(cwd)})


@pytest.mark.slow
def test_real_parallel_sweep_with_a_failing_run_then_resume(tmp_path, synth_dir):
    late_data = tmp_path / "late-data"  # missing at first: passes validation, raises in training
    path = _write(tmp_path, {"name": "t", "notebook": NOTEBOOK, "base": {"data_dir": str(synth_dir), **TINY},
                             "runs": [{"optimizer": "adam"}, {"optimizer": "sgd", "data_dir": str(late_data)}],
                             "marathon": {"epochs": 3}})
    out = tmp_path / "outputs"
    first = _sweep(path, "--out", out, "--max-parallel", "2", cwd=tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "02-sgd" in first.stderr and "--resume" in first.stderr
    runs = out / "runs" / "t"
    ok = runs / "01-adam"
    bad = next(p for p in runs.iterdir() if p.name.startswith("02-"))
    assert json.loads((ok / "metrics.json").read_text())["status"] == "finished"
    failed = json.loads((bad / "failed.json").read_text())
    assert "does not exist" in failed["error"]
    for run in (ok, bad):  # the executed notebook, partial for the failed run, is valid nbformat
        nbformat.validate(nbformat.read(run / "notebook.ipynb", as_version=4))
        assert (run / "log.txt").is_file()
    failed_nb = nbformat.read(bad / "notebook.ipynb", as_version=4)
    assert any(o.output_type == "error" for c in failed_nb.cells if c.cell_type == "code" for o in c.outputs)
    summary = (out / "sweeps" / "t" / "summary.csv").read_text().splitlines()
    assert summary[1].startswith("1,01-adam,done") and ",failed," in summary[2]
    assert "| rank | run | status |" in (out / "sweeps" / "t" / "summary.md").read_text()

    adam_mtime = (ok / "metrics.json").stat().st_mtime_ns
    shutil.copytree(synth_dir, late_data)
    again = _sweep(path, "--out", out, "--resume", "--marathon", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 runs (1 done)" in again.stdout
    assert (ok / "metrics.json").stat().st_mtime_ns == adam_mtime  # the finished run was not run again
    assert json.loads((bad / "metrics.json").read_text())["status"] == "finished"
    model = out / "models" / "t" / "v1"
    card = json.loads((model / "model.json").read_text())
    assert (model / "model.ckpt").is_file() and card["params"]["epochs"] == 3 and card["source_sweep"] == "t"
    assert {"threshold", "git_commit", "data_fingerprint", "created_at", "metrics"} <= set(card)
    assert (model / "model.md").is_file() and (model / "model.onnx").is_file() and \
        card["subgroups"]  # pneumo.deploy.modelcard
    assert card["source_run"] == "runs/t/marathon" and card["parent_run"]["run"] == "marathon"
    assert card["training_data"]["synthetic"] is True and "synthetic images" in (model / "model.md").read_text()
    assert str(tmp_path) not in (model / "model.json").read_text() + (model / "model.md").read_text()
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(runs))
    mux.Reload()
    with_hparams = [r for r, tags in mux.Runs().items() if "_hparams_/session_start_info" in
                    mux.PluginRunToTagToContent("hparams").get(r, {})]
    assert {"01-adam", bad.name, "marathon"} == set(with_hparams)
    refused = _sweep(path, "--out", out, cwd=tmp_path)
    assert refused.returncode == 1 and "pass --resume" in refused.stderr
    summarized = _sweep(path, "--out", out, "--resume", cwd=tmp_path)  # all done: the summary again
    assert summarized.returncode == 0, summarized.stdout + summarized.stderr
    assert "| marathon | marathon | done |" in (out / "sweeps" / "t" / "summary.md").read_text()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_leaves_a_resumable_sweep(tmp_path, synth_dir):
    import signal
    import time

    # enough epochs that the run cannot finish between its first checkpoint and the Ctrl-C
    # reaching it (a tiny epoch takes well under a second; a loaded machine delays the signal)
    path = _write(tmp_path, {"name": "c", "notebook": NOTEBOOK,
                             "base": {"data_dir": str(synth_dir), **TINY, "epochs": 40},
                             "runs": [{"optimizer": "adam"}]})
    out = tmp_path / "outputs"
    env = {"PATH": "/usr/bin:/bin", "PNEUMO_NO_PROGRESS": "1", "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "pneumo", "sweep", str(path), "--out", str(out)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = out / "runs" / "c" / "01-adam"
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoints" / "last.ckpt").is_file():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (run_dir / "metrics.json").exists()
    time.sleep(1)
    assert subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).stdout == b""  # no run left behind
    again = _sweep(path, "--out", out, "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and [h["epoch"] for h in metrics["history"]] == list(range(1, 41))


def _finish(run_dir: RunDir, params: dict) -> None:
    """A run directory as a finished training leaves it (config.yaml, metrics.json)."""
    from pneumo.config import TrainConfig

    run_dir.path.mkdir(parents=True, exist_ok=True)
    run_dir.write_config(TrainConfig.from_dict(params))
    run_dir.write_metrics({"status": "finished", "best_val_map": 0.1})


def test_resume_refuses_finished_runs_of_other_base_parameters(tmp_path, synth_dir):
    from pneumo.sweeps.sweep import sweep

    spec = {"name": "s", "notebook": NOTEBOOK, "base": {"data_dir": str(synth_dir), **TINY},
            "runs": [{"optimizer": "adam"}]}
    old = load_sweep(_write(tmp_path, spec))
    _finish(old.runs[0].dir(tmp_path / "out" / "runs" / "s"), old.runs[0].params)
    spec["base"]["lr"] = 0.5  # the base changed since: the finished run trained something else
    with pytest.raises(SweepError, match=r"other parameters \(lr\)"):
        sweep(_write(tmp_path, spec), out=tmp_path / "out", resume=True)
    other_data = tmp_path / "other-data"
    shutil.copytree(synth_dir, other_data)
    spec["base"].pop("lr")
    spec["base"]["data_dir"] = str(other_data)  # the file itself now names other data
    with pytest.raises(SweepError, match=r"other parameters \(data_dir\)"):
        sweep(_write(tmp_path, spec), out=tmp_path / "out", resume=True)
    assert not (tmp_path / "out" / "sweeps").exists()  # refused before any summary was written


def test_the_same_sweep_on_other_data_is_another_sweep(tmp_path, synth_dir, capsys):
    """`nox -s sweep -- --data-dir DIR` right after the demo: its own name, so nothing collides."""
    from pneumo.cli import main

    spec = {"name": "optimizers", "notebook": NOTEBOOK, "base": {"data_dir": str(synth_dir), **TINY},
            "runs": [{"optimizer": "adam"}]}
    path = _write(tmp_path, spec)
    assert load_sweep(path).name == "optimizers"
    assert load_sweep(path, data_dir=str(synth_dir)).name == "optimizers"  # the data the file names
    rsna = tmp_path / "My RSNA data"
    rsna.mkdir()
    other = load_sweep(path, data_dir=str(rsna))
    assert other.name == "optimizers-My-RSNA-data" and other.runs[0].params["data_dir"] == str(rsna.resolve())
    # the noxfile asks for the name this way, then predicts with that sweep's model
    assert main(["sweep", str(path), "--data-dir", str(rsna), "--print-name"]) == 0
    assert capsys.readouterr().out == "optimizers-My-RSNA-data\n"
    assert main(["sweep", str(path), "--data-dir", str(synth_dir), "--print-name"]) == 0
    assert capsys.readouterr().out == "optimizers\n"


def test_a_marathon_of_other_parameters_is_kept_and_a_new_one_named(tmp_path):
    from pneumo.config import TrainConfig
    from pneumo.sweeps.sweep import _marathon_run

    runs_root = tmp_path / "runs"
    params = {**TINY, "optimizer": "adam", "epochs": 5}
    assert _marathon_run(runs_root, params).name == "marathon"
    _finish(RunDir(runs_root / "marathon"), params)
    assert _marathon_run(runs_root, {**params, "max_time": 60}).name == "marathon"  # how it runs, not what
    assert _marathon_run(runs_root, {**params, "optimizer": "sgd"}).name == "marathon-2"  # best run changed
    assert _marathon_run(runs_root, {**params, "epochs": 9}).name == "marathon-2"  # overrides changed
    assert TrainConfig.from_dict(RunDir(runs_root / "marathon").read_config()).optimizer == "adam"  # kept


def test_a_nul_in_a_path_parameter_is_one_sweep_error(tmp_path):
    path = _write(tmp_path, {"name": "s", "notebook": NOTEBOOK, "base": {"data_dir": "data\0x", **TINY},
                             "runs": [{"optimizer": "adam"}]})
    with pytest.raises(SweepError, match="NUL"):  # was ValueError: embedded null byte, a traceback
        load_sweep(path)
