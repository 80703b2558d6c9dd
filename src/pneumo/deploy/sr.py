"""Boxes as DICOM that radiology tools read: a TID 1500 Measurement Report (Comprehensive SR) per
image, and optionally a Grayscale Softcopy Presentation State with the boxes drawn.

Each report references its source image (Study, Series, SOP Instance UIDs) and copies its patient
and study attributes, so a PACS viewer (OHIF, 3D Slicer) files it beside the image. A source
without the UIDs a reference needs still gets a report: the missing ones are generated
(deterministically, from the patientId) and each is returned as a warning for warnings.csv.
"""

from __future__ import annotations

import copy
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumo import __version__
from pneumo.data.dicom import parse_age, quiet_pydicom
from pneumo.errors import DicomError
from pneumo.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

SR_DIR, GSPS_DIR, WARNINGS_FILE = "sr", "gsps", "warnings.csv"
MANUFACTURER = "pneumo"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# The UIDs a reference to the source image needs (SOPClassUID: an unknown image is Secondary Capture)
REFERENCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Type 2 patient/study attributes highdicom copies from the source: present, possibly empty
COPIED_EMPTY_OK = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                   "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


@dataclass(frozen=True)
class Finding:
    """What a report says about one image: its boxes (x, y, w, h; pixels) and their confidences."""

    patient_id: str
    boxes: np.ndarray
    confidences: np.ndarray
    model: str


def read_source(data) -> object:
    """The source image's header (a path or the file's bytes), without pixel data."""
    import pydicom

    with quiet_pydicom():
        return pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else data, stop_before_pixels=True)


def complete_source(source, patient_id: str) -> tuple[object, list[str]]:
    """A copy of the source header with every UID a reference needs, and what was generated."""
    from pydicom.uid import generate_uid

    ds = copy.deepcopy(source)  # Dataset.copy() shares the elements: the caller's header would change
    warnings = []
    for keyword in REFERENCE_UIDS:
        if str(ds.get(keyword, "") or "").strip():
            continue
        value = SECONDARY_CAPTURE if keyword == "SOPClassUID" else generate_uid(entropy_srcs=[patient_id, keyword])
        setattr(ds, keyword, value)
        warnings.append(f"{keyword} missing from the source: the report references a generated one, {value}")
    for keyword in COPIED_EMPTY_OK:
        if keyword not in ds:
            setattr(ds, keyword, None)
    warnings += _clear_invalid(ds)
    age = parse_age(ds.get("PatientAge"))
    if "PatientAge" in ds:  # RSNA writes '51'; the standard AgeString, which the copies carry, is '051Y'
        del ds.PatientAge
    if age is not None:
        ds.PatientAge = f"{min(int(age), 999):03d}Y"
    return ds, warnings


def _clear_invalid(ds) -> list[str]:
    """Empty the copied attributes whose values highdicom refuses (real headers hold such values)."""
    from pydicom.valuerep import DA, TM

    notes = []
    checks = {"PatientSex": lambda v: v in ("M", "F", "O"), "StudyDate": DA, "PatientBirthDate": DA, "StudyTime": TM}
    for keyword, check in checks.items():
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        try:
            valid = check(str(value)) is not False
        except ValueError:
            valid = False
        if not valid:
            setattr(ds, keyword, None)
            notes.append(f"{keyword} {str(value)!r} is not a valid value: the report leaves it empty")
    return notes


def _codes():
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    return {"finding": codes.DCM.Opacity, "site": codes.SCT.Lung, "confidence": codes.DCM.Probability,
            "unit": CodedConcept("1", "UCUM", "no units"),
            "procedure": codes.DCM.PerformanceOfPediatricAndAdultChestRadiographyACR,
            "present": codes.SCT.Present, "absent": codes.SCT.Absent}


def outline(box) -> np.ndarray:
    """A box (x, y, w, h) as a closed polyline of (column, row) points: its four corners and the first again."""
    x, y, w, h = (float(v) for v in box)
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]], dtype=np.float64)


def _groups(source, finding: Finding, algorithm):
    """The measurement groups: one for the image (opacity present or absent), one per box."""
    import highdicom as hd

    c = _codes()
    image_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"{finding.patient_id} image"),
        finding_type=c["finding"], algorithm_id=algorithm, finding_sites=[hd.sr.FindingSite(c["site"])],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            c["finding"], c["present"] if len(finding.boxes) else c["absent"])],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
    groups = [image_group]
    for i, (box, confidence) in enumerate(zip(finding.boxes, finding.confidences), start=1):
        region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline(box),
                                   source_image=hd.sr.SourceImageForRegion.from_source_image(source))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"opacity {i}"),
            referenced_region=region, finding_type=c["finding"], algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(c["site"])],
            measurements=[hd.sr.Measurement(name=c["confidence"], value=round(float(confidence), 4),
                                            unit=c["unit"], algorithm_id=algorithm)]))
    return groups


def measurement_report(source, finding: Finding) -> tuple[object, list[str]]:
    """(Comprehensive SR dataset, warnings) of one image's finding; source is its header."""
    source, warnings = complete_source(source, finding.patient_id)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs each attribute module it copies
    with quiet_pydicom():  # RSNA's PatientName is a single component, which highdicom warns about
        return _comprehensive_sr(source, finding), warnings


def _comprehensive_sr(source, finding: Finding):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm = hd.sr.AlgorithmIdentification(name="pneumo", version=__version__, parameters=[finding.model])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["pneumo", finding.model]), name="pneumo",
            manufacturer_name=MANUFACTURER, model_name=finding.model[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_codes()["procedure"], imaging_measurements=_groups(source, finding, algorithm))
    # deterministic UIDs: predicting the same image with the same model again gives the same report
    keys = [str(source.SOPInstanceUID), finding.model]
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=report, series_number=901, instance_number=1,
        series_instance_uid=generate_uid(entropy_srcs=[str(source.StudyInstanceUID), finding.model, "sr"]),
        sop_instance_uid=generate_uid(entropy_srcs=[*keys, "sr"]), manufacturer=MANUFACTURER,
        series_description="pneumo opacity boxes", is_complete=True)
    if "PatientAge" in source:  # highdicom copies the Patient module, not the Patient Study one
        sr.PatientAge = source.PatientAge
    return sr


def presentation_state(source, finding: Finding) -> tuple[object, list[str]]:
    """(Grayscale Softcopy Presentation State, warnings): the boxes and their confidences drawn
    over the source image, for viewers that show graphic annotations but not SR."""
    source, warnings = complete_source(source, finding.patient_id)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    with quiet_pydicom():
        return _presentation_state(source, finding), warnings


def _presentation_state(source, finding: Finding):
    import highdicom as hd
    from pydicom.uid import generate_uid

    layer = hd.pr.GraphicLayer(layer_name="PNEUMO", order=1, description="pneumo opacity boxes")
    pixel = hd.pr.AnnotationUnitsValues.PIXEL
    objects = [hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=outline(box),
                                   units=pixel, is_filled=False) for box in finding.boxes]
    # a label above each box (inside the image); without boxes, one line saying so at the top left
    labels = [(f"opacity {c:.2f}", float(b[0]), float(b[1]) - 24.0) for b, c in
              zip(finding.boxes, finding.confidences)] or [("pneumo: no opacity found", 0.0, 0.0)]
    columns, rows = float(source.Columns), float(source.Rows)
    width, height = min(200.0, columns), min(24.0, rows)  # the text's box, kept inside the image

    def text_box(x, y):
        x, y = min(max(0.0, x), columns - width), min(max(0.0, y), rows - height)
        return x, y, x + width, y + height

    texts = [hd.pr.TextObject(text_value=text, units=pixel, bounding_box=text_box(x, y)) for text, x, y in labels]
    annotations = [hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer,
                                           graphic_objects=objects or None, text_objects=texts)]
    keys = [str(source.SOPInstanceUID), finding.model]
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source], series_number=902, instance_number=1,
        series_instance_uid=generate_uid(entropy_srcs=[str(source.StudyInstanceUID), finding.model, "gsps"]),
        sop_instance_uid=generate_uid(entropy_srcs=[*keys, "gsps"]), manufacturer=MANUFACTURER,
        manufacturer_model_name=finding.model[:64], software_versions=__version__, device_serial_number="0",
        content_label="PNEUMO", content_description="pneumo opacity boxes",
        graphic_layers=[layer], graphic_annotations=annotations)
    # Laterality is conditional on an unpaired body part: without one dciodvfy asks for it
    gsps.BodyPartExamined = str(source.get("BodyPartExamined", "") or "CHEST")
    return gsps


def to_bytes(dataset) -> bytes:
    """A DICOM file (Part 10, with its preamble) in memory."""
    buf = io.BytesIO()
    dataset.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def report_file(source, finding: Finding) -> tuple[bytes, list[str]]:
    """The measurement report of one image as a DICOM file, and its warnings (pneumo serve's answer)."""
    dataset, warnings = measurement_report(source, finding)
    return to_bytes(dataset), warnings


def upload_report(data: bytes, result: dict, model: str) -> tuple[bytes, list[str]]:
    """The SR file of an uploaded DICOM and its prediction (pneumo serve's JSON answer); a header
    no SR can be made for is a DicomError (serve: 422), never a server error."""
    try:
        return report_file(read_source(data), finding_of(result, model))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise DicomError("upload", f"no SR for this header ({_reason(exc)})") from None


def finding_of(record: dict, model: str) -> Finding:
    """The Finding of a prediction record (pneumo.boxes.box_records' list under "boxes")."""
    boxes = [[b["x"], b["y"], b["width"], b["height"]] for b in record["boxes"]]
    return Finding(record["patientId"], np.array(boxes, dtype=np.float64).reshape(-1, 4),
                   np.array([b["confidence"] for b in record["boxes"]], dtype=np.float64), model)


def write_reports(records, out, model: str, sr: bool = True, gsps: bool = False) -> dict:
    """OUT/sr/<patientId>.dcm (and OUT/gsps/<patientId>.dcm) for each prediction record
    ({"path", "patientId", "boxes": [{"x", "y", "width", "height", "confidence"}]}), and
    OUT/warnings.csv. A report newer than its record is kept (a re-run rewrites only changed ones)."""
    out = Path(out)
    kinds = [(SR_DIR, measurement_report)] * sr + [(GSPS_DIR, presentation_state)] * gsps
    for folder, _ in kinds:
        (out / folder).mkdir(parents=True, exist_ok=True)
    warnings, written = [], 0
    for record, record_mtime in records:
        try:
            written += _write_one(record, record_mtime, out, model, kinds, warnings)
        except Exception as exc:  # noqa: BLE001 - batch work: one odd header is a warning, the rest go on
            # (highdicom raises AttributeError for a missing Modality, deepcopy RecursionError for
            # deeply nested sequences, pydicom anything for a damaged file)
            warnings.append((record["path"], f"not written ({_reason(exc)})"))
    lines = ["path,warning"] + [f'"{path}","{text.replace(chr(34), chr(39))}"' for path, text in warnings]
    atomic_write_text(out / WARNINGS_FILE, "\n".join(lines) + "\n")
    return {"n_reports": written, "n_warnings": len(warnings)}


def _write_one(record, record_mtime, out: Path, model: str, kinds, warnings: list) -> int:
    """The reports of one record (those older than it); how many were written."""
    finding = finding_of(record, model)
    source = read_source(record["path"])
    warnings += [(record["path"], note) for note in complete_source(source, finding.patient_id)[1]]
    written = 0
    for folder, make in kinds:
        target = out / folder / f"{finding.patient_id}.dcm"
        if target.is_file() and target.stat().st_mtime >= record_mtime:
            continue
        try:
            atomic_write_bytes(target, to_bytes(make(source, finding)[0]))
            written += 1
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:  # a header highdicom refuses
            warnings.append((record["path"], f"{folder}: not written ({_reason(exc)})"))
    return written


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def parts_records(files, part_path):
    """(record, its mtime) of each predicted file's part (pneumo.deploy.predict's OUT/.parts)."""
    for f in files:
        path = part_path(f)
        record = json.loads(path.read_text())
        if "error" not in record:
            yield record, path.stat().st_mtime
