"""Every exported version gets model.md (with subgroup metrics on the validation split) and model.onnx."""

import json
from functools import partial

import pytest

from pneumo.deploy.modelcard import write_extras
from pneumo.deploy.registry import export_model, record_test_score, resolve_model
from pneumo.training.rundir import RunDir


def _broken_run(path) -> RunDir:
    run = RunDir(path)
    run.checkpoints.mkdir(parents=True)
    run.best_checkpoint.write_bytes(b"not a checkpoint")
    run.config_file.write_text("optimizer: adam\n")
    run.write_metrics({"status": "finished", "best_val_map": 0.30000000000000004, "data_fingerprint": "abc"})
    return run


def test_a_checkpoint_that_does_not_load_still_exports_with_a_card_saying_why(tmp_path):
    run = _broken_run(tmp_path / "run")
    model = export_model(run.path, tmp_path / "models", "m", "s", extras=write_extras)
    assert sorted(p.name for p in model.iterdir()) == ["model.ckpt", "model.json", "model.md"]
    card = (model / "model.md").read_text()
    assert "could not be loaded" in card and "| optimizer | adam |" in card and "`abc`" in card
    assert "Best validation mAP 0.300 at epoch" in card  # a figure, not a float's repr
    data = json.loads((model / "model.json").read_text())
    assert data["subgroups"] is None and "could not be loaded" in data["subgroups_note"]
    assert "(model.ckpt: not a pneumo checkpoint" in card and str(tmp_path) not in card  # not the staging path


def test_a_version_without_card_text_gets_it_from_its_model_json(tmp_path):
    from pneumo.deploy.modelcard import complete_version

    model = export_model(_broken_run(tmp_path / "run").path, tmp_path / "models", "m", "s")
    (model / "model.md").unlink()  # as exported before model.md existed
    before = (model / "model.json").read_bytes()
    assert complete_version(model) == ["model.md"]  # no model.onnx: the checkpoint does not load
    assert (model / "model.json").read_bytes() == before
    text = (model / "model.md").read_text()
    assert "could not be loaded" in text and str(tmp_path) not in text
    assert "exported from run `run` of sweep `s`" in text


@pytest.mark.slow
def test_export_writes_a_truthful_card_with_subgroups_and_onnx(tiny_run, synth_dir, tmp_path):
    import onnx

    from pneumo.deploy.predict import predict_folder

    outputs = tmp_path / "outputs"  # the card's paths are relative to it; the run and data are outside
    model = export_model(tiny_run, outputs / "models", "tiny", "s", extras=partial(write_extras, outputs=outputs))
    assert sorted(p.name for p in model.iterdir()) == ["model.ckpt", "model.json", "model.md", "model.onnx"]
    assert [p.name for p in model.parent.iterdir()] == ["v1"]  # no staging left behind
    card = json.loads((model / "model.json").read_text())
    metrics = RunDir(tiny_run).metrics()
    data = card["training_data"]
    overall = card["subgroups"]["overall"]
    assert overall["n_images"] == metrics["n_val"] == data["n_val"] and data["n_train"] == metrics["n_train"]
    assert sum(data["train_classes"].values()) == metrics["n_train"]
    assert sum(data["val_classes"].values()) == metrics["n_val"]
    assert data["synthetic"] is True and data["source"] == synth_dir.name
    assert data["fingerprint"] == metrics["data_fingerprint"] and data["root"] == f"data/{data['fingerprint']}"
    assert card["source_run"] == tiny_run.name and card["parent_run"]["run"] == tiny_run.name
    assert card["parent_run"]["best_epoch"] == metrics["best_epoch"]
    assert card["parent_run"]["best_val_map"] == metrics["best_val_map"]
    assert {"pneumo", "torch", "lightning", "timm"} <= set(card["packages"])
    for attribute in ("PatientSex", "age", "ViewPosition"):
        assert sum(g["n_images"] for g in card["subgroups"]["by"][attribute].values()) == metrics["n_val"]
    text = (model / "model.md").read_text()
    for needle in ("Intended use", "Not for", metrics["data_fingerprint"], "class balance (train)",
                   "| image_size | 64 |", "| PatientSex |", "| ViewPosition |", "| age |",
                   "trained on synthetic images", "real chest X-rays", "Not scored yet"):
        assert needle in text, needle
    # the validation split holds a handful of images: every subgroup shows its count, no score, and why
    assert all(g["map"] is None and g["reason"] for groups in card["subgroups"]["by"].values() for g in groups.values())
    for name in ("model.json", "model.md"):
        for path in (tmp_path, synth_dir, tiny_run.parent):
            assert str(path) not in (model / name).read_text(), (name, path)
    meta = {p.key: p.value for p in onnx.load(model / "model.onnx").metadata_props}
    assert meta["pneumo.model"] == "tiny"  # not the staging path it was exported from
    assert resolve_model(model.parent)[0] == model / "model.ckpt"

    # the test score: predict on the held-out set with labels, then onto the card
    images, out = synth_dir / "stage_2_test_images", tmp_path / "pred"
    summary = predict_folder(model, images, out, labels=synth_dir / "stage_2_test_labels.csv", workers=0,
                             images="none")
    record_test_score(model, json.loads((out / "score.json").read_text()), images)
    card = json.loads((model / "model.json").read_text())
    assert card["test"]["map"] == summary["map"] and card["test"]["images"] == images.name
    assert card["test"]["n_images"] == card["test"]["subgroups"]["overall"]["n_images"] == summary["n_predicted"]
    assert card["test"]["n_scored"] == summary["n_scored"]
    text = (model / "model.md").read_text()
    assert "## Metrics (test set)" in text and f"on {summary['n_predicted']} labelled images of `{images.name}`" in text


@pytest.mark.slow
def test_a_version_exported_without_them_gets_card_and_onnx_added(tiny_run, tmp_path):
    from pneumo.deploy.modelcard import complete_version

    model = export_model(tiny_run, tmp_path / "models", "tiny", "s")
    (model / "model.md").unlink()  # as before model.md existed
    before = (model / "model.json").read_bytes()
    assert complete_version(model) == ["model.md", "model.onnx"]
    assert (model / "model.json").read_bytes() == before  # nothing that was there is rewritten
    assert "| PatientSex |" in (model / "model.md").read_text()
    assert complete_version(model) == [] and sorted(p.name for p in model.iterdir()) == \
        ["model.ckpt", "model.json", "model.md", "model.onnx"]
