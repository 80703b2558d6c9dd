"""Subgroup mAP: bands and categories, small groups without a score, the same figures as the metric."""

import json

import numpy as np
import pydicom
import pytest

from pneumo.deploy.subgroups import age_band, breakdown_markdown, subgroup_scores, subgroups_of
from pneumo.metrics import mean_average_precision


def test_age_bands_and_categories():
    assert [age_band(a) for a in (0, 19.99, 20, 39.5, 40, 59.9, 60, 101)] == \
        ["<20", "<20", "20-39", "20-39", "40-59", "40-59", ">=60", ">=60"]
    assert [age_band(a) for a in (None, "abc", float("nan"), -1)] == ["unknown"] * 4
    assert subgroups_of({"PatientSex": "f", "PatientAge": "051Y" and 51, "ViewPosition": "LL"}) == \
        {"PatientSex": "F", "age": "40-59", "ViewPosition": "other"}
    assert subgroups_of({}) == {"PatientSex": "unknown", "age": "unknown", "ViewPosition": "unknown"}


def test_breakdown_matches_the_metric_on_each_subset():
    rng = np.random.default_rng(0)
    truth, preds, attributes = {}, {}, {}
    for i in range(100):
        pid = f"p{i}"
        box = np.array([[100.0, 100.0, 200.0, 200.0]])
        truth[pid] = box if i % 3 else np.zeros((0, 4))
        preds[pid] = ((box + rng.normal(0, 30, size=(1, 4)), np.array([0.8])) if i % 2
                      else (np.zeros((0, 4)), np.zeros(0)))
        attributes[pid] = {"PatientSex": "M" if i < 70 else "F", "PatientAge": 10 + i * 0.7,
                           "ViewPosition": "PA" if i % 4 else "AP"}
    result = subgroup_scores(truth, preds, attributes, min_images=25)
    assert result["overall"]["map"] == pytest.approx(mean_average_precision(truth, preds).map, abs=1e-4)
    assert result["overall"]["n_images"] == 100 and result["overall"]["n_positive"] == 66
    men = [p for p in truth if attributes[p]["PatientSex"] == "M"]
    expected = mean_average_precision({p: truth[p] for p in men}, preds).map
    assert result["by"]["PatientSex"]["M"]["map"] == pytest.approx(expected, abs=1e-4)
    assert result["by"]["PatientSex"]["M"]["n_images"] == 70
    assert result["by"]["PatientSex"]["F"]["n_images"] == 30 and result["by"]["PatientSex"]["F"]["map"] is not None
    young = result["by"]["age"]["<20"]  # ages 10 .. 19.8: 15 images, too few for a score
    assert young["n_images"] == 15 and young["map"] is None
    assert sum(g["n_images"] for g in result["by"]["age"].values()) == 100
    table = breakdown_markdown(result)
    assert "| age | <20 | 15 |" in table and "—" in table


@pytest.mark.slow
def test_predict_labels_writes_the_breakdown(tiny_run, synth_dir, tmp_path):
    from pneumo.data.layout import read_labels
    from pneumo.data.submission import read_submission
    from pneumo.deploy.predict import predict_folder

    images = synth_dir / "stage_2_test_images"
    labels = synth_dir / "stage_2_test_labels.csv"
    out = tmp_path / "pred"
    predict_folder(tiny_run, images, out, labels=labels, workers=0, save_images=False)
    score = json.loads((out / "score.json").read_text())
    attributes = {p.stem: {k: pydicom.dcmread(p).get(k) for k in ("PatientSex", "PatientAge", "ViewPosition")}
                  for p in images.glob("*.dcm")}
    expected = subgroup_scores(read_labels(labels), read_submission(out / "submission.csv"), attributes)
    assert score["subgroups"] == json.loads(json.dumps(expected))
    assert score["subgroups"]["overall"]["n_images"] == len(attributes)
