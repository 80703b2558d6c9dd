"""The RSNA data directory: its layout, its CSVs, and how any DICOM is decoded for pneumo.

validate, prepare, score and predict all read data through this module, so a file that one of
them accepts the others accept too. synth writes the layout defined here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pneumo.boxes import as_boxes, check_patient_id
from pneumo.errors import DataError, DicomError
from pneumo.progress import track

# The Kaggle RSNA Pneumonia Detection (stage 2) download: folder and file names, CSV columns, classes.
TRAIN_IMAGES, TEST_IMAGES = "stage_2_train_images", "stage_2_test_images"
TRAIN_LABELS, CLASS_INFO = "stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"
SAMPLE_SUBMISSION = "stage_2_sample_submission.csv"
BOX_COLUMNS = ("x", "y", "width", "height")
LABEL_COLUMNS = ("patientId", *BOX_COLUMNS, "Target")
CLASS_COLUMNS = ("patientId", "class")
CLASSES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
POSITIVE_CLASS = CLASSES[0]


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def train_images(self) -> Path:
        return self.root / TRAIN_IMAGES

    @property
    def test_images(self) -> Path:
        return self.root / TEST_IMAGES

    @property
    def labels(self) -> Path:
        return self.root / TRAIN_LABELS

    @property
    def class_info(self) -> Path:
        return self.root / CLASS_INFO


def layout(data_dir) -> Layout:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: data directory does not exist")
    return Layout(root)


def read_csv(path, columns) -> pd.DataFrame:  # noqa: F821
    """A CSV with the required columns (patientId as str), or DataError naming what is wrong."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        df = pd.read_csv(path, dtype={"patientId": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).strip()})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def read_labels_table(path, columns=LABEL_COLUMNS) -> pd.DataFrame:  # noqa: F821
    """The labels CSV with numeric box and Target columns; DataError names the first bad cell.

    columns are the required ones; Target is checked when present even if not required.
    """
    import pandas as pd

    labels = read_csv(path, columns)
    for column in (c for c in (*BOX_COLUMNS, "Target") if c in labels.columns):
        values = pd.to_numeric(labels[column], errors="coerce")
        bad = values.isna() & labels[column].notna()
        if bad.any():
            row = int(bad.idxmax())
            raise DataError(f"{path}: line {row + 2}, column {column}: {labels[column][row]!r} is not a number")
        labels[column] = values
    return labels


def read_labels(path) -> dict[str, np.ndarray]:
    """{patientId: boxes (N, 4)} of a labels CSV, every patient listed (no box: an empty array).

    Only patientId and the box columns are required, so a ground-truth file without Target scores.
    """
    labels = read_labels_table(path, ("patientId", *BOX_COLUMNS))
    boxes: dict[str, list] = {pid: [] for pid in labels["patientId"]}
    boxed = labels.dropna(subset=list(BOX_COLUMNS))
    for pid, *box in boxed[["patientId", *BOX_COLUMNS]].itertuples(index=False):
        boxes[pid].append(box)
    return {pid: as_boxes(b) for pid, b in boxes.items()}


def dicom_files(folder) -> list[Path]:
    """Every regular, non-hidden file of a DICOM folder, sorted; [] if there is no folder.

    Non-.dcm files are listed too: validate reports them, prepare and predict decode them or
    say why not, so no input file disappears without a trace.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


@dataclass
class Decoded:
    """One file after decoding: metadata and the images asked for, or the reason it failed."""

    path: str
    patientId: str
    meta: dict | None = None
    std: float | None = None  # grey-level spread of the full image, when measured
    image: np.ndarray | None = None  # image_size x image_size uint8, when a size was asked
    full: np.ndarray | None = None  # the image in its own frame, when kept
    error: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the image's own frame."""
        return int(self.meta["rows"]), int(self.meta["columns"])


def decode_file(path, image_size: int | None = None, keep_full: bool = False, measure_std: bool = False) -> Decoded:
    """Decode one DICOM as every command does: the file name must be a safe patientId, the
    image is area-resized to image_size x image_size (the model's input). A file that cannot be
    used gives a Decoded with its error set: one bad file never stops a pass over a folder.

    Only the model-size image wanted (no full image, no spread): JPEG Baseline files are decoded
    scaled down in the decoder to no less than image_size, then area-resized as the rest
    (within a grey level of the full decode on real RSNA files: docs/architecture.md).
    """
    from pneumo.dicom import read_dicom, resize_area

    path = Path(path)
    scaled_decode = bool(image_size) and not keep_full and not measure_std
    try:
        check_patient_id(path.stem)
        image, meta = read_dicom(path, min_size=image_size if scaled_decode else None)
    except (DicomError, ValueError) as exc:
        return Decoded(str(path), path.stem, error=getattr(exc, "reason", str(exc)))
    return Decoded(str(path), path.stem, meta.to_dict(),
                   std=float(image.std()) if measure_std else None,
                   image=resize_area(image, image_size) if image_size else None,
                   full=image if keep_full else None)


def _decode_job(job):
    return decode_file(*job)


def scan(paths, image_size: int | None = None, workers: int | None = None, description="decoding", client=None,
         measure_std: bool = False):
    """Yield decode_file's Decoded per path, in order, decoding in worker processes (or on a
    Dask client's workers)."""
    jobs = [(str(p), image_size, False, measure_std) for p in paths]
    if client is not None:
        yield from track(_scan_on_dask(client, jobs), len(jobs), description)
        return
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1 or len(jobs) < 16:
        yield from track(map(_decode_job, jobs), len(jobs), description)
        return
    # spawn, not fork: callers may hold torch threads or run inside a Jupyter kernel.
    with get_context("spawn").Pool(workers) as pool:
        yield from track(pool.imap(_decode_job, jobs, chunksize=8), len(jobs), description)


def _scan_on_dask(client, jobs, chunk: int = 64, window: int = 16):
    """Chunks of files decoded on the cluster's workers, yielded in order; at most `window`
    chunks in flight, so the client never holds the whole decoded dataset."""
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    futures = []
    for i, part in enumerate(chunks):
        futures.append(client.submit(_decode_chunk, part, pure=False))
        if i >= window - 1:
            yield from futures.pop(0).result()
    for future in futures:
        yield from future.result()


def _decode_chunk(jobs) -> list:
    return [_decode_job(job) for job in jobs]
