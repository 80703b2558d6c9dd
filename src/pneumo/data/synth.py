"""Synthetic RSNA-layout dataset: real JPEG-Baseline DICOMs of chest-X-ray-like images.

Same directory layout, CSV formats and DICOM tags as the Kaggle download, with
pneumonia-like opacities exactly inside the labelled boxes, so that every command and test
runs without the real 3.7 GB of data. The test images' labels go to a separate CSV
(stage_2_test_labels.csv, which the real data does not have) so predictions can be scored.
"""

from __future__ import annotations

import io
import os
import uuid
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pneumo.data.dicom import quiet_pydicom
from pneumo.data.layout import (
    CLASS_COLUMNS,
    CLASS_INFO,
    CLASSES,
    LABEL_COLUMNS,
    SAMPLE_SUBMISSION,
    TEST_IMAGES,
    TRAIN_IMAGES,
    TRAIN_LABELS,
)
from pneumo.errors import DataError
from pneumo.io import atomic_file, atomic_write_json, atomic_write_text
from pneumo.processes import child_initializer

CLASS_P = (0.225, 0.443, 0.332)  # patient-level class mix of the real stage 2 training set
P_AP = {"Lung Opacity": 0.75, "No Lung Opacity / Not Normal": 0.5, "Normal": 0.3}
N_BOXES_P = (0.43, 0.54, 0.025, 0.005)  # 1..4 boxes per positive patient, as in the real data
TEST_LABELS = "stage_2_test_labels.csv"  # synth only: the real test set has no public labels
SYNTH_MARKER = "pneumo-synth.json"  # says a directory is synth's own, so synth may write into it again


@dataclass(frozen=True)
class Case:
    patient_id: str
    klass: str
    sex: str
    age: int
    view: str
    boxes: tuple  # (x, y, w, h) in the size x size frame


def _sample_case(rng: np.random.Generator, size: int) -> Case:
    klass = CLASSES[rng.choice(3, p=CLASS_P)]
    view = "AP" if rng.random() < P_AP[klass] else "PA"
    sex = "M" if rng.random() < 0.57 else "F"
    age = int(np.clip(rng.normal(47, 17), 1, 92))
    boxes = []
    if klass == "Lung Opacity":
        n = int(rng.choice(4, p=N_BOXES_P)) + 1
        sides = [0, 1] if n >= 2 else [int(rng.integers(2))]
        per_side = {0: 0, 1: 0}
        for i in range(n):
            per_side[sides[i % len(sides)]] += 1
        for side, count in per_side.items():
            top, bottom = 0.2, 0.82  # lung field, as a fraction of height
            band = (bottom - top) / max(count, 1)
            for k in range(count):
                w = np.clip(rng.normal(0.21, 0.05), 0.09, 0.33)
                h = np.clip(rng.normal(0.32, 0.10), 0.10, 0.6) * (1 if count == 1 else band / 0.62)
                cx = (0.29 if side == 0 else 0.71) + rng.normal(0, 0.03)
                y0 = top + k * band + rng.uniform(0, max(band - h, 0.0))
                x0 = np.clip(cx - w / 2, 0.04, 0.96 - w)
                boxes.append(tuple(float(round(v * size)) for v in (x0, y0, w, h)))
    pid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    return Case(pid, klass, sex, age, view, tuple(boxes))


def _ellipse(u, v, cx, cy, rx, ry):
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2


def render(case: Case, size: int, rng: np.random.Generator) -> np.ndarray:
    """A chest-X-ray-like uint8 image with opacities inside case.boxes (size x size)."""
    from PIL import Image
    from scipy import ndimage

    low = max(size // 4, 32)  # anatomy is smooth: draw it small, upsample, add fine noise
    v, u = np.mgrid[0:low, 0:low] / low
    u = u + rng.normal(0, 0.015)
    v = v + rng.normal(0, 0.015)
    img = np.full((low, low), 25.0)
    body = _ellipse(u, v, 0.5, 0.58, 0.47, 0.6)
    img += 120 * np.clip(1.2 - body, 0, 1)
    lung_rx, lung_ry = rng.uniform(0.14, 0.18), rng.uniform(0.28, 0.33)
    for cx in (0.29, 0.71):
        lung = _ellipse(u, v, cx, 0.5, lung_rx, lung_ry)
        img -= 75 * np.clip(1.0 - lung, 0, 0.35) / 0.35
    heart_scale = 1.25 if case.view == "AP" else 1.0  # AP films magnify the heart
    heart = _ellipse(u, v, 0.54, 0.63, 0.11 * heart_scale, 0.14 * heart_scale)
    img += 60 * np.clip(1.0 - heart, 0, 0.4) / 0.4
    img += 45 * np.exp(-(((u - 0.5) / 0.03) ** 2))  # spine
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * 11 * (v - 0.6 * (u - 0.5) ** 2))) ** 6
    img += 22 * ribs * (body < 1)
    if case.klass == "No Lung Opacity / Not Normal":  # other findings: nodules, effusion
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.choice([0.29, 0.71]) + rng.normal(0, 0.05), rng.uniform(0.3, 0.75)
            img += 50 * np.exp(-_ellipse(u, v, cx, cy, 0.012, 0.012))
        if rng.random() < 0.4:
            side = rng.choice([0.29, 0.71])  # effusion: fluid level at one lung base
            img += 45 * np.clip((v - 0.68) / 0.06, 0, 1) * (_ellipse(u, v, side, 0.5, lung_rx, lung_ry) < 1)
    img = ndimage.gaussian_filter(img, 1.0)
    img = np.asarray(Image.fromarray(img.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
    lesion_rng = np.random.default_rng(rng.integers(2**63))  # boxes never change the rest of the image
    img = img.astype(np.float64) * rng.uniform(0.85, 1.1) + rng.normal(0, 4, (size, size))
    for x, y, w, h in case.boxes:  # opacity: a soft textured consolidation filling the box
        x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + h)
        bv, bu = np.mgrid[y0:y1, x0:x1]
        r = _ellipse(bu, bv, (x0 + x1) / 2, (y0 + y1) / 2, w / 2, h / 2)
        texture = ndimage.gaussian_filter(lesion_rng.normal(0, 1, (y1 - y0, x1 - x0)), max(size / 128, 1))
        texture /= texture.std() + 1e-9
        strength = lesion_rng.uniform(40, 70)
        img[y0:y1, x0:x1] += strength * np.clip(1.15 - r**2, 0, 1) * (1 + 0.25 * texture)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dicom(path: Path, image: np.ndarray, case: Case) -> None:
    """A JPEG-Baseline DICOM with the tags of the RSNA files, written atomically."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, format="JPEG", quality=95)
    sop_uid = generate_uid(entropy_srcs=[case.patient_id, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate, ds.StudyTime = "19010101", "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {case.view}"
    ds.PatientName = case.patient_id
    ds.PatientID = case.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = case.sex
    with quiet_pydicom():
        ds.PatientAge = str(case.age)  # RSNA writes plain numbers, not the standard '051Y'
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = case.view
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[case.patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[case.patient_id, "series"])
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", "1", "1"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.PixelSpacing = [0.143, 0.143]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.add_new(0x7FE00010, "OB", encapsulate([buf.getvalue()]))
    with quiet_pydicom(), atomic_file(path, "wb") as f:
        ds.save_as(f, enforce_file_format=True)


def _make_one(job) -> Case:
    seed, index, size, folder = job
    rng = np.random.default_rng([seed, index])
    case = _sample_case(rng, size)
    write_dicom(Path(folder) / f"{case.patient_id}.dcm", render(case, size, rng), case)
    return case


def _labels_csv(cases) -> str:
    lines = [",".join(LABEL_COLUMNS)]
    for c in cases:
        if c.boxes:
            lines += [f"{c.patient_id},{x},{y},{w},{h},1" for x, y, w, h in c.boxes]
        else:
            lines.append(f"{c.patient_id},,,,,0")
    return "\n".join(lines) + "\n"


def make_dataset(out, n_train: int = 400, n_test: int = 60, seed: int = 0, size: int = 1024,
                 workers: int | None = None) -> dict:
    """Write an RSNA-layout dataset into out; returns counts per class. Deterministic per seed."""
    out = Path(out)
    if size < 64:
        raise ValueError("size must be at least 64 pixels")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / SYNTH_MARKER).is_file()):
        # a real download there would get synthetic images beside its own and lose its labels
        raise DataError(f"{out}: holds other data; synth writes into a new or empty directory or one it wrote")
    out.mkdir(parents=True, exist_ok=True)
    # first, so that a synth killed half-way may be run again into its own directory
    atomic_write_json(out / SYNTH_MARKER, {"n_train": n_train, "n_test": n_test, "seed": seed, "size": size})
    workers = workers or os.cpu_count() or 1
    for sub in (TRAIN_IMAGES, TEST_IMAGES):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # Train and test draw from disjoint index ranges of one seed, so ids never collide.
    train_jobs = [(seed, i, size, str(out / TRAIN_IMAGES)) for i in range(n_train)]
    test_jobs = [(seed, 10_000_000 + i, size, str(out / TEST_IMAGES)) for i in range(n_test)]
    jobs = train_jobs + test_jobs
    if workers > 1 and len(jobs) > 8:
        with get_context("spawn").Pool(workers, initializer=child_initializer()) as pool:
            cases = pool.map(_make_one, jobs, chunksize=4)
    else:
        cases = [_make_one(j) for j in jobs]
    train, test = cases[:n_train], cases[n_train:]
    atomic_write_text(out / TRAIN_LABELS, _labels_csv(train))
    # The real class-info file repeats a patient's row once per box: so does this one.
    info = [",".join(CLASS_COLUMNS)] + [f'{c.patient_id},"{c.klass}"' if "/" in c.klass else f"{c.patient_id},{c.klass}"
                                  for c in train for _ in range(max(len(c.boxes), 1))]
    atomic_write_text(out / CLASS_INFO, "\n".join(info) + "\n")
    atomic_write_text(out / TEST_LABELS, _labels_csv(test))
    sample = ["patientId,PredictionString"] + [f"{c.patient_id},0.5 0 0 100 100" for c in test]
    atomic_write_text(out / SAMPLE_SUBMISSION, "\n".join(sample) + "\n")
    counts = {k: sum(c.klass == k for c in train) for k in CLASSES}
    return {"train": n_train, "test": n_test, "classes": counts, "out": str(out)}


def write_bomb(source, path, rows: int, columns: int, in_header: bool = True) -> None:
    """A decompression bomb, for tests and the serve load check: source (a JPEG-Baseline DICOM)
    with its JPEG frame header made to declare rows x columns, so a few hundred bytes claim an
    image of gigabytes. in_header=False keeps the DICOM Rows/Columns honest: only the JPEG lies."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    with quiet_pydicom():
        ds = pydicom.dcmread(source)
    jpeg = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = rows.to_bytes(2, "big") + columns.to_bytes(2, "big")
    ds.PixelData = encapsulate([bytes(jpeg)])
    if in_header:
        ds.Rows, ds.Columns = rows, columns
    with quiet_pydicom(), atomic_file(path, "wb") as f:
        ds.save_as(f, enforce_file_format=True)
