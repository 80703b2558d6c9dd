import numpy as np
import pandas as pd

from pneumo.data.dicom import read_dicom
from pneumo.data.layout import CLASSES
from pneumo.data.synth import Case, _sample_case, make_dataset, render


def test_layout_and_csv_formats(synth_dir):
    assert {p.name for p in synth_dir.iterdir()} >= {
        "stage_2_train_images", "stage_2_test_images", "stage_2_train_labels.csv",
        "stage_2_detailed_class_info.csv", "stage_2_test_labels.csv", "stage_2_sample_submission.csv"}
    labels = pd.read_csv(synth_dir / "stage_2_train_labels.csv")
    assert list(labels.columns) == ["patientId", "x", "y", "width", "height", "Target"]
    info = pd.read_csv(synth_dir / "stage_2_detailed_class_info.csv")
    assert list(info.columns) == ["patientId", "class"] and set(info["class"]) <= set(CLASSES)
    # like the real file, the class table has one row per label row (repeated per box)
    assert len(info) == len(labels) and (info["patientId"].values == labels["patientId"].values).all()
    images = {p.stem for p in (synth_dir / "stage_2_train_images").glob("*.dcm")}
    assert images == set(labels["patientId"])
    negatives = labels[labels["Target"] == 0]
    assert negatives[["x", "y", "width", "height"]].isna().all().all()
    sub = pd.read_csv(synth_dir / "stage_2_sample_submission.csv")
    assert list(sub.columns) == ["patientId", "PredictionString"] and len(sub) == 8


def test_deterministic_per_seed(tmp_path):
    a = make_dataset(tmp_path / "a", n_train=6, n_test=2, seed=3, size=128, workers=1)
    b = make_dataset(tmp_path / "b", n_train=6, n_test=2, seed=3, size=128, workers=2)
    assert a["classes"] == b["classes"]
    for name in ("stage_2_train_labels.csv", "stage_2_test_labels.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    for p in (tmp_path / "a" / "stage_2_train_images").iterdir():
        assert read_dicom(p)[0].tobytes() == read_dicom(tmp_path / "b" / "stage_2_train_images" / p.name)[0].tobytes()


def test_class_mix_and_boxes_are_realistic():
    rng = np.random.default_rng(0)
    cases = [_sample_case(rng, 1024) for _ in range(3000)]
    share = {k: np.mean([c.klass == k for c in cases]) for k in CLASSES}
    assert abs(share["Lung Opacity"] - 0.22) < 0.03 and abs(share["Normal"] - 0.33) < 0.03
    positives = [c for c in cases if c.klass == "Lung Opacity"]
    assert all(1 <= len(c.boxes) <= 4 for c in positives)
    assert all(not c.boxes for c in cases if c.klass != "Lung Opacity")
    ap = lambda cs: np.mean([c.view == "AP" for c in cs])  # noqa: E731
    assert ap(positives) > ap([c for c in cases if c.klass == "Normal"]) + 0.2
    for c in positives:
        for x, y, w, h in c.boxes:
            assert 0 <= x and 0 <= y and x + w <= 1024 and y + h <= 1024 and w > 0 and h > 0


def test_opacity_lies_exactly_inside_the_boxes():
    box = (40.0, 50.0, 60.0, 80.0)
    with_box = Case("p", "Lung Opacity", "M", 40, "AP", (box,))
    without = Case("p", "Lung Opacity", "M", 40, "AP", ())
    a = render(with_box, 256, np.random.default_rng(1)).astype(int)
    b = render(without, 256, np.random.default_rng(1)).astype(int)
    inside = np.zeros_like(a, bool)
    inside[50:130, 40:100] = True
    assert (a[~inside] == b[~inside]).all()
    assert (a - b)[inside].mean() > 20  # a clearly brighter consolidation
