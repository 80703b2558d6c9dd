"""Every exported version gets model.md (with subgroup metrics on the validation split) and model.onnx."""

import json
from functools import partial

import pytest

from pneumo.deploy.modelcard import write_extras
from pneumo.deploy.registry import export_model, resolve_model
from pneumo.training.rundir import RunDir


def test_a_checkpoint_that_does_not_load_still_exports_with_a_card_saying_why(tmp_path):
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    run.best_checkpoint.write_bytes(b"not a checkpoint")
    run.config_file.write_text("optimizer: adam\n")
    run.write_metrics({"status": "finished", "best_val_map": 0.30000000000000004, "data_fingerprint": "abc"})
    model = export_model(run.path, tmp_path / "models", "m", "s", extras=write_extras)
    assert sorted(p.name for p in model.iterdir()) == ["model.ckpt", "model.json", "model.md"]
    card = (model / "model.md").read_text()
    assert "could not be loaded" in card and "| optimizer | adam |" in card and "`abc`" in card
    assert "Best validation mAP 0.300 at epoch" in card  # a figure, not a float's repr
    assert json.loads((model / "model.json").read_text())["subgroups"] is None


@pytest.mark.slow
def test_export_writes_card_with_subgroups_and_onnx(tiny_run, tmp_path):
    model = export_model(tiny_run, tmp_path / "models", "tiny", "s", extras=partial(write_extras))
    assert sorted(p.name for p in model.iterdir()) == ["model.ckpt", "model.json", "model.md", "model.onnx"]
    assert [p.name for p in model.parent.iterdir()] == ["v1"]  # no staging left behind
    card = json.loads((model / "model.json").read_text())
    metrics = RunDir(tiny_run).metrics()
    overall = card["subgroups"]["overall"]
    assert overall["n_images"] == metrics["n_val"] == card["training_data"]["n_val"]
    assert sum(card["training_data"]["train_classes"].values()) == metrics["n_train"]
    for attribute in ("PatientSex", "age", "ViewPosition"):
        assert sum(g["n_images"] for g in card["subgroups"]["by"][attribute].values()) == metrics["n_val"]
    text = (model / "model.md").read_text()
    for needle in ("Intended use", "Not for", metrics["data_fingerprint"], "class balance (train)",
                   "| image_size | 64 |", "| PatientSex |", "| ViewPosition |", "| age |"):
        assert needle in text, needle
    # the validation split holds a handful of images: every subgroup shows its count and no score
    assert all(g["map"] is None for groups in card["subgroups"]["by"].values() for g in groups.values())
    assert resolve_model(model.parent)[0] == model / "model.ckpt"


@pytest.mark.slow
def test_a_version_exported_without_them_gets_card_and_onnx_added(tiny_run, tmp_path):
    from pneumo.deploy.modelcard import complete_version

    model = export_model(tiny_run, tmp_path / "models", "tiny", "s")  # as before model.md existed
    before = (model / "model.json").read_bytes()
    assert complete_version(model) == ["model.md", "model.onnx"]
    assert (model / "model.json").read_bytes() == before  # nothing that was there is rewritten
    assert "| PatientSex |" in (model / "model.md").read_text()
    assert complete_version(model) == [] and sorted(p.name for p in model.iterdir()) == \
        ["model.ckpt", "model.json", "model.md", "model.onnx"]
