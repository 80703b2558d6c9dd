"""The RSNA data directory: its layout, its CSVs, and one parallel pass over its DICOMs.

validate and prepare both read the data through this module, so a file that one of them
accepts the other accepts too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pneumo.boxes import check_patient_id
from pneumo.errors import DataError, DicomError
from pneumo.progress import track
from pneumo.synth import CLASS_INFO, CLASSES, TEST_IMAGES, TRAIN_IMAGES, TRAIN_LABELS

LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")
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


def read_labels_table(path) -> pd.DataFrame:  # noqa: F821
    """The labels CSV with numeric box and Target columns; DataError names the first bad cell."""
    import pandas as pd

    labels = read_csv(path, LABEL_COLUMNS)
    for column in ("x", "y", "width", "height", "Target"):
        values = pd.to_numeric(labels[column], errors="coerce")
        bad = values.isna() & labels[column].notna()
        if bad.any():
            row = int(bad.idxmax())
            raise DataError(f"{path}: line {row + 2}, column {column}: {labels[column][row]!r} is not a number")
        labels[column] = values
    return labels


def dicom_files(folder) -> list[Path]:
    """Every regular file of a DICOM folder, sorted (non-.dcm files too: validate reports them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


@dataclass
class Scanned:
    """One file after the decode pass: metadata and a resized image, or the reason it failed."""

    path: str
    patientId: str
    meta: dict | None = None
    std: float = 0.0
    image: np.ndarray | None = None
    error: str | None = None


def inspect_file(path, image_size: int | None = None) -> Scanned:
    from pneumo.dicom import read_dicom, resize_area

    path = Path(path)
    try:
        check_patient_id(path.stem)
        image, meta = read_dicom(path)
    except (DicomError, ValueError) as exc:
        return Scanned(str(path), path.stem, error=getattr(exc, "reason", str(exc)))
    small = resize_area(image, image_size) if image_size else None
    return Scanned(str(path), path.stem, meta.to_dict(), float(image.std()), small)


def _inspect_job(job):
    return inspect_file(*job)


def scan(paths, image_size: int | None = None, workers: int | None = None, description="decoding", client=None):
    """Yield a Scanned per path, in order, decoding in worker processes (or on a Dask client's workers)."""
    jobs = [(str(p), image_size) for p in paths]
    if client is not None:
        yield from track(_scan_on_dask(client, jobs), len(jobs), description)
        return
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1 or len(jobs) < 16:
        yield from track(map(_inspect_job, jobs), len(jobs), description)
        return
    # spawn, not fork: callers may hold torch threads or run inside a Jupyter kernel.
    with get_context("spawn").Pool(workers) as pool:
        yield from track(pool.imap(_inspect_job, jobs, chunksize=8), len(jobs), description)


def _scan_on_dask(client, jobs, chunk: int = 64, window: int = 16):
    """Chunks of files decoded on the cluster's workers, yielded in order; at most `window`
    chunks in flight, so the client never holds the whole decoded dataset."""
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    futures = []
    for i, part in enumerate(chunks):
        futures.append(client.submit(_inspect_chunk, part, pure=False))
        if i >= window - 1:
            yield from futures.pop(0).result()
    for future in futures:
        yield from future.result()


def _inspect_chunk(jobs) -> list:
    return [_inspect_job(job) for job in jobs]
