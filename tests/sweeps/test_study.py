"""search: sweeps: the spec checked before anything runs, and real Optuna studies (SQLite) whose
trials are real papermill runs that report their epochs, get pruned, fail, and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pneumo.errors import SweepError
from pneumo.sweeps.study import make_sampler, parse_search
from pneumo.sweeps.sweep import load_sweep
from pneumo.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = str(ROOT / "notebooks" / "02-train.ipynb")
TINY = {"image_size": 64, "depth": 3, "width": 4, "batch_size": 8, "n_val_images": 0, "save_images": False}
ALLOWED = {"lr", "optimizer", "width", "epochs", "threshold", "augment", "run_dir"}


def _write(tmp_path, spec, name="search.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _sweep(*args, cwd, timeout=900):
    env = {**os.environ, "PNEUMO_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "pneumo", "sweep", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _study(out: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'sweeps' / name / 'study.db'}")


def test_search_spec_kinds_follow_trainconfig():
    spec = parse_search({"params": {"lr": {"low": 1e-4, "high": 0.1, "log": True}, "optimizer": ["adam", "sgd"],
                                    "width": {"low": 4, "high": 16, "step": 4}, "augment": [True, False]},
                         "trials": 5, "sampler": "random", "pruner": {"type": "asha", "reduction_factor": 2}},
                        {}, ALLOWED, "s.yaml: search")
    assert {k: v["kind"] for k, v in spec.space.items()} == {"lr": "float", "optimizer": "categorical",
                                                             "width": "int", "augment": "categorical"}
    dists = spec.distributions()
    assert dists["lr"].log and dists["width"].step == 4 and dists["optimizer"].choices == ("adam", "sgd")
    assert spec.trials == 5 and spec.pruner == {"type": "asha", "reduction_factor": 2}


@pytest.mark.parametrize("search, message", [
    ({"params": {"lrr": {"low": 0.1, "high": 1}}}, "params.lrr: not a parameter of the notebook"),
    ({"params": {"lr": {"low": 0.1, "high": 0.01}}}, "params.lr: low and high must be finite numbers with low < high"),
    ({"params": {"lr": {"low": 0.1, "high": float("inf")}}}, "params.lr: low and high must be finite numbers"),
    ({"params": {"lr": {"low": 0.1, "high": 0.5, "step": 1e-300}}}, "step 1e-300 makes more than 1000000 values"),
    ({"params": {"lr": {"low": 0.1, "high": 0.5, "step": float("nan")}}}, "step must be a number > 0"),
    ({"params": {"lr": [0.1]}, "trials": 10**9}, "trials must be a whole number in 1..1000, not 1000000000"),
    ({"params": {"lr": [0.1]}, "sampler": "x" * 10**6}, r"sampler 'x+[.]{3}x+'; valid"),
    ({"params": {"lr": {"low": 0, "high": 0.1, "log": True}}}, "params.lr: log: true needs low > 0"),
    ({"params": {"width": {"low": 4.5, "high": 16}}}, "params.width: width is a whole number"),
    ({"params": {"optimizer": ["adam", "adamm"]}}, "optimizer must be one of"),
    ({"params": {"threshold": {"low": 0.1, "high": 1.5}}}, "params.threshold = 1.5.*threshold must be in"),
    ({"params": {"optimizer": {"low": 1, "high": 2}}}, "optimizer is not a number: give a list of choices"),
    ({"params": {"lr": [0.1]}, "pruner": "hyperband"}, "pruner must be one of"),
    ({"params": {"lr": [0.1]}, "pruner": {"type": "median", "warmup": 2}}, "unknown setting.*warmup"),
    ({"params": {"lr": [0.1]}, "trials": 0}, "trials must be a whole number in 1..1000"),
    ({"params": {"lr": [0.1]}, "sampler": "grid"}, "sampler 'grid'"),
    ({"params": {"lr": [0.1]}, "objective": "val/loss"}, "objective 'val/loss'"),
    ({"params": {"lr": [0.1]}, "trails": 3}, "unknown key.*trails"),
])
def test_a_bad_search_spec_is_one_line_naming_the_key(search, message):
    with pytest.raises(SweepError, match=message) as info:
        parse_search(search, {}, ALLOWED, "s.yaml: search")
    assert "\n" not in str(info.value)


def test_a_sweep_file_with_search_is_validated_before_anything_runs(tmp_path):
    path = _write(tmp_path, {"name": "s", "notebook": NOTEBOOK, "base": TINY,
                             "search": {"params": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "trials": 3}})
    sweep = load_sweep(path)
    assert sweep.runs == [] and sweep.search.trials == 3 and sweep.search.space["lr"]["kind"] == "float"
    both = _write(tmp_path, {"notebook": NOTEBOOK, "runs": [{"optimizer": "adam"}],
                             "search": {"params": {"lr": [0.1]}}})
    with pytest.raises(SweepError, match="not both"):
        load_sweep(both)
    result = _sweep(_write(tmp_path, {"notebook": NOTEBOOK, "search": {"params": {"momentum": [1.5]}}}),
                    "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode != 0 and "momentum must be in [0, 1)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_shipped_search_file_validates():
    sweep = load_sweep(ROOT / "params" / "search.yaml")
    assert sweep.search.pruner["type"] == "asha" and sweep.search.trials >= 8 and sweep.marathon


def _mixed_seed(spec, n: int) -> int:
    """A seed whose first n random trials draw both data_dir choices (the sampler is deterministic)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for seed in range(100):
        study = optuna.create_study(direction="maximize",
                                    sampler=make_sampler(spec.__class__(**{**spec.__dict__, "seed": seed})))
        drawn = [study.ask(spec.distributions()).params["data_dir"] for _ in range(n)]
        if len(set(drawn)) == 2 and drawn[0] != drawn[-1]:
            return seed
    raise AssertionError("no seed mixes the choices")


@pytest.mark.slow
def test_four_trial_search_prunes_and_records_a_failing_trial(tmp_path, synth_dir):
    missing = str(tmp_path / "not-there")  # passes validation, fails in training: the trial fails
    search = {"params": {"data_dir": [str(synth_dir), missing], "lr": {"low": 1e-3, "high": 1e-2, "log": True}},
              "trials": 4, "sampler": "random", "pruner": {"type": "threshold", "lower": 2.0}}  # val/map < 2: always
    spec = parse_search(search, {"epochs": 3, **TINY}, {"data_dir", "lr", "epochs", *TINY}, "t")
    search["seed"] = _mixed_seed(spec, 4)
    path = _write(tmp_path, {"name": "p", "notebook": NOTEBOOK, "base": {"epochs": 3, **TINY}, "search": search})
    out = tmp_path / "outputs"
    result = _sweep(path, "--out", out, "--max-parallel", "2", cwd=tmp_path)
    assert result.returncode == 1 and "run(s) not finished" in result.stderr, result.stdout + result.stderr
    from optuna.trial import TrialState

    trials = _study(out, "p").trials
    assert len(trials) == 4
    for trial in trials:
        run = RunDir(out / "runs" / "p" / f"trial-{trial.number:03d}")
        if trial.params["data_dir"] == missing:
            assert trial.state == TrialState.FAIL and run.state() == "failed"
            assert "does not exist" in run.failure()["error"]
            continue
        assert trial.state == TrialState.PRUNED and run.state() == "pruned"
        metrics = run.metrics()
        assert metrics["pruned_at_epoch"] == 1 == metrics["epochs_done"] and list(trial.intermediate_values) == [1]
        assert trial.intermediate_values[1] == metrics["history"][0]["val_map"]
        assert run.last_checkpoint.is_file() and run.notebook.is_file() and run.events_dir == run.path
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(out / "runs" / "p"))
    mux.Reload()
    hparams = mux.PluginRunToTagToContent("hparams")
    assert {f"trial-{t.number:03d}" for t in trials if t.state == TrialState.PRUNED} <= {
        r for r, tags in hparams.items() if "_hparams_/session_start_info" in tags}  # HParams lists pruned trials
    summary = (out / "sweeps" / "p" / "summary.csv").read_text()
    assert summary.count(",pruned,") == sum(t.state == TrialState.PRUNED for t in trials) >= 1
    assert summary.count(",failed,") == sum(t.state == TrialState.FAIL for t in trials) >= 1
    again = _sweep(path, "--out", out, cwd=tmp_path)
    assert again.returncode == 1 and "pass --resume" in again.stderr


@pytest.mark.slow
def test_a_killed_search_resumes_with_no_trial_lost_or_run_twice(tmp_path, synth_dir):
    search = {"params": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}, "trials": 2, "sampler": "random"}
    path = _write(tmp_path, {"name": "k", "notebook": NOTEBOOK,
                             "base": {"data_dir": str(synth_dir), "epochs": 30, **TINY},
                             "search": search, "marathon": {"epochs": 2}})
    out = tmp_path / "outputs"
    env = {**os.environ, "PNEUMO_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pneumo", "sweep", str(path), "--out", str(out),
                             "--max-parallel", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = RunDir(out / "runs" / "k" / "trial-000")
    deadline = time.time() + 300
    while time.time() < deadline and not first.last_checkpoint.is_file():
        time.sleep(0.2)
    assert first.last_checkpoint.is_file(), proc.communicate(timeout=5)
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind: the study still says trial 0 runs
    proc.wait()
    from optuna.trial import TrialState

    assert [t.state for t in _study(out, "k").trials] == [TrialState.RUNNING]
    assert not first.ended()
    again = _sweep(path, "--out", out, "--resume", "--marathon", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = _study(out, "k").trials
    # trial 0 went stale and was enqueued again as trial 1 with its parameters; trial 2 is new
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params and trials[1].system_attrs.get("failed_trial") == 0
    # run directories (beside them, the sweep's HParams experiment file: sweeps.hparams)
    assert sorted(p.name for p in (out / "runs" / "k").iterdir() if p.is_dir()) == ["marathon", "trial-000",
                                                                                       "trial-002"]
    best = max(trials[1:], key=lambda t: t.value)  # the marathon trains the best trial
    assert yaml.safe_load((out / "runs" / "k" / "marathon" / "config.yaml").read_text())["lr"] == best.params["lr"]
    resumed = first.metrics()
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, 31))  # every epoch once
    assert first.log.read_text().count("papermill trial-000") == 2
    assert 1 <= trials[1].user_attrs["resumed_at_epoch"] < 30  # continued from its checkpoint, not from 0
    assert sorted(trials[1].intermediate_values) == list(range(1, 31))
    summary = (out / "sweeps" / "k" / "summary.csv").read_text().splitlines()
    # the two trials ranked, then the marathon's own (unranked) row
    assert len(summary) == 4 and all(",done," in line for line in summary[1:])
    assert summary[-1].startswith("marathon,marathon,")


def _kernel_spec(tmp_path, fail_first: int) -> dict:
    """A python3 kernel that exits at once the first fail_first times it is started."""
    counter, kernels = tmp_path / "starts", tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    wrapper = tmp_path / "kernel.py"
    wrapper.write_text(f"""import os, sys
from pathlib import Path
counter = Path({str(counter)!r})
n = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(n + 1))
if n < {fail_first}:
    sys.exit(3)
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *sys.argv[1:]])
""")
    (kernels / "kernel.json").write_text(json.dumps({"argv": [sys.executable, str(wrapper), "-f", "{connection_file}"],
                                                     "display_name": "flaky", "language": "python"}))
    return {"JUPYTER_PATH": str(tmp_path / "jupyter"), "counter": counter}


def _tiny_notebook(tmp_path, body: str) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    return path


_FINISH = "from pneumo.training.rundir import RunDir\nRunDir(run_dir).write_metrics({'status': 'finished'})"


@pytest.mark.slow
@pytest.mark.parametrize("fail_first, state, starts", [(2, "done", 3), (5, "failed", 3)])
def test_a_kernel_that_does_not_start_is_retried_a_bounded_number_of_times(tmp_path, monkeypatch, fail_first,
                                                                           state, starts):
    import threading
    from types import SimpleNamespace

    from pneumo.sweeps.runner import execute_run

    kernel = _kernel_spec(tmp_path, fail_first)
    monkeypatch.setenv("JUPYTER_PATH", kernel["JUPYTER_PATH"])
    run_dir = RunDir(tmp_path / "runs" / "s" / "r")
    record = execute_run(_tiny_notebook(tmp_path, _FINISH), SimpleNamespace(name="r", params={}), run_dir, None,
                         threading.Event())
    assert record["state"] == state, run_dir.log.read_text()
    assert int(kernel["counter"].read_text()) == starts == run_dir.process()["kernel_starts"]
    assert run_dir.log.read_text().count("the kernel did not start (attempt") == 2
    if state == "failed":
        assert run_dir.failure()["error"].startswith("the kernel did not start in 3 attempts")


@pytest.mark.slow
def test_a_killed_kernel_ends_its_run_as_failed_with_the_reason(tmp_path):
    import threading
    from types import SimpleNamespace

    from pneumo.sweeps.runner import execute_run

    run_dir = RunDir(tmp_path / "runs" / "s" / "oom")
    start = time.monotonic()
    record = execute_run(_tiny_notebook(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
                         SimpleNamespace(name="oom", params={}), run_dir, None, threading.Event())
    assert record["state"] == "failed" and time.monotonic() - start < 120
    assert "the kernel was killed (out of memory, or a signal" in run_dir.failure()["error"]
    assert run_dir.process()["kernel_starts"] == 1  # it started: not retried
