import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from pneumo.boxes import parse_prediction_string
from pneumo.deploy.predict import annotated_image, load_predictor, model_outputs, predict_folder
from pneumo.deploy.registry import resolve_model
from pneumo.errors import ModelError

# every test here predicts with tiny_run, a model trained for the session (conftest.py)
pytestmark = pytest.mark.slow


@pytest.fixture
def mixed_dir(synth_dir, tmp_path):
    """Good test DICOMs plus corrupt, non-DICOM, empty and pixel-less files."""
    d = tmp_path / "mixed"
    shutil.copytree(synth_dir / "stage_2_test_images", d)
    good = sorted(d.glob("*.dcm"))
    (d / "notes.txt").write_text("not an image")
    (d / "empty.dcm").write_bytes(b"")
    (d / "truncated.dcm").write_bytes(good[0].read_bytes()[:300])
    ds = pydicom.dcmread(good[1])
    del ds.PixelData
    ds.save_as(d / "nopixels.dcm")
    shutil.copy(good[2], d / "abc\n.dcm")  # a new line in the name would be two submission rows
    (d / "sub").mkdir()  # entries predict does not read are listed, not passed over
    os.mkfifo(d / "pipe")
    (d / "loop").symlink_to(d / "loop")
    return d


def test_every_input_is_accounted_for(tiny_run, mixed_dir, tmp_path, synth_dir):
    out = tmp_path / "pred"
    summary = predict_folder(tiny_run, mixed_dir, out, labels=synth_dir / "stage_2_test_labels.csv", workers=0)
    sub = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    errors = pd.read_csv(out / "errors.csv")
    assert list(sub.columns) == ["patientId", "PredictionString"]
    inputs = {p.name for p in mixed_dir.iterdir()} - {"abc\n.dcm"}  # reported under its escaped name
    accounted = {f"{p}.dcm" for p in sub["patientId"]} | {p.split("/")[-1] for p in errors["path"]}
    assert accounted - {"abc\n.dcm"} == inputs and len(sub) + len(errors) == len(inputs) + 1
    assert set(errors["path"].str.split("/").str[-1]) == {"notes.txt", "empty.dcm", "truncated.dcm", "nopixels.dcm",
                                                         "abc\n.dcm", "sub", "pipe", "loop"}
    assert "no pixel data" in errors.set_index(errors["path"].str.split("/").str[-1]).loc["nopixels.dcm", "reason"]
    for text in sub["PredictionString"]:
        parse_prediction_string(text)  # Kaggle format, or empty
    annotations = json.loads((out / "annotations.json").read_text())
    assert set(annotations["images"]) == set(sub["patientId"])
    assert all(a["image_size"] == [256, 256] for a in annotations["images"].values())
    pictures = [annotated_image(out, pid) for pid in sub["patientId"]]  # previews by default: half size JPEG
    assert len(list((out / "images").iterdir())) == len(sub) and all(p.suffix == ".jpg" for p in pictures)
    assert Image.open(pictures[0]).format == "JPEG"
    width, height = Image.open(pictures[0]).size
    assert width == 128 and height > 128  # the band above holds the patientId and the legend
    assert "map" in summary and json.loads((out / "score.json").read_text())["map"] == summary["map"]


def test_rerun_skips_what_is_done(tiny_run, synth_dir, tmp_path):
    out = tmp_path / "pred"
    predict_folder(tiny_run, synth_dir / "stage_2_test_images", out, workers=0)
    first = (out / "submission.csv").read_text()
    victim = sorted((out / ".parts").glob("*.json"))[0]
    victim.unlink()  # as if the run had been killed before this image
    stamps = {p: p.stat().st_mtime_ns for p in (out / ".parts").glob("*.json")}
    summary = predict_folder(tiny_run, synth_dir / "stage_2_test_images", out, workers=0)
    assert (out / "submission.csv").read_text() == first
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # done images were not redone
    assert summary["n_predicted"] == 8


def test_threshold_override_and_tta(tiny_run, synth_dir, tmp_path):
    strict = predict_folder(tiny_run, synth_dir / "stage_2_test_images", tmp_path / "a", threshold=0.999,
                            workers=0, images="none")
    assert strict["n_with_boxes"] == 0
    predictor = load_predictor(tiny_run)
    batch = np.random.default_rng(0).integers(0, 255, (2, 64, 64), dtype=np.uint8)
    probs, opacity = predictor.outputs(batch, [{"ViewPosition": "AP"}, {}], tta=True)
    assert len(probs) == 2 and probs[0].shape == (64, 64) and opacity.shape == (2,) and \
        ((opacity > 0) & (opacity < 1)).all()


def test_model_outputs_are_what_predict_post_processes(tiny_run, mixed_dir, tmp_path):
    """The outputs a benchmark tunes on give predict's own boxes under the model's settings; files
    that do not decode are left out."""
    from pneumo.models.postprocess import PostProcess

    # settings that leave a two-epoch model's boxes on the images (no gate, no area limit)
    predictor = dataclasses.replace(load_predictor(tiny_run), settings=PostProcess(threshold=0.2, min_box_area=0))
    out = tmp_path / "pred"
    predict_folder(predictor, mixed_dir, out, workers=0, images="none")
    predicted = json.loads((out / "annotations.json").read_text())["images"]
    outputs = model_outputs(predictor, mixed_dir, workers=0)
    assert set(outputs) == set(predicted)
    assert any(a["boxes"] for a in predicted.values())  # the comparison below compares boxes
    for pid, (output, frame, opacity) in outputs.items():
        assert list(frame) == predicted[pid]["image_size"] and 0 < opacity < 1
        boxes, conf = predictor.boxes(output, *frame, opacity)
        written = [[b["x"], b["y"], b["width"], b["height"], b["confidence"]] for b in predicted[pid]["boxes"]]
        expected = [[*box, c] for box, c in zip(boxes.tolist(), conf.tolist())]
        assert np.allclose(written, expected, atol=1e-3) and len(written) == len(expected)


def test_model_paths(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    assert resolve_model(tiny_run)[0] == ckpt
    assert resolve_model(ckpt)[0] == ckpt
    family = tmp_path / "models" / "m"
    for v in ("v1", "v2", "v10"):
        (family / v).mkdir(parents=True)
        shutil.copy(ckpt, family / v / "model.ckpt")
        (family / v / "model.json").write_text(json.dumps({"name": "m", "version": v}))
    path, card = resolve_model(family)
    assert path == family / "v10" / "model.ckpt" and card["version"] == "v10"
    assert load_predictor(family).name == "m/v10"
    with pytest.raises(ModelError, match="no such model"):
        resolve_model(tmp_path / "nothing")
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a pneumo checkpoint"):
        load_predictor(bogus)


def test_cli_summary_and_missing_dir(tiny_run, synth_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "pneumo", "predict", str(tiny_run),
                          str(synth_dir / "stage_2_test_images"),
                          "--out", str(tmp_path / "p"), "--labels", str(synth_dir / "stage_2_test_labels.csv")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "8 predicted" in out.stdout and "0 errors" in out.stdout and "mAP" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pneumo", "predict", str(tiny_run), str(tmp_path / "none"),
                          "--out", str(tmp_path / "q")], capture_output=True, text=True)
    assert out.returncode == 1 and "images directory does not exist" in out.stderr and "Traceback" not in out.stderr


def test_a_longest_legal_file_name_is_reported_and_the_rest_predicted(tiny_run, synth_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synth_dir / "stage_2_test_images", images)
    long_name = images / ("a" * 250 + ".dcm")  # 254 characters: legal, but no room for a suffix
    shutil.copy(next(images.glob("*.dcm")), long_name)
    summary = predict_folder(tiny_run, images, tmp_path / "out", workers=0, images="none")
    assert summary["n_predicted"] == 8 and summary["n_errors"] == 1
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert errors["path"].tolist() == [str(long_name)] and "invalid patientId" in errors["reason"][0]


def test_one_patient_under_two_names_is_one_row_across_reruns(tiny_run, synth_dir, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(synth_dir / "stage_2_test_images", images)
    predict_folder(tiny_run, images, out, workers=0, images="none")
    first = sorted(images.glob("*.dcm"))[0]
    shutil.copy(first, images / first.stem)  # the same image again, without the suffix
    summary = predict_folder(tiny_run, images, out, workers=0, images="none")
    sub = pd.read_csv(out / "submission.csv")
    assert len(sub) == 8 and sub["patientId"].is_unique
    errors = pd.read_csv(out / "errors.csv")
    assert summary["n_errors"] == 1 and "duplicate patientId" in errors["reason"][0]


def test_careless_predict_arguments_are_one_line_each(tiny_run, synth_dir, tmp_path):
    import torch

    images = synth_dir / "stage_2_test_images"

    def predict(*args):
        out = subprocess.run([sys.executable, "-m", "pneumo", "predict", *map(str, args)],
                             capture_output=True, text=True)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-3000:]
        return lines[0]

    (tmp_path / "a-file").write_text("keep")
    assert "is a file" in predict(tiny_run, images, "--out", tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "keep"
    assert "is a directory" in predict(tiny_run, images, "--out", tmp_path / "p", "--labels", images)
    assert "between 0 and 1" in predict(tiny_run, images, "--out", tmp_path / "p", "--threshold", "7")
    ckpt = torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["config"]["width"] *= 2  # weights that do not fit the config they carry
    torch.save(ckpt, tmp_path / "mismatch.ckpt")
    assert "do not fit its config" in predict(tmp_path / "mismatch.ckpt", images, "--out", tmp_path / "p")


def test_a_png_that_cannot_be_written_stops_the_run_and_leaves_its_image_to_redo(tiny_run, synth_dir, tmp_path):
    # PNGs are written on a thread beside inference: its failure must still surface, and the
    # image whose PNG is missing must not count as done
    out = tmp_path / "pred"
    images = synth_dir / "stage_2_test_images"
    victim = sorted(images.glob("*.dcm"))[3].stem
    (out / "images" / f"{victim}.png").mkdir(parents=True)  # a directory where the PNG goes
    with pytest.raises(OSError):
        predict_folder(tiny_run, images, out, workers=0, batch_size=2, images="full")
    done = {json.loads(p.read_text())["patientId"] for p in (out / ".parts").glob("*.json")}
    assert victim not in done and len(done) == 7  # every other image finished
    (out / "images" / f"{victim}.png").rmdir()
    stamps = {p: p.stat().st_mtime_ns for p in (out / ".parts").glob("*.json")}
    summary = predict_folder(tiny_run, images, out, workers=0, images="full")
    assert summary["n_predicted"] == 8 and (out / "images" / f"{victim}.png").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # only the victim was redone


def test_a_small_file_describing_a_huge_network_fails_before_allocating(tmp_path):
    """A 1 KB checkpoint whose config says width 192, depth 6 (a 23 GB build, once) is refused from
    the shapes alone: the network is first built on the meta device."""
    import resource

    import torch

    from pneumo.config import TrainConfig

    path = tmp_path / "huge.ckpt"
    torch.save({"hyper_parameters": {"config": TrainConfig(width=192, depth=6, image_size=128).to_dict()},
                "state_dict": {"net.encoder.inc.0.weight": torch.zeros(1)}}, path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelError, match="weights that do not fit the config's network: .* tensors missing"):
        load_predictor(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KB: nothing near the network


def _parts_times(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / ".parts").glob("*.json")}


def test_a_rerun_redoes_what_changed_under_the_same_names(tiny_run, synth_dir, tmp_path):
    """Finished work is keyed by content: the model's bytes, the input's size and mtime, and how
    its image is drawn. What changed is redone; what did not is kept."""
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(synth_dir / "stage_2_test_images", images)
    model = tmp_path / "model.ckpt"
    shutil.copy(tiny_run / "checkpoints" / "best.ckpt", model)
    predict_folder(model, images, out, workers=0, images="none")
    assert not list((out / "images").glob("*")) if (out / "images").exists() else True
    first = _parts_times(out)
    settings = (out / ".parts" / "settings.key").stat().st_mtime_ns

    # images asked for now: every image is drawn (the boxes' parts are redone with them)
    predict_folder(model, images, out, workers=0)
    assert len(list((out / "images").glob("*.jpg"))) == 8
    assert (out / ".parts" / "settings.key").stat().st_mtime_ns == settings  # same model: not rewritten
    drawn = _parts_times(out)
    assert all(drawn[k] != first[k] for k in first)

    # one DICOM replaced under its name (another patient's pixels): that one alone is redone
    victims = sorted(images.glob("*.dcm"))
    shutil.copy(victims[1], victims[0])
    os.utime(victims[0], ns=(1, 1))
    predict_folder(model, images, out, workers=0)
    again = _parts_times(out)
    assert sum(again[k] != drawn[k] for k in drawn) == 1

    # labels given later: the truth must be drawn, so the images are redone
    predict_folder(model, images, out, workers=0, labels=synth_dir / "stage_2_test_labels.csv")
    with_truth = _parts_times(out)
    assert all(with_truth[k] != again[k] for k in again)

    # a part damaged by a crash is redone, not fatal
    damaged = sorted((out / ".parts").glob("*.json"))[2]
    damaged.write_text('{"path": ')
    predict_folder(model, images, out, workers=0, labels=synth_dir / "stage_2_test_labels.csv")
    assert json.loads(damaged.read_text())["boxes"] is not None

    # another model copied over the same path: everything is redone
    ckpt = __import__("torch").load(model, map_location="cpu", weights_only=True)
    ckpt["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    __import__("torch").save(ckpt, model)
    before = _parts_times(out)
    predict_folder(model, images, out, workers=0, images="none")
    after = _parts_times(out)
    assert all(after[k] != before[k] for k in before)


def test_temporaries_of_a_killed_image_write_are_cleared(tiny_run, synth_dir, tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    stale = out / "images" / ".abc.jpg.x1y2.tmp"
    stale.write_bytes(b"half an image")
    mine = out / "images" / "notes.txt"  # not pneumo's: left alone
    mine.write_text("keep")
    predict_folder(tiny_run, synth_dir / "stage_2_test_images", out, workers=0)
    assert not stale.exists() and mine.read_text() == "keep"


def test_full_size_images_on_request(tiny_run, synth_dir, tmp_path):
    out = tmp_path / "out"
    predict_folder(tiny_run, synth_dir / "stage_2_test_images", out, workers=0, images="full")
    pictures = sorted((out / "images").iterdir())
    assert len(pictures) == 8 and all(p.suffix == ".png" for p in pictures)
    assert Image.open(pictures[0]).width == 256
