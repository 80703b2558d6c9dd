"""pneumo.data.layout: the RSNA layout, the CSV readers, the folder listing and the one DICOM decoder."""

import numpy as np
import pandas as pd
import pytest

from pneumo.data.dicom import read_dicom, resize_area
from pneumo.data.layout import (
    CLASSES,
    LABEL_COLUMNS,
    POSITIVE_CLASS,
    TRAIN_IMAGES,
    decode_file,
    dicom_files,
    layout,
    read_csv,
    read_labels,
    read_labels_table,
    scan,
)
from pneumo.errors import DataError

LABELS = "patientId,x,y,width,height,Target\na,1,2,30,40,1\na,50,60,10,20,1\nb,,,,,0\n"


def _csv(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_layout_names_the_rsna_files(synth_dir, tmp_path):
    lay = layout(synth_dir)
    assert lay.train_images == synth_dir / TRAIN_IMAGES and lay.train_images.is_dir()
    assert lay.test_images.is_dir() and lay.labels.is_file() and lay.class_info.is_file()
    assert POSITIVE_CLASS == CLASSES[0] == "Lung Opacity"
    with pytest.raises(DataError, match="does not exist"):
        layout(tmp_path / "nowhere")


def test_read_labels_table_good_file(synth_dir):
    table = read_labels_table(layout(synth_dir).labels)
    assert list(table.columns) == list(LABEL_COLUMNS)
    for column in ("x", "y", "width", "height", "Target"):
        assert pd.api.types.is_numeric_dtype(table[column])
    raw = pd.read_csv(layout(synth_dir).labels)
    assert len(table) == len(raw) and set(table["Target"]) == {0, 1}


@pytest.mark.parametrize("row,line,column,value", [
    ("c,abc,1,2,3,1", 5, "x", "abc"),
    ("c,1,1,2,3,yes", 5, "Target", "yes"),
])
def test_non_numeric_cell_names_line_and_column(tmp_path, row, line, column, value):
    path = _csv(tmp_path, LABELS + row + "\n")
    with pytest.raises(DataError, match=f"line {line}, column {column}: '{value}' is not a number"):
        read_labels_table(path)
    with pytest.raises(DataError, match=f"line {line}, column {column}"):
        read_labels(path)  # score reads through the same reader


def test_missing_columns_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="missing column\\(s\\) Target"):
        read_labels_table(_csv(tmp_path, "patientId,x,y,width,height\na,1,2,3,4\n"))
    with pytest.raises(DataError, match="missing column\\(s\\) width, height"):
        read_labels(_csv(tmp_path, "patientId,x,y\na,1,2\n"))
    with pytest.raises(DataError, match="missing"):
        read_csv(tmp_path / "absent.csv", ["patientId"])
    with pytest.raises(DataError, match="not a readable CSV"):
        read_csv(_csv(tmp_path, "", "empty.csv"), ["patientId"])


def test_read_labels_lists_every_patient(tmp_path):
    labels = read_labels(_csv(tmp_path, LABELS))
    assert set(labels) == {"a", "b"}
    assert np.array_equal(labels["a"], [[1, 2, 30, 40], [50, 60, 10, 20]])
    assert labels["b"].shape == (0, 4)


def test_read_labels_of_synthetic_data_matches_the_csv(synth_dir):
    labels = read_labels(layout(synth_dir).labels)
    raw = pd.read_csv(layout(synth_dir).labels, dtype={"patientId": str})
    assert set(labels) == set(raw["patientId"])
    assert sum(len(b) for b in labels.values()) == int(raw["x"].notna().sum())


def test_dicom_files_lists_regular_visible_files_sorted(tmp_path):
    for name in ("b.dcm", "a.dcm", "notes.txt", ".hidden.dcm"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.dcm").mkdir()
    assert [p.name for p in dicom_files(tmp_path)] == ["a.dcm", "b.dcm", "notes.txt"]
    assert dicom_files(tmp_path / "missing") == []


def test_decode_file_gives_model_size_image_metadata_and_full_image(synth_dir):
    path = dicom_files(layout(synth_dir).train_images)[0]
    image, meta = read_dicom(path)
    item = decode_file(path, image_size=64, keep_full=True, measure_std=True)
    assert item.error is None and item.patientId == path.stem and item.path == str(path)
    assert item.image.dtype == np.uint8 and np.array_equal(item.image, resize_area(image, 64))
    assert np.array_equal(item.full, image) and item.shape == image.shape == (256, 256)
    assert item.meta == meta.to_dict() and item.std == pytest.approx(image.std())
    lean = decode_file(path, image_size=64)
    assert lean.full is None and lean.std is None and lean.image.shape == item.image.shape
    # decoded scaled in the JPEG decoder (only the model-size image was asked): within a grey level
    assert np.abs(lean.image.astype(int) - item.image.astype(int)).mean() < 1.0
    assert decode_file(path).image is None


def test_decode_file_reports_instead_of_raising(tmp_path, synth_dir):
    (tmp_path / "notes.txt").write_text("not a DICOM")
    item = decode_file(tmp_path / "notes.txt", image_size=32)
    assert item.error and item.image is None and item.meta is None
    good = dicom_files(layout(synth_dir).train_images)[0]
    renamed = tmp_path / "bad id!.dcm"
    renamed.write_bytes(good.read_bytes())
    assert "invalid patientId" in decode_file(renamed, image_size=32).error


def test_scan_yields_one_result_per_file_in_order(synth_dir, tmp_path):
    files = dicom_files(layout(synth_dir).train_images)[:5]
    (tmp_path / "broken.dcm").write_bytes(b"DICM")
    items = list(scan([*files, tmp_path / "broken.dcm"], image_size=32, workers=1))
    assert [i.path for i in items] == [str(p) for p in files] + [str(tmp_path / "broken.dcm")]
    assert all(i.error is None and i.image.shape == (32, 32) for i in items[:-1]) and items[-1].error


@pytest.mark.slow
def test_a_killed_decode_worker_is_reported_and_the_scan_finishes(synth_dir):
    """The OOM killer taking a worker made validate hang forever (multiprocessing.Pool.imap)."""
    import os
    import signal
    import threading
    import time

    import psutil

    files = sorted((synth_dir / TRAIN_IMAGES).glob("*.dcm")) * 3  # 144 jobs: a worker is busy when killed
    items, finished = [], threading.Event()

    def run():
        items.extend(scan(files, image_size=32, workers=2))
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    me = psutil.Process(os.getpid())
    deadline = time.time() + 60
    while len(items) < 2 and time.time() < deadline:
        time.sleep(0.05)
    workers = [p for p in me.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert workers, "no decode worker to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    assert finished.wait(120), "scan hangs after a worker was killed"
    assert [i.path for i in items] == [str(f) for f in files]  # every file once, in order
    assert sum(i.error is not None for i in items) <= 1  # at most the job the dead worker held


def test_decode_file_decodes_model_size_images_scaled_and_full_ones_whole(synth_dir):
    path = dicom_files(layout(synth_dir).train_images)[0]
    lean, full = decode_file(path, image_size=64), decode_file(path, image_size=64, keep_full=True)
    assert lean.image.shape == full.image.shape == (64, 64) and lean.meta == full.meta
    assert np.array_equal(full.image, resize_area(read_dicom(path)[0], 64))  # from the full decode
    assert np.array_equal(lean.image, resize_area(read_dicom(path, min_size=64)[0], 64))  # decoder-scaled
    assert np.abs(lean.image.astype(int) - full.image.astype(int)).mean() < 1.0
