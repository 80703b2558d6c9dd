"""The model registry: versions are claimed once, never overwritten; paths resolve to checkpoints."""

import json
import threading

import pytest
import yaml

from pneumo.deploy.registry import (
    export_model,
    latest_version,
    model_version_dir,
    record_test_score,
    resolve_model,
)
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
    assert card["metrics"]["best_val_map"] == 0.25
    assert card["source_run"] == "runs/marathon"  # relative to the outputs root (tmp_path: models/'s parent)
    assert card["parent_run"] == {"sweep": "optimizers", "run": "marathon", "best_epoch": 2, "best_val_map": 0.25,
                                  "epochs_done": None}
    assert {"git_commit", "data_fingerprint", "created_at"} <= set(card)
    assert [p.name for p in model.parent.iterdir()] == ["v1"]  # no staging directory left behind
    assert "Model card: opt" in (model / "model.md").read_text()  # rendered from model.json, with or without extras


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


def _configured_run(path, data_dir, **params) -> RunDir:
    run = _finished_run(path)
    run.config_file.write_text(yaml.safe_dump({"optimizer": "adam", "data_dir": str(data_dir), **params}))
    return run


def test_the_card_names_no_path_of_the_training_machine(tmp_path):
    outputs = tmp_path / "outputs"
    data = outputs / "data-here" / "rsna"
    data.mkdir(parents=True)
    weights = tmp_path / "elsewhere" / "weights.pth"
    run = _configured_run(tmp_path / "elsewhere" / "my-run", data, encoder_weights=str(weights))
    model = export_model(run.path, outputs / "models", "m", "s")
    card = json.loads((model / "model.json").read_text())
    assert card["source_run"] == "my-run"  # outside the outputs root: its name alone
    assert card["params"]["data_dir"] == "data-here/rsna" and card["params"]["encoder_weights"] == "weights.pth"
    assert card["training_data"]["source"] == "data-here/rsna" and card["training_data"]["synthetic"] is False
    for name in ("model.json", "model.md"):
        assert str(tmp_path) not in (model / name).read_text(), name


def test_another_run_of_the_same_name_is_another_version(tmp_path):
    models = tmp_path / "outputs" / "models"
    first = _finished_run(tmp_path / "a" / "run", b"first")
    second = _finished_run(tmp_path / "b" / "run", b"second")  # the same portable name "run"
    assert export_model(first.path, models, "m", "s").name == "v1"
    assert export_model(second.path, models, "m", "s").name == "v2"
    assert export_model(first.path, models, "m", "s").name == "v1"
    legacy = models / "m" / "v1" / "model.json"  # a card written when source_run was absolute
    legacy.write_text(json.dumps({**json.loads(legacy.read_text()), "source_run": str(first.path.resolve()),
                                  "checkpoint_sha256": None}))
    assert export_model(first.path, models, "m", "s").name == "v1"


def test_synthetic_data_is_said_on_the_card(tmp_path, synth_dir):
    run = _configured_run(tmp_path / "run", synth_dir)
    model = export_model(run.path, tmp_path / "models", "m", "s")
    card = json.loads((model / "model.json").read_text())
    assert card["training_data"]["synthetic"] is True and card["training_data"]["source"] == synth_dir.name
    text = (model / "model.md").read_text()
    assert "trained on synthetic images" in text and "say nothing about how it does on real chest X-rays" in text
    assert "- synthetic: yes" in text


def test_a_prepared_cache_is_followed_to_its_source_and_a_missing_one_is_unknown(tmp_path, synth_dir):
    from pneumo.deploy.registry import data_source

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(json.dumps({"data_dir": str(synth_dir)}))
    assert data_source(prepared) == (True, synth_dir)
    assert data_source(tmp_path) == (False, tmp_path)
    assert data_source(tmp_path / "gone") == (None, tmp_path / "gone")
    run = _configured_run(tmp_path / "run", tmp_path / "gone")
    model = export_model(run.path, tmp_path / "models", "m", "s")
    assert json.loads((model / "model.json").read_text())["training_data"]["synthetic"] is None
    assert "- synthetic: unknown" in (model / "model.md").read_text()


def test_package_versions_are_on_the_card(tmp_path):
    import importlib.metadata

    import pneumo

    model = export_model(_finished_run(tmp_path / "run").path, tmp_path / "models", "m", "s")
    packages = json.loads((model / "model.json").read_text())["packages"]
    assert packages["pneumo"] == pneumo.__version__
    assert packages["torch"] == importlib.metadata.version("torch")
    assert packages["lightning"] == importlib.metadata.version("lightning")
    assert "pneumo " + pneumo.__version__ in (model / "model.md").read_text()


def test_a_test_score_goes_on_the_card_and_its_text(tmp_path):
    outputs = tmp_path / "outputs"
    model = export_model(_finished_run(tmp_path / "run").path, outputs / "models", "m", "s")
    assert "Not scored yet" in (model / "model.md").read_text()
    score = {"map": 0.1234, "n_images": 8, "per_threshold": {"0.5": 0.2},
             "subgroups": {"overall": {"n_images": 8, "n_positive": 3, "map": 0.1234}, "min_images": 30,
                           "min_positives": 30, "by": {}}}
    test = record_test_score(model, score, outputs / "test-images")
    card = json.loads((model / "model.json").read_text())
    assert card["test"] == test and test["map"] == 0.1234 and test["n_images"] == 8
    assert test["images"] == "test-images" and test["subgroups"] == score["subgroups"]
    assert card["version"] == "v1" and card["metrics"]["best_val_map"] == 0.25  # the rest kept
    text = (model / "model.md").read_text()
    assert "## Metrics (test set)" in text and "mAP 0.123 on 8 labelled images of `test-images`" in text
    assert "Not scored yet" not in text and str(tmp_path) not in text
    record_test_score(model, {**score, "map": 0.5}, tmp_path / "other" / "imgs", settings={"tta": True})
    card = json.loads((model / "model.json").read_text())
    assert card["test"]["map"] == 0.5 and card["test"]["images"] == "imgs"  # replaced, not appended
    assert '{"tta": true}' in (model / "model.md").read_text()
    assert sorted(p.name for p in model.iterdir()) == ["model.ckpt", "model.json", "model.md"]
    with pytest.raises(ModelError, match="not a model version"):
        record_test_score(tmp_path / "run", score, tmp_path)


def test_model_version_dir_names_registered_versions_only(tmp_path):
    run = _finished_run(tmp_path / "run")
    model = export_model(run.path, tmp_path / "models", "m", "s")
    assert model_version_dir(model) == model == model_version_dir(str(model / "model.ckpt"))
    assert model_version_dir(model.parent) == model  # a family: its latest version
    assert model_version_dir(run.path) is None and model_version_dir(run.best_checkpoint) is None
    assert model_version_dir(tmp_path / "nothing") is None and model_version_dir(object()) is None
