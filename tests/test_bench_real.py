"""benchmarks/real.py: the patient splits (fast, synthetic data) and one end-to-end run (slow)."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_real():
    spec = importlib.util.spec_from_file_location("bench_real", ROOT / "benchmarks" / "real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


real = _load_real()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pneumo.data.synth import make_dataset

    root = tmp_path_factory.mktemp("real-bench-data")
    make_dataset(root, n_train=60, n_test=0, seed=1, size=128, workers=1)
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _pids(part: Path) -> set[str]:
    return {p.stem for p in (part / real.IMAGES).iterdir()}


def test_split_partitions_patients_stratified(data, tmp_path):
    classes = real.read_patients(data)
    assert len(classes) == 60
    split = real.make_split(data, tmp_path / "splits", 0, test_fraction=0.25)
    dev, test = _pids(split / "dev"), _pids(split / "test")
    assert not dev & test
    assert dev | test == set(classes)
    assert abs(len(test) / 60 - 0.25) < 0.05
    # stratified: each class is split in (about) the same proportion
    by_class = Counter(classes.values())
    test_by_class = Counter(classes[p] for p in test)
    for klass, n in by_class.items():
        assert test_by_class[klass] == min(max(round(n * 0.25), 1), n - 1)
    # images are links to the originals
    link = next((split / "test" / real.IMAGES).iterdir())
    assert link.is_symlink() and link.resolve() == (data / real.IMAGES / link.name).resolve()


@pytest.mark.parametrize("name", ["stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"])
def test_split_csvs_keep_header_and_row_order(data, tmp_path, name):
    split = real.make_split(data, tmp_path / "splits", 1)
    source = _lines(data / name)
    parts = {}
    for part in ("dev", "test"):
        lines = _lines(split / part / name)
        assert lines[0] == source[0]
        pids = _pids(split / part)
        assert lines[1:] == [line for line in source[1:] if line.split(",")[0] in pids]  # same rows, same order
        parts[part] = lines[1:]
    assert sorted(parts["dev"] + parts["test"]) == sorted(source[1:])


def test_split_is_deterministic_per_seed_and_differs_across_seeds(data, tmp_path):
    a = real.make_split(data, tmp_path / "a", 0)
    b = real.make_split(data, tmp_path / "b", 0)
    c = real.make_split(data, tmp_path / "a", 1)
    assert _pids(a / "test") == _pids(b / "test")
    assert _pids(a / "test") != _pids(c / "test")
    assert a.parent == c.parent  # one fingerprint for the data and the test fraction
    assert real.make_split(data, tmp_path / "a", 0, test_fraction=0.3).parent != a.parent


def test_split_is_reused_and_written_atomically(data, tmp_path):
    split = real.make_split(data, tmp_path, 2)
    stamp = (split / "split.json").stat().st_mtime_ns
    assert real.make_split(data, tmp_path, 2) == split
    assert (split / "split.json").stat().st_mtime_ns == stamp
    assert [p.name for p in split.parent.iterdir()] == ["split2"]  # no temporary directory left
    info = json.loads((split / "split.json").read_text())
    assert info["n_dev"] + info["n_test"] == 60


def test_the_fingerprint_follows_the_data_not_its_timestamps(data, tmp_path):
    import os
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data, copy)  # new modification times on every file
    image = sorted((copy / real.IMAGES).iterdir())[0]
    os.utime(image, ns=(1, 1))
    assert real.data_fingerprint(copy, 0.25) == real.data_fingerprint(data, 0.25)
    assert real.data_fingerprint(copy, 0.3) != real.data_fingerprint(data, 0.25)
    header = bytearray(image.read_bytes())
    header[200] ^= 0xFF  # another image of the same size
    image.write_bytes(bytes(header))
    assert real.data_fingerprint(copy, 0.25) != real.data_fingerprint(data, 0.25)


def test_missing_default_data_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(real, "DEFAULT_DATA", tmp_path / "nowhere")
    assert real.main(["--out", str(tmp_path / "out")]) == 2
    assert "--data-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_main_end_to_end(data, tmp_path, capsys):
    profile = tmp_path / "tiny.yaml"
    profile.write_text("image_size: 64\nepochs: 1\nwidth: 4\ndepth: 3\nbatch_size: 8\nn_val_images: 1\n")
    out = tmp_path / "bench"
    args = ["--data-dir", str(data), "--profile", str(profile), "--splits", "2", "--out", str(out)]
    assert real.main([*args, "--label", "a"]) == 0
    assert "at least 3" in capsys.readouterr().err
    assert real.main([*args, "--label", "b", "-p", "lr=0.002"]) == 0
    report = json.loads((out / "real.json").read_text())
    assert [e["label"] for e in report["entries"]] == ["a", "b"]
    entry = report["entries"][0]
    assert len(entry["per_split"]) == 2 and entry["cores"] >= 1
    for s in entry["per_split"]:
        assert 0 <= s["test_map"] <= 1
        assert s["n_dev"] + s["n_test"] == 60
        assert s["fp_images"] <= s["n_test_negative"] and s["tp_images"] <= s["n_test_positive"]
        assert s["n_test_negative"] + s["n_test_positive"] == s["n_test"]
        assert s["test_map"] <= s["test_map_without_fp_images"] <= 1
        assert 0 <= s["test_map_pooled_tuning"] <= 1 and 0 <= s["test_map_tuned_on_test"] <= 1
    assert entry["config"]["image_size"] == 64
    md = (out / "real.md").read_text()
    assert "| a |" in md and "| b |" in md
    # re-running a label reuses its runs and replaces its entry
    assert real.main([*args, "--label", "a"]) == 0
    report = json.loads((out / "real.json").read_text())
    assert [e["label"] for e in report["entries"]] == ["a", "b"]
    assert "reusing" in capsys.readouterr().out


def test_score_bounds_rescore_without_false_positive_images_and_on_boxed_positives(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\nhit,100,100,200,200,1\nmissed,500,500,100,100,1\n"
                      "false-alarm,,,,,0\nquiet,,,,,0\n")
    submission = tmp_path / "submission.csv"
    submission.write_text("patientId,PredictionString\nhit,0.9 100 100 200 200\nmissed,\n"
                          "false-alarm,0.8 10 10 300 300\nquiet,\n")
    from pneumo.data.submission import score_files

    assert score_files(submission, labels).map == pytest.approx(1 / 3)  # hit 1, missed 0, false alarm 0
    bounds = real.score_bounds(submission, labels)
    assert bounds["test_map_without_fp_images"] == pytest.approx(0.5)  # the false alarm no longer counts
    assert bounds["test_map_boxed_positives"] == pytest.approx(1.0)  # the one boxed positive is exact
    submission.write_text("patientId,PredictionString\n")
    assert real.score_bounds(submission, labels) == {"test_map_without_fp_images": 0.0,
                                                     "test_map_boxed_positives": None}


def _split(pids, positive, scale=1.0):
    """Centre-head outputs of one split: a positive image gets its true box (score 0.6 * scale) and,
    like every negative, a spurious one (0.3 * scale)."""
    import numpy as np

    from pneumo.models.postprocess import Candidates

    outputs, truth = {}, {}
    for pid in pids:
        true_box = np.array([[40.0, 40.0, 40.0, 40.0]])
        spurious = np.array([[0.0, 90.0, 30.0, 30.0]])
        boxes = np.concatenate([true_box, spurious]) if pid in positive else spurious
        scores = np.array([0.6, 0.3] if pid in positive else [0.3]) * scale
        outputs[pid] = (Candidates(boxes, scores, 128), (128, 128), None)
        truth[pid] = true_box if pid in positive else np.zeros((0, 4))
    return {"outputs": outputs, "truth": truth}


def test_tuning_bounds_pool_other_splits_without_this_splits_test_images():
    from pneumo.config import TrainConfig

    config = TrainConfig(postprocess="threshold", classifier=False, min_box_area=0.0, threshold=0.5)
    names = [f"p{i}" for i in range(12)]
    positive = set(names[::3])
    splits = [_split(names[:6], positive), _split(names[3:9], positive), _split(names[6:], positive)]
    bounds = real.tuning_bounds(splits, config)
    # split 0 pools split 1 without p3-p5 (split 0's own) and all of split 2
    assert [b["pooled_tuning_images"] for b in bounds] == [3 + 6, 3 + 3, 6 + 3]
    for b in bounds:  # a threshold between the spurious and the true boxes' scores: every image right
        assert 0.3 < b["pooled_postprocess"]["threshold"] < 0.6
        assert b["test_map_pooled_tuning"] == pytest.approx(1.0)
        assert b["test_map_tuned_on_test"] == pytest.approx(1.0)
    # models whose scores run at half the height: a threshold tuned on them lets split 0's spurious
    # boxes through, where split 0's own outputs still tune to a perfect score
    splits[1:] = [_split(names[3:9], positive, 0.5), _split(names[6:], positive, 0.5)]
    bounds = real.tuning_bounds(splits, config)
    assert bounds[0]["pooled_postprocess"]["threshold"] < 0.3
    assert bounds[0]["test_map_pooled_tuning"] < 0.9
    assert bounds[0]["test_map_tuned_on_test"] == pytest.approx(1.0)
