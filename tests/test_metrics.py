import json
import subprocess
import sys

import numpy as np
import pytest

from pneumo.data.submission import score_files
from pneumo.metrics import THRESHOLDS, image_precisions, mean_average_precision


def test_thresholds_are_the_official_ones():
    assert THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def test_iou_exactly_at_a_threshold_is_a_miss():
    # IoU is exactly 0.5: a hit at 0.40 and 0.45, a miss at 0.50 (strictly greater) and above.
    p = image_precisions([[0, 0, 10, 10]], [[0, 0, 10, 5]], [0.9])
    assert np.allclose(p, [1, 1, 0, 0, 0, 0, 0, 0])
    assert p.mean() == pytest.approx(0.25)


def test_iou_just_above_threshold_is_a_hit():
    # 0.75 < IoU = 76/100: a hit at every threshold
    assert image_precisions([[0, 0, 10, 10]], [[0, 0, 10, 7.6]], [0.5]).mean() == pytest.approx(1.0)


def test_one_to_one_matching_counts_duplicates_as_false_positives():
    p = image_precisions([[0, 0, 10, 10]], [[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8])
    assert np.allclose(p, 0.5)  # TP 1, FP 1, FN 0


def test_confidence_order_decides_which_prediction_matches():
    gt = [[0, 0, 10, 10], [100, 100, 10, 10]]
    # The confident prediction takes the first box; the weaker duplicate is a false positive.
    preds = [[0, 0, 10, 9], [0, 0, 10, 10]]
    p = image_precisions(gt, preds, [0.9, 0.1])
    assert np.allclose(p, 1 / 3)  # per threshold: TP 1, FP 1, FN 1


def test_greedy_matching_takes_best_iou_among_unmatched():
    gt = [[0, 0, 10, 10], [0, 0, 10, 6]]
    # first prediction overlaps both; it takes the higher IoU (gt 0), the second gets gt 1
    p = image_precisions(gt, [[0, 0, 10, 9], [0, 0, 10, 6]], [0.9, 0.8])
    assert np.allclose(p, 1.0)


def test_special_cases():
    assert image_precisions([], [], []) is None
    assert np.allclose(image_precisions([], [[0, 0, 5, 5]], [0.5]), 0)
    assert np.allclose(image_precisions([[0, 0, 5, 5]], [], []), 0)
    score = mean_average_precision(
        {"neg": np.zeros((0, 4)), "pos": np.array([[0, 0, 10, 10]])},
        {"pos": (np.array([[0, 0, 10, 10]]), np.array([1.0]))},
    )
    assert score.n_images == 1 and score.map == 1.0  # the empty negative is skipped
    score = mean_average_precision({"neg": np.zeros((0, 4))}, {"neg": (np.array([[0, 0, 1, 1]]), np.array([0.3]))})
    assert score.n_images == 1 and score.map == 0.0


def _mask_reference(gt, preds, conf, size=64):
    """A slow, obvious implementation with pixel masks, to cross-check the vectorized one."""
    def mask(b):
        m = np.zeros((size, size), bool)
        x, y, w, h = (int(v) for v in b)
        m[y:y + h, x:x + w] = True
        return m

    if not len(gt) and not len(preds):
        return None
    scores = []
    order = sorted(range(len(preds)), key=lambda i: -conf[i])
    for t in THRESHOLDS:
        used, tp = set(), 0
        for i in order:
            best, best_j = -1, None
            for j, g in enumerate(gt):
                if j in used:
                    continue
                a, b = mask(preds[i]), mask(g)
                iou = (a & b).sum() / (a | b).sum()
                if iou > best:
                    best, best_j = iou, j
            if best_j is not None and best > t:
                used.add(best_j)
                tp += 1
        scores.append(tp / (tp + (len(preds) - tp) + (len(gt) - tp)))
    return np.mean(scores)


def test_matches_mask_reference_on_random_images():
    rng = np.random.default_rng(0)
    for _ in range(150):
        n_gt, n_pred = rng.integers(0, 4), rng.integers(0, 4)
        gt = [(*rng.integers(0, 30, 2), *rng.integers(4, 30, 2)) for _ in range(n_gt)]
        preds = [(*rng.integers(0, 30, 2), *rng.integers(4, 30, 2)) for _ in range(n_pred)]
        conf = list(rng.permutation(n_pred) / 10 + 0.05)
        ref = _mask_reference(gt, preds, conf)
        got = image_precisions(gt, preds, conf)
        if ref is None:
            assert got is None
        else:
            assert got.mean() == pytest.approx(ref)


@pytest.fixture
def labels_csv(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("patientId,x,y,width,height,Target\na,0.0,0.0,10.0,10.0,1\nb,,,,,0\nc,5,5,10,10,1\n")
    return path


def test_score_files_and_cli_json(tmp_path, labels_csv):
    sub = tmp_path / "sub.csv"
    sub.write_text("patientId,PredictionString\na,0.9 0 0 10 10\nb,\nc,0.5 5 5 10 5\n")
    score = score_files(sub, labels_csv)
    assert score.n_images == 2
    assert score.map == pytest.approx((1.0 + 0.25) / 2)
    out = subprocess.run([sys.executable, "-m", "pneumo", "score", str(sub), str(labels_csv), "--json"],
                         capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    assert doc["map"] == pytest.approx(0.625) and doc["n_images"] == 2
    assert set(doc["per_threshold"]) == {f"{t:.2f}" for t in THRESHOLDS}


def test_malformed_submission_names_the_patient(tmp_path, labels_csv):
    sub = tmp_path / "sub.csv"
    sub.write_text("patientId,PredictionString\na,0.9 0 0 10\n")
    out = subprocess.run([sys.executable, "-m", "pneumo", "score", str(sub), str(labels_csv)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "patientId a" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_batched_dataset_score_equals_per_image_scores():
    rng = np.random.default_rng(1)
    gt, preds, per_image = {}, {}, []
    for i in range(400):
        n_gt, n_pred = rng.integers(0, 4), rng.integers(0, 4)
        g = np.array([(*rng.integers(0, 40, 2), *rng.integers(4, 40, 2)) for _ in range(n_gt)], float).reshape(-1, 4)
        p = np.array([(*rng.integers(0, 40, 2), *rng.integers(4, 40, 2)) for _ in range(n_pred)], float).reshape(-1, 4)
        c = rng.permutation(n_pred) / 10 + 0.05
        gt[f"p{i}"], preds[f"p{i}"] = g, (p, c)
        prec = image_precisions(g, p, c)
        if prec is not None:
            per_image.append(prec.mean())
    score = mean_average_precision(gt, preds)
    assert score.n_images == len(per_image)
    assert score.map == pytest.approx(np.mean(per_image), abs=1e-12)
    assert sorted(score.per_image.values()) == pytest.approx(sorted(per_image))


def test_non_numeric_label_cell_is_one_line_naming_line_and_column(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\na,0,0,10,10,1\nb,,,,,0\nc,5,five,10,10,1\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("patientId,PredictionString\na,0.9 0 0 10 10\n")
    out = subprocess.run([sys.executable, "-m", "pneumo", "score", str(sub), str(labels)],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "line 4, column y: 'five' is not a number" in out.stderr


def test_labels_without_target_column_still_score(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("patientId,x,y,width,height\na,0,0,10,10\nb,,,,\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("patientId,PredictionString\na,0.9 0 0 10 10\nb,\n")
    assert score_files(sub, labels).map == 1.0
