"""The RSNA data directory: its layout, its CSVs, and how any DICOM is decoded for pneumo.

validate, prepare, score and predict all read data through this module, so a file that one of
them accepts the others accept too. synth writes the layout defined here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pneumo.boxes import as_boxes, check_patient_id
from pneumo.errors import DataError, DicomError
from pneumo.processes import child_initializer
from pneumo.progress import track

if TYPE_CHECKING:
    import pandas as pd

# The Kaggle RSNA Pneumonia Detection (stage 2) download: folder and file names, CSV columns, classes.
TRAIN_IMAGES, TEST_IMAGES = "stage_2_train_images", "stage_2_test_images"
TRAIN_LABELS, CLASS_INFO = "stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"
SAMPLE_SUBMISSION = "stage_2_sample_submission.csv"
BOX_COLUMNS = ("x", "y", "width", "height")
LABEL_COLUMNS = ("patientId", *BOX_COLUMNS, "Target")
CLASS_COLUMNS = ("patientId", "class")
CLASSES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
POSITIVE_CLASS = CLASSES[0]
# Only an empty cell is missing: pandas' default also reads "NA", "NaN", "null", "None", ... as
# missing, which would lose a patient whose id is one of them (and ids are file stems).
CSV_MISSING = {"keep_default_na": False, "na_values": [""]}


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


def read_csv(path, columns) -> pd.DataFrame:
    """A CSV with the required columns (patientId as str), or DataError naming what is wrong."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a CSV file")
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        df = pd.read_csv(path, dtype={"patientId": str}, **CSV_MISSING)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).strip()})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def read_labels_table(path, columns=LABEL_COLUMNS) -> pd.DataFrame:
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
    # a row repeated is one box (the Kaggle file repeats nothing; a careless merge does)
    boxed = labels.dropna(subset=list(BOX_COLUMNS)).drop_duplicates(subset=["patientId", *BOX_COLUMNS])
    for row, reason in bad_box_rows(boxed).items():
        raise DataError(f"{path}: line {row + 2}: {reason}")
    for pid, *box in boxed[["patientId", *BOX_COLUMNS]].itertuples(index=False):
        boxes[pid].append(box)
    return {pid: as_boxes(b) for pid, b in boxes.items()}


def bad_box_rows(labels) -> dict:
    """{row index: reason} of the rows whose box is incomplete, not finite, or of no positive size."""
    values = labels[list(BOX_COLUMNS)].to_numpy(float)
    given = ~np.isnan(values)
    reasons = {}
    for row, vals, has in zip(labels.index, values, given):
        if has.any() and not has.all():
            reasons[row] = "incomplete box (some of x, y, width, height are empty)"
        elif has.all() and not np.isfinite(vals).all():
            reasons[row] = f"box ({', '.join(f'{v:g}' for v in vals)}) is not finite"
        elif has.all() and (vals[2] <= 0 or vals[3] <= 0):
            reasons[row] = f"box width {vals[2]:g} and height {vals[3]:g} must be positive"
    return reasons


def dicom_files(folder) -> list[Path]:
    """Every regular, non-hidden file of a DICOM folder, sorted; [] if there is no folder.

    Non-.dcm files are listed too: validate reports them, prepare and predict decode them or
    say why not, so no input file disappears without a trace.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def skipped_entries(folder) -> list[tuple[Path, str]]:
    """The non-hidden entries of a folder that dicom_files leaves out, each with the reason, so
    that a command can list them (predict's errors.csv) rather than pass over them in silence."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith(".") or p.is_file():
            continue
        if p.is_symlink() and not p.exists():
            out.append((p, "a link that leads nowhere (broken, or a loop)"))
        elif p.is_dir():
            out.append((p, "a folder: only the files directly inside the images folder are read"))
        else:
            out.append((p, "not a regular file (a FIFO, socket or device)"))
    return out


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
    from pneumo.data.dicom import read_dicom, resize_area

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
    yield from track(_scan_in_processes(jobs, workers), len(jobs), description)


def _scan_in_processes(jobs, workers: int):
    """decode_file of each job in worker processes, in order. A worker that dies (the OOM killer,
    a crash in a decoder library) breaks the pool: the jobs it held are decoded again one by one,
    each in a pool of its own, so the one that kills a worker is reported and the rest go on.
    (multiprocessing.Pool would wait forever for the dead worker's result.)"""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: callers may hold torch threads or run inside a Jupyter kernel.
    context = get_context("spawn")
    done = 0
    while done < len(jobs):
        window: list = []  # futures in flight, oldest first; bounded so results never pile up
        try:
            with ProcessPoolExecutor(workers, mp_context=context, initializer=child_initializer()) as pool:
                queued = done
                while done < len(jobs):
                    while queued < len(jobs) and len(window) < 4 * workers:
                        window.append(pool.submit(_decode_job, jobs[queued]))
                        queued += 1
                    result = window[0].result()
                    window.pop(0)
                    done += 1
                    yield result
        except BrokenProcessPool:
            for job in jobs[done:done + len(window)]:
                yield _decode_alone(job, context)
                done += 1


def _decode_alone(job, context):
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(1, mp_context=context, initializer=child_initializer()) as pool:
            return pool.submit(_decode_job, job).result()
    except BrokenProcessPool:
        path = Path(job[0])
        return Decoded(str(path), path.stem, error="the decoding process died (killed, e.g. out of memory)")


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
