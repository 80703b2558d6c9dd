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
    result = subgroup_scores(truth, preds, attributes, min_images=25, min_positives=15)
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


def test_a_group_of_few_positive_images_gets_its_counts_and_no_score():
    """Two positive PA images scored 0.917 on a model card: a group needs MIN_POSITIVES of them."""
    from pneumo.deploy.subgroups import MIN_POSITIVES

    box = np.array([[100.0, 100.0, 200.0, 200.0]])
    truth, preds, attributes = {}, {}, {}
    for i in range(100):
        pid, view = f"p{i}", "PA" if i < 40 else "AP"
        positive = i < 2 or i >= 40  # PA: 40 images, 2 with opacity; AP: 60, all with opacity
        truth[pid] = box if positive else np.zeros((0, 4))
        preds[pid] = (box, np.array([0.9])) if positive else (np.zeros((0, 4)), np.zeros(0))
        attributes[pid] = {"PatientSex": "M", "PatientAge": 50, "ViewPosition": view}
    result = subgroup_scores(truth, preds, attributes)
    assert MIN_POSITIVES == 30 and result["min_positives"] == 30
    pa, ap = result["by"]["ViewPosition"]["PA"], result["by"]["ViewPosition"]["AP"]
    assert (pa["n_images"], pa["n_positive"], pa["map"]) == (40, 2, None)
    assert pa["reason"] == "fewer than 30 images with opacity"
    assert ap["map"] == 1.0 and "reason" not in ap
    assert result["overall"]["map"] is not None  # the whole set is always scored
    assert "| ViewPosition | PA | 40 | 2 | — |" in breakdown_markdown(result)
    assert "fewer than 30 with opacity" in breakdown_markdown(result)
    assert subgroup_scores(truth, preds, attributes, min_positives=2)["by"]["ViewPosition"]["PA"]["map"] == 1.0


@pytest.mark.slow
def test_predict_labels_writes_the_breakdown(tiny_run, synth_dir, tmp_path):
    from pneumo.data.layout import read_labels
    from pneumo.data.submission import read_submission
    from pneumo.deploy.predict import predict_folder

    images = synth_dir / "stage_2_test_images"
    labels = synth_dir / "stage_2_test_labels.csv"
    out = tmp_path / "pred"
    predict_folder(tiny_run, images, out, labels=labels, workers=0, images="none")
    score = json.loads((out / "score.json").read_text())
    attributes = {p.stem: {k: pydicom.dcmread(p).get(k) for k in ("PatientSex", "PatientAge", "ViewPosition")}
                  for p in images.glob("*.dcm")}
    expected = subgroup_scores(read_labels(labels), read_submission(out / "submission.csv"), attributes)
    assert score["subgroups"] == json.loads(json.dumps(expected))
    assert score["subgroups"]["overall"]["n_images"] == len(attributes)
