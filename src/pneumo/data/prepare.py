"""Decode an RSNA data directory once into what training and exploration read.

OUT/features.csv   one row per usable train image (patientId, PatientSex, PatientAge,
                   ViewPosition, Target, class, n_boxes, split, rows, columns, index)
OUT/boxes.csv      patientId, x, y, width, height in the image's own pixel frame
OUT/images.npy     uint8 (N, S, S) at the working resolution, row i = features.csv index i,
                   read by rows (CacheRows) so a Dataset never decodes a DICOM
OUT/skipped.csv    path, patientId, reason for every train file that was left out
OUT/manifest.json  fingerprint of the inputs and the settings; written last, so a directory
                   without it is not a finished cache
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pneumo.boxes import check_patient_id
from pneumo.config import IMAGE_SIZE_RANGE, TrainConfig
from pneumo.data.layout import (
    CLASS_COLUMNS,
    CSV_MISSING,
    POSITIVE_CLASS,
    bad_box_rows,
    dicom_files,
    layout,
    read_csv,
    read_labels_table,
    scan,
)
from pneumo.errors import DataError
from pneumo.io import atomic_dir, atomic_write_json
from pneumo.paths import Outputs

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

PREPARE_VERSION = 1  # bump when the cache format or decoding changes: it renames every cache
PREPARED_FILES = {"features.csv", "boxes.csv", "images.npy", "skipped.csv", "manifest.json"}


def fingerprint(data_dir, image_size: int, val_fraction: float, seed: int) -> str:
    """Hash of the inputs (CSV contents, image names, sizes and mtimes) and the settings."""
    lay = layout(data_dir)
    h = hashlib.sha256(f"v{PREPARE_VERSION}|{image_size}|{val_fraction}|{seed}".encode())
    for csv in (lay.labels, lay.class_info):
        h.update(csv.read_bytes() if csv.is_file() else b"-")
    for p in dicom_files(lay.train_images):
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def split_patients(classes, val_fraction: float, seed: int) -> dict[str, str]:
    """Patient-level train/val split, stratified by class: {patientId: 'train' | 'val'}."""
    rng = np.random.default_rng(seed)
    split = {}
    for klass in sorted(set(classes.values())):
        pids = sorted(p for p, c in classes.items() if c == klass)
        rng.shuffle(pids)
        n_val = int(round(len(pids) * val_fraction))
        if 0 < val_fraction and n_val == 0 and len(pids) > 1:
            n_val = 1
        split.update({p: "val" for p in pids[:n_val]})
        split.update({p: "train" for p in pids[n_val:]})
    return split


def _labels_and_classes(lay):
    import pandas as pd

    labels = read_labels_table(lay.labels)
    labels = labels[labels["patientId"].notna()].drop_duplicates()
    labels = labels[labels["patientId"].map(_valid_id).astype(bool)]  # bool even when empty: no column pick
    # a patient with a row validate reports as an error is left out whole, with the reason
    bad = {labels.at[row, "patientId"]: reason for row, reason in bad_box_rows(labels).items()}
    for row in labels.index[~labels["Target"].isin([0, 1])]:
        value = labels.at[row, "Target"]
        bad.setdefault(labels.at[row, "patientId"],
                       "labels row with an empty Target" if value != value
                       else f"labels row with Target {value:g}, not 0 or 1")
    labels = labels[~labels["patientId"].isin(set(bad))]
    target = labels.groupby("patientId")["Target"].max()
    if target.empty:
        raise DataError(f"{lay.labels}: no labelled rows to prepare ({len(bad)} patients with bad rows)")
    try:
        info = read_csv(lay.class_info, CLASS_COLUMNS).drop_duplicates("patientId").set_index("patientId")["class"]
    except DataError as exc:
        log.warning("%s; classes derived from Target", exc)
        info = pd.Series(dtype=object)
    classes = {pid: (info.get(pid) if isinstance(info.get(pid), str) else
                     (POSITIVE_CLASS if t == 1 else "Negative")) for pid, t in target.items()}
    boxes = labels.dropna(subset=["x", "y", "width", "height"])
    boxes = boxes[(boxes["Target"] == 1) & (boxes["width"] > 0) & (boxes["height"] > 0)]
    return target, classes, boxes[["patientId", "x", "y", "width", "height"]].reset_index(drop=True), bad


def _valid_id(pid) -> bool:
    try:
        check_patient_id(pid)
        return True
    except ValueError:
        return False


class CacheRows:
    """images.npy read by rows with pread, never loaded whole.

    Rows read through a memory map stay mapped in the process (its resident memory grows by
    every page an epoch touches: the whole cache, 1.75 GB at 256 px for RSNA's 26,684 images);
    read with pread they live in the kernel's page cache, shared and evictable, and the
    process holds only the batch. Indexing answers like the array for what callers use: an int
    gives one (S, S) row, a slice or a 1-D list of row numbers an (n, S, S) array (consecutive
    rows in one read); other keys (masks, tuples) raise TypeError rather than guess.

    The file is opened once, here: forked DataLoader workers share the descriptor (pread keeps
    no file position), so a prepare that replaces the directory meanwhile cannot switch files
    under them; a copy unpickled in a spawned worker opens the path again and checks it is
    still the same file."""

    def __init__(self, path):
        self._fd = None
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
            with os.fdopen(os.dup(self._fd), "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                self._offset = f.tell()
            stat = os.fstat(self._fd)
        except (ValueError, OSError) as exc:
            raise DataError(f"{self.path}: unreadable cache ({exc}); run prepare again") from None
        self.shape, self.dtype, self._identity = tuple(shape), np.dtype(dtype), (stat.st_dev, stat.st_ino)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if fortran or len(self.shape) != 3 or stat.st_size < self._offset + len(self) * self._row_bytes:
            raise DataError(f"{self.path}: unreadable cache (not a complete C-order (N, S, S) array); "
                            "run prepare again")

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def _descriptor(self) -> int:
        if self._fd is None:  # unpickled (a spawned worker): the same file, or nothing
            fd = os.open(self.path, os.O_RDONLY)
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) != self._identity:
                os.close(fd)
                raise DataError(f"{self.path}: replaced since it was opened (prepare ran again); start again")
            self._fd = fd
        return self._fd

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[[key]][0]
        if isinstance(key, slice):
            rows = np.arange(len(self))[key]
        else:
            rows = np.asarray(key)
            if isinstance(key, tuple) or rows.ndim > 1 or (rows.size and rows.dtype.kind not in "iu"):
                raise TypeError(f"{self.path}: rows are an int, a slice or a 1-D list of row numbers, not {key!r:.60}")
            rows = rows.astype(np.int64)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: rows {rows.min()}..{rows.max()} outside 0..{len(self) - 1}")
        rows = rows % max(len(self), 1)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(-1).view(np.uint8).reshape(len(rows), self._row_bytes)
        start = 0
        while start < len(rows):  # one read per run of consecutive rows
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            self._read_into(flat[start:end].reshape(-1), int(rows[start]), int(rows[end - 1]))
            start = end
        return out

    def _read_into(self, buffer: np.ndarray, first: int, last: int) -> None:
        view, offset = memoryview(buffer), self._offset + first * self._row_bytes
        while view:  # one pread returns at most ~2 GiB on Linux
            done = os.preadv(self._descriptor(), [view], offset)
            if done == 0:
                raise DataError(f"{self.path}: truncated cache (rows {first}..{last}); run prepare again")
            view, offset = view[done:], offset + done

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)


@dataclass(frozen=True)
class Prepared:
    """A finished prepare directory, opened for reading."""

    root: Path
    manifest: dict
    features: pd.DataFrame
    boxes: pd.DataFrame

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    def images(self) -> CacheRows:
        return CacheRows(self.root / "images.npy")

    def boxes_by_patient(self) -> dict[str, np.ndarray]:
        groups = {pid: g[["x", "y", "width", "height"]].to_numpy(float) for pid, g in self.boxes.groupby("patientId")}
        return {pid: groups.get(pid, np.zeros((0, 4))) for pid in self.features["patientId"]}


def _new_cache(npy: Path, n: int, image_size: int) -> tuple[int, int]:
    """Create npy as a (n, S, S) uint8 array file (zero-filled, sparse); return its descriptor,
    open for writing, and where its rows start. Rows are written with pwrite, not through a
    memory map, whose written pages would stay in the process as long as the map (the whole
    cache by the end: 1.75 GB at 256 px for RSNA)."""
    created = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size))
    offset = created.offset
    del created
    return os.open(npy, os.O_WRONLY), offset


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:  # pwrite may write less than asked
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _decode_into(npy: Path, files, image_size: int, workers, client, skipped: list) -> list[dict]:
    """Decode files into the uint8 (N, S, S) array npy, row i = the i-th decoded file; return
    the metadata rows of those files and append the others to skipped."""
    row_bytes = image_size * image_size
    fd, offset = _new_cache(npy, len(files), image_size)
    rows = []
    try:
        for item in scan(files, image_size=image_size, workers=workers, description="preparing", client=client):
            if item.error:
                skipped.append({"path": item.path, "patientId": item.patientId, "reason": item.error})
                continue
            m = item.meta
            if item.image.shape != (image_size, image_size):  # a wrong shape would spill into the next rows
                raise ValueError(f"{item.path}: decoded to {item.image.shape}, not {image_size}x{image_size}")
            _write_at(fd, np.ascontiguousarray(item.image, dtype=np.uint8).tobytes(), offset + len(rows) * row_bytes)
            rows.append({"patientId": item.patientId, "PatientSex": m["PatientSex"], "PatientAge": m["PatientAge"],
                         "ViewPosition": m["ViewPosition"], "rows": m["rows"], "columns": m["columns"]})
        os.fsync(fd)  # on disk before the manifest says the cache is finished
    finally:
        os.close(fd)
    if len(rows) < len(files):  # rewrite without the rows of skipped files, in chunks
        full = CacheRows(npy)
        kept = npy.with_name(f"{npy.stem}.kept.npy")
        fd, offset = _new_cache(kept, len(rows), image_size)
        try:
            for start in range(0, len(rows), 1024):
                _write_at(fd, full[start:min(start + 1024, len(rows))].tobytes(), offset + start * row_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        del full
        os.replace(kept, npy)
    return rows


def _check_replaceable(out: Path, data_root: Path) -> None:
    """Refuse an OUT that holds anything but an earlier prepare's files: the rebuild replaces
    OUT whole, and `--out outputs` or `--out <the data dir>` must not delete what is there."""
    if out.resolve() == data_root.resolve() or out.resolve() in data_root.resolve().parents:
        raise DataError(f"{out}: holds the data directory {data_root}; give prepare a new or empty --out")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not a directory; give prepare a new or empty --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in PREPARED_FILES) if out.is_dir() else []
    if foreign:
        raise DataError(f"{out}: holds other data ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), "
                        "which prepare would replace; give it a new or empty --out")


def open_prepared(path) -> Prepared:
    import pandas as pd

    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{root}: not a finished prepare directory (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    features = pd.read_csv(root / "features.csv", dtype={"patientId": str}, **CSV_MISSING)
    boxes = pd.read_csv(root / "boxes.csv", dtype={"patientId": str}, **CSV_MISSING)
    return Prepared(root, manifest, features, boxes)


def prepare(data_dir, out=None, image_size: int = TrainConfig.image_size,
            val_fraction: float = TrainConfig.val_fraction, seed: int = TrainConfig.seed, workers: int | None = None,
            force: bool = False, outputs=None, client=None) -> Prepared:
    """Build (or reuse, when the fingerprint matches) the prepared cache of data_dir.

    out defaults to <outputs>/data/<fingerprint> (pneumo.paths). With a Dask
    client, decoding runs on the cluster's workers (they must see data_dir). image_size,
    val_fraction and seed default to TrainConfig's, so a default cache is what a default run reads.
    """
    import pandas as pd

    low, high = IMAGE_SIZE_RANGE
    if not low <= image_size <= high:
        raise DataError(f"image size {image_size}: must be between {low} and {high} pixels (TrainConfig's range)")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val fraction {val_fraction}: must be in [0, 1)")
    lay = layout(data_dir)
    fp = fingerprint(lay.root, image_size, val_fraction, seed)
    out = Path(out) if out else Outputs.at(outputs).data(fp)
    if not force and (out / "manifest.json").is_file():
        try:
            if json.loads((out / "manifest.json").read_text()).get("fingerprint") == fp:
                log.info("reusing prepared data %s (inputs unchanged)", out)
                return open_prepared(out)
        except (OSError, json.JSONDecodeError):
            pass  # a damaged manifest means rebuild
    _check_replaceable(out, lay.root)
    start = time.perf_counter()
    target, classes, boxes, bad_labels = _labels_and_classes(lay)
    # every file is either decoded or listed in skipped.csv; read_dicom judges the non-.dcm ones
    listing = dicom_files(lay.train_images)
    files = [p for p in listing if p.stem in classes]
    unlabelled = [p for p in listing if p.stem not in classes]
    skipped = [{"path": str(p), "patientId": p.stem, "reason": bad_labels.get(p.stem, "no row in the labels CSV")}
               for p in unlabelled]
    with atomic_dir(out) as tmp:
        rows = _decode_into(tmp / "images.npy", files, image_size, workers, client, skipped)
        for row in rows:
            row.update({"Target": int(target[row["patientId"]]), "class": classes[row["patientId"]]})
        features = pd.DataFrame(rows, columns=["patientId", "PatientSex", "PatientAge", "ViewPosition", "Target",
                                               "class", "rows", "columns"])
        kept = set(features["patientId"])
        boxes = boxes[boxes["patientId"].isin(kept)]
        features["n_boxes"] = features["patientId"].map(boxes.groupby("patientId").size()).fillna(0).astype(int)
        split = split_patients(dict(zip(features["patientId"], features["class"])), val_fraction, seed)
        features["split"] = features["patientId"].map(split)
        features["index"] = np.arange(len(features))
        features.to_csv(tmp / "features.csv", index=False)
        boxes.to_csv(tmp / "boxes.csv", index=False)
        pd.DataFrame(skipped, columns=["path", "patientId", "reason"]).to_csv(tmp / "skipped.csv", index=False)
        seconds = time.perf_counter() - start
        atomic_write_json(tmp / "manifest.json", {
            "fingerprint": fp, "version": PREPARE_VERSION, "data_dir": str(lay.root.resolve()),
            "image_size": image_size, "val_fraction": val_fraction, "seed": seed,
            "n_images": len(features), "n_skipped": len(skipped), "n_boxes": len(boxes),
            "seconds": round(seconds, 2), "images_per_second": round(len(files) / max(seconds, 1e-9), 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    log.info("prepared %d images (%d skipped) into %s in %.1f s", len(features), len(skipped), out, seconds)
    return open_prepared(out)


def prepared_for(config, outputs=None) -> Prepared:
    """The prepared cache a TrainConfig trains on: its data_dir itself if that is one, else
    prepare (or reuse) it under outputs."""
    data_dir = Path(config.data_dir).expanduser()
    if (data_dir / "manifest.json").is_file():
        prepared = open_prepared(data_dir)
        if prepared.image_size != config.image_size:
            raise DataError(f"{data_dir}: prepared at {prepared.image_size} px, but image_size is "
                            f"{config.image_size}; point data_dir at the RSNA directory to prepare it again")
        return prepared
    return prepare(data_dir, image_size=config.image_size, val_fraction=config.val_fraction, seed=config.seed,
                   outputs=outputs)
