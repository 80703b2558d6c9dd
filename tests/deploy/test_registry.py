"""The model registry: versions are claimed once, never overwritten; paths resolve to checkpoints."""

import json
import threading

import pytest

from pneumo.deploy.registry import export_model, latest_version, resolve_model
from pneumo.errors import ModelError, RunError
from pneumo.training.rundir import RunDir


def _finished_run(path, weights: bytes = b"weights", val_map: float = 0.25) -> RunDir:
    """A run directory as training leaves it (the checkpoint is opaque bytes: the registry only copies it)."""
    run = RunDir(path)
    run.checkpoints.mkdir(parents=True)
    run.best_checkpoint.write_bytes(weights)
    run.config_file.write_text("optimizer: adam\nepochs: 3\n")
    run.write_metrics({"status": "finished", "best_val_map": val_map, "best_epoch": 2, "threshold": 0.4,
                       "postprocess": {"threshold": 0.4, "gate": 0.6, "max_boxes": 3}, "data_fingerprint": "abc"})
    return run


def test_export_writes_the_checkpoint_and_its_card(tmp_path):
    run = _finished_run(tmp_path / "runs" / "marathon")
    model = export_model(run.path, tmp_path / "models", "opt", "optimizers")
    assert model == tmp_path / "models" / "opt" / "v1"
    assert (model / "model.ckpt").read_bytes() == b"weights"
    card = json.loads((model / "model.json").read_text())
    assert card["name"] == "opt" and card["version"] == "v1" and card["source_sweep"] == "optimizers"
    assert card["params"] == {"optimizer": "adam", "epochs": 3} and card["threshold"] == 0.4
    assert card["postprocess"] == {"threshold": 0.4, "gate": 0.6, "max_boxes": 3}  # what predict will apply
    assert card["metrics"]["best_val_map"] == 0.25 and card["source_run"] == str(run.path.resolve())
    assert {"git_commit", "data_fingerprint", "created_at"} <= set(card)
    assert [p.name for p in model.parent.iterdir()] == ["v1"]  # no staging directory left behind


def test_the_same_run_twice_is_the_same_version_and_a_new_run_a_new_one(tmp_path):
    first = _finished_run(tmp_path / "a", b"first")
    second = _finished_run(tmp_path / "b", b"second")
    models = tmp_path / "models"
    assert export_model(first.path, models, "m", "s").name == "v1"
    assert export_model(first.path, models, "m", "s").name == "v1"
    assert export_model(second.path, models, "m", "s").name == "v2"
    assert (models / "m" / "v1" / "model.ckpt").read_bytes() == b"first"  # never overwritten
    assert latest_version(models / "m") == models / "m" / "v2"


def test_an_existing_version_directory_is_never_taken(tmp_path):
    models = tmp_path / "models"
    (models / "m" / "v1").mkdir(parents=True)  # claimed by another export still copying
    (models / "m" / "v3").mkdir()
    (models / "m" / "v3" / "keep").write_text("someone else's")
    run = _finished_run(tmp_path / "run")
    assert export_model(run.path, models, "m", "s").name == "v4"
    assert list((models / "m" / "v1").iterdir()) == [] and (models / "m" / "v3" / "keep").is_file()
    assert latest_version(models / "m") == models / "m" / "v4"  # v1, v3 have no model.ckpt: not versions


def test_concurrent_exports_of_different_runs_get_different_versions(tmp_path):
    runs = [_finished_run(tmp_path / f"run{i}", f"weights {i}".encode()) for i in range(8)]
    models = tmp_path / "models"
    start = threading.Barrier(len(runs))
    exported = {}

    def export(run):
        start.wait()
        exported[run.name] = export_model(run.path, models, "m", "s")

    threads = [threading.Thread(target=export, args=(run,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in exported.values()) == sorted(f"v{i}" for i in range(1, 9))
    for run in runs:  # each version holds the run that claimed it
        version = exported[run.name]
        assert (version / "model.ckpt").read_bytes() == run.best_checkpoint.read_bytes()
        assert json.loads((version / "model.json").read_text())["version"] == version.name


def test_only_finished_runs_are_exported(tmp_path):
    run = _finished_run(tmp_path / "run")
    run.write_metrics({"status": "interrupted"})
    with pytest.raises(RunError, match="not a finished run"):
        export_model(run.path, tmp_path / "models", "m", "s")
    assert not (tmp_path / "models" / "m" / "v1").exists()


def test_latest_version_orders_numerically(tmp_path):
    family = tmp_path / "m"
    assert latest_version(family) is None
    for version in ("v2", "v10", "v9", "vx", "v"):
        (family / version).mkdir(parents=True)
        (family / version / "model.ckpt").write_bytes(b"w")
    assert latest_version(family) == family / "v10"


def test_resolve_model_for_each_kind_of_path(tmp_path):
    run = _finished_run(tmp_path / "run")
    assert resolve_model(run.path) == (run.best_checkpoint, {})
    assert resolve_model(run.best_checkpoint) == (run.best_checkpoint, {})
    family = tmp_path / "models" / "m"
    export_model(run.path, tmp_path / "models", "m", "s")
    export_model(_finished_run(tmp_path / "run2").path, tmp_path / "models", "m", "s")
    path, card = resolve_model(family / "v1")
    assert path == family / "v1" / "model.ckpt" and card["version"] == "v1"
    path, card = resolve_model(family)  # a family: its latest version
    assert path == family / "v2" / "model.ckpt" and card["version"] == "v2"


def test_resolve_model_errors_say_what_was_expected(tmp_path):
    with pytest.raises(ModelError, match="nothing: no such model"):
        resolve_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"empty: no model\.ckpt, checkpoints/best\.ckpt or v\*/model\.ckpt inside"):
        resolve_model(tmp_path / "empty")
