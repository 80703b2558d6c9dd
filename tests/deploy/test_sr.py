"""DICOM SR and GSPS of the boxes, read back with highdicom and pydicom and checked with dciodvfy."""

import csv
import dataclasses
import json
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pneumo.deploy.sr import Finding, measurement_report, presentation_state, read_source, to_bytes

BOXES = np.array([[10.5, 20.0, 50.25, 60.0], [100.0, 120.0, 30.0, 40.0]])
CONFIDENCES = np.array([0.91, 0.47])


@pytest.fixture(scope="module")
def source_path(synth_dir):
    return sorted((synth_dir / "stage_2_test_images").glob("*.dcm"))[0]


def _write(tmp_path, name, dataset):
    path = tmp_path / name
    path.write_bytes(to_bytes(dataset))
    return path


def read_report(path):
    """(boxes, confidences, image-level evaluation, SOP Instance UIDs its groups reference, the SR)."""
    report = hd.sr.srread(path)
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport)
    boxes, confidences, references = [], [], set()
    for group in content.get_planar_roi_measurement_groups():
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = group.roi.value
        assert np.array_equal(points[0], points[-1])  # closed
        (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
        boxes.append([x0, y0, x1 - x0, y1 - y0])
        assert group.finding_type.meaning == "Opacity"
        confidences += [m.value for m in group.get_measurements()]
        references.add(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    (image_group,) = content.get_image_measurement_groups()
    (evaluation,) = image_group.get_qualitative_evaluations()
    references |= {item.referenced_sop_instance_uid for item in image_group.source_images}
    return np.array(boxes).reshape(-1, 4), np.array(confidences), evaluation.value.meaning, references, report


def test_report_holds_the_boxes_references_and_patient(source_path, tmp_path):
    source = pydicom.dcmread(source_path)
    sr, warnings = measurement_report(read_source(source_path), Finding("p", BOXES, CONFIDENCES, "m/v1"))
    assert warnings == []
    boxes, confidences, evaluation, references, report = read_report(_write(tmp_path, "sr.dcm", sr))
    np.testing.assert_allclose(boxes, BOXES, atol=0.5)
    np.testing.assert_allclose(confidences, CONFIDENCES, atol=1e-4)
    assert evaluation == "Present"
    assert references == {source.SOPInstanceUID}
    assert report.StudyInstanceUID == source.StudyInstanceUID and report.PatientID == source.PatientID
    assert report.PatientSex == source.PatientSex
    assert report.PatientAge == f"{int(source.PatientAge):03d}Y"  # RSNA's '51' made a valid AgeString
    assert report.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert report.SeriesInstanceUID != source.SeriesInstanceUID  # its own series in the image's study
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    # the same image and model give the same report (a re-run does not make a second instance)
    again, _ = measurement_report(read_source(source_path), Finding("p", BOXES, CONFIDENCES, "m/v1"))
    assert again.SOPInstanceUID == sr.SOPInstanceUID


def test_an_image_without_boxes_says_no_opacity(source_path, tmp_path):
    sr, _ = measurement_report(read_source(source_path), Finding("p", np.zeros((0, 4)), np.zeros(0), "m"))
    boxes, _, evaluation, _, _ = read_report(_write(tmp_path, "sr.dcm", sr))
    assert len(boxes) == 0 and evaluation == "Absent"


def test_missing_uids_are_generated_and_reported(source_path, tmp_path):
    source = read_source(source_path)
    for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientName"):
        delattr(source, keyword)
    sr, warnings = measurement_report(source, Finding("p", BOXES[:1], CONFIDENCES[:1], "m"))
    assert "StudyInstanceUID" not in source  # the caller's header is left as it was
    assert [w.split()[0] for w in warnings] == ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"]
    _, _, _, references, report = read_report(_write(tmp_path, "sr.dcm", sr))
    assert references == {warnings[1].split()[-1]}  # the generated UID the warning names
    assert report.StudyInstanceUID == warnings[0].split()[-1]


def test_presentation_state_draws_the_boxes(source_path, tmp_path):
    source = pydicom.dcmread(source_path)
    gsps, _ = presentation_state(read_source(source_path), Finding("p", BOXES, CONFIDENCES, "m"))
    read = pydicom.dcmread(_write(tmp_path, "pr.dcm", gsps))
    annotation = read.GraphicAnnotationSequence[0]
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    drawn = [np.array(g.GraphicData).reshape(-1, 2) for g in annotation.GraphicObjectSequence]
    boxes = [[*p.min(axis=0), *(p.max(axis=0) - p.min(axis=0))] for p in drawn]
    np.testing.assert_allclose(boxes, BOXES, atol=0.5)
    assert [t.UnformattedTextValue for t in annotation.TextObjectSequence] == ["opacity 0.91", "opacity 0.47"]
    empty, _ = presentation_state(read_source(source_path), Finding("p", np.zeros((0, 4)), np.zeros(0), "m"))
    assert "no opacity" in empty.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue


def dciodvfy_errors(path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_dciodvfy_finds_no_errors(source_path, tmp_path):
    source = read_source(source_path)
    assert dciodvfy_errors(source_path)  # the check can fail: RSNA-style PatientAge '51' is an error
    no_uids = read_source(source_path)
    del no_uids.SeriesInstanceUID, no_uids.SOPInstanceUID
    findings = [Finding("p", BOXES, CONFIDENCES, "m/v1"), Finding("p", np.zeros((0, 4)), np.zeros(0), "m/v1")]
    for i, finding in enumerate(findings):
        for make in (measurement_report, presentation_state):
            for header in (source, no_uids):
                path = _write(tmp_path, f"{make.__name__}-{i}.dcm", make(header, finding)[0])
                assert dciodvfy_errors(path) == [], (make.__name__, finding)


@pytest.mark.slow
def test_predict_writes_a_report_per_image(tiny_run, synth_dir, tmp_path):
    from pneumo.deploy.predict import load_predictor, predict_folder
    from pneumo.models.postprocess import PostProcess

    images = tmp_path / "images"
    shutil.copytree(synth_dir / "stage_2_test_images", images)
    first = sorted(images.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    del ds.StudyInstanceUID, ds.SOPInstanceUID  # some real-world files lack them
    ds.save_as(first)
    (images / "notes.txt").write_text("not an image")
    # a low threshold and no gate, so that the 2-epoch model draws boxes to compare
    predictor = dataclasses.replace(load_predictor(tiny_run), settings=PostProcess(threshold=0.05))
    out = tmp_path / "pred"
    summary = predict_folder(predictor, images, out, workers=0, dicom_sr=True, dicom_gsps=True)
    annotations = json.loads((out / "annotations.json").read_text())["images"]
    assert sum(len(a["boxes"]) for a in annotations.values()) > 0
    assert {p.stem for p in (out / "sr").glob("*.dcm")} == set(annotations) == \
        {p.stem for p in (out / "gsps").glob("*.dcm")}
    for pid, record in annotations.items():
        boxes, confidences, evaluation, _, _ = read_report(out / "sr" / f"{pid}.dcm")
        expected = np.array([[b["x"], b["y"], b["width"], b["height"]] for b in record["boxes"]]).reshape(-1, 4)
        np.testing.assert_allclose(boxes, expected, atol=0.5)
        np.testing.assert_allclose(confidences, [b["confidence"] for b in record["boxes"]], atol=1e-3)
        assert evaluation == ("Present" if record["boxes"] else "Absent")
    with open(out / "warnings.csv") as f:
        warnings = list(csv.DictReader(f))
    assert {w["path"] for w in warnings} == {str(first)}
    assert sorted(w["warning"].split()[0] for w in warnings) == ["SOPInstanceUID", "StudyInstanceUID"]
    assert summary["n_warnings"] == 2 and summary["n_reports"] == 2 * len(annotations)
    # a re-run rewrites nothing that is up to date
    again = predict_folder(predictor, images, out, workers=0, dicom_sr=True)
    assert again["n_reports"] == 0


def test_headers_highdicom_refuses_are_reported_not_fatal(source_path, tmp_path):
    from pneumo.deploy.sr import write_reports

    records = []
    for name, keyword, value in (("odd", "PatientSex", "X"), ("private", "SOPClassUID", "1.2.3")):
        ds = pydicom.dcmread(source_path)
        setattr(ds, keyword, value)
        ds.StudyDate = "garbage"
        ds.save_as(tmp_path / f"{name}.dcm")
        records.append(({"path": str(tmp_path / f"{name}.dcm"), "patientId": name, "boxes": []}, 0.0))
    summary = write_reports(records, tmp_path / "out", "m")
    assert [p.name for p in (tmp_path / "out" / "sr").iterdir()] == ["odd.dcm"]
    with open(tmp_path / "out" / "warnings.csv") as f:
        warnings = [(row["path"].split("/")[-1], row["warning"]) for row in csv.DictReader(f)]
    assert ("odd.dcm", "PatientSex 'X' is not a valid value: the report leaves it empty") in warnings
    assert any(path == "private.dcm" and "sr: not written" in text for path, text in warnings)
    assert summary == {"n_reports": 1, "n_warnings": len(warnings)}


def _nested(depth: int):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    inner = Dataset()
    inner.CodeMeaning = "deep"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    return inner.ContentSequence


def test_one_unusual_header_does_not_stop_the_others(source_path, tmp_path):
    """A source without Modality (highdicom: AttributeError) and one with sequences nested 150 deep
    (deepcopy: RecursionError) are warnings.csv lines; the good image still gets its report."""
    from pneumo.deploy.sr import write_reports

    records = []
    for name in ("good", "no-modality", "deep"):
        ds = pydicom.dcmread(source_path)
        if name == "no-modality":
            del ds.Modality
        if name == "deep":
            ds.ContentSequence = _nested(150)
        ds.save_as(tmp_path / f"{name}.dcm")
        records.append(({"path": str(tmp_path / f"{name}.dcm"), "patientId": name,
                         "boxes": [{"x": 1.0, "y": 2.0, "width": 30.0, "height": 40.0, "confidence": 0.9}]}, 0.0))
    summary = write_reports(records, tmp_path / "out", "m")
    written = sorted(p.name for p in (tmp_path / "out" / "sr").iterdir())
    with open(tmp_path / "out" / "warnings.csv") as f:
        warnings = {row["path"].split("/")[-1]: row["warning"] for row in csv.DictReader(f)}
    assert "good.dcm" in written and summary["n_reports"] == len(written)
    for name in ("no-modality", "deep"):  # a report with a warning, or a warning saying why none
        assert f"{name}.dcm" in written or f"{name}.dcm" in warnings, name
    assert "no-modality.dcm" in warnings
    if "deep.dcm" not in written:
        assert "sr: not written" in warnings["deep.dcm"]


def test_an_sr_of_an_odd_upload_is_a_dicom_error(source_path):
    from pneumo.deploy.sr import upload_report
    from pneumo.errors import DicomError

    ds = pydicom.dcmread(source_path)
    ds.ContentSequence = _nested(150)
    data = to_bytes(ds)
    try:
        report, warnings = upload_report(data, {"patientId": "p", "boxes": []}, "m")
    except DicomError as exc:
        assert "no SR for this header" in str(exc) and "\n" not in str(exc)
    else:
        assert pydicom.dcmread(__import__("io").BytesIO(report)).Modality == "SR"
