import pickle
import sys

import numpy as np
import pandas as pd
import pytest

from pneumo.data.dicom import read_dicom, resize_area
from pneumo.data.prepare import open_prepared, prepare, split_patients
from pneumo.errors import ConfigError, DataError


def test_prepare_writes_features_boxes_and_cache(synth_dir, tmp_path):
    out = tmp_path / "prep"
    prepared = prepare(synth_dir, out=out, image_size=64, val_fraction=0.25, seed=1, workers=2)
    f = prepared.features
    assert list(f.columns[:8]) == ["patientId", "PatientSex", "PatientAge", "ViewPosition", "Target", "class",
                                   "rows", "columns"]
    assert {"n_boxes", "split", "index"} <= set(f.columns)
    images = prepared.images()
    assert images.shape == (48, 64, 64) and images.dtype == np.uint8
    # row i of the cache is the area-resized DICOM of features row i (decoded at the model size)
    row = f.iloc[5]
    image, _ = read_dicom(synth_dir / "stage_2_train_images" / f"{row.patientId}.dcm", min_size=64)
    assert np.array_equal(images[row["index"]], resize_area(image, 64))
    labels = pd.read_csv(synth_dir / "stage_2_train_labels.csv")
    assert len(prepared.boxes) == labels["Target"].sum()
    assert (f.groupby("class")["split"].apply(lambda s: (s == "val").sum()) >= 1).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_rerun_reuses_cache_and_changes_rebuild(data_copy, tmp_path):
    out = tmp_path / "prep"
    first = prepare(data_copy, out=out, image_size=32, workers=1)
    mtime = (out / "images.npy").stat().st_mtime_ns
    again = prepare(data_copy, out=out, image_size=32, workers=1)
    assert (out / "images.npy").stat().st_mtime_ns == mtime
    assert again.manifest["fingerprint"] == first.manifest["fingerprint"]
    victim = next((data_copy / "stage_2_train_images").glob("*.dcm"))
    victim.write_bytes(b"broken")
    rebuilt = prepare(data_copy, out=out, image_size=32, workers=1)
    assert rebuilt.manifest["fingerprint"] != first.manifest["fingerprint"]
    assert len(rebuilt.features) == 47 and victim.stem not in set(rebuilt.features["patientId"])
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["patientId"].tolist() == [victim.stem] and "not a DICOM" in skipped["reason"][0]
    assert rebuilt.images().shape[0] == 47


def test_default_out_is_named_by_fingerprint(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMO_OUTPUTS", str(tmp_path / "outputs"))
    prepared = prepare(synth_dir, image_size=32, workers=1)
    assert prepared.root == tmp_path / "outputs" / "data" / prepared.manifest["fingerprint"]
    assert open_prepared(prepared.root).manifest == prepared.manifest


def test_split_is_stratified_and_seeded():
    classes = {f"p{i}": ("A" if i < 30 else "B") for i in range(100)}
    s1, s2 = split_patients(classes, 0.2, 0), split_patients(classes, 0.2, 0)
    assert s1 == s2 and s1 != split_patients(classes, 0.2, 1)
    assert sum(v == "val" for k, v in s1.items() if classes[k] == "A") == 6
    assert sum(v == "val" for k, v in s1.items() if classes[k] == "B") == 14


def test_bad_arguments(synth_dir, tmp_path):
    with pytest.raises(DataError, match="image size"):
        prepare(synth_dir, out=tmp_path / "x", image_size=4)
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "missing", out=tmp_path / "x")


def test_labelled_file_with_another_suffix_is_decoded_or_listed(data_copy, tmp_path):
    images = data_copy / "stage_2_train_images"
    first, second = sorted(images.glob("*.dcm"))[:2]
    first.rename(first.with_suffix(".DCM"))  # a real DICOM with an upper-case suffix: still used
    second.rename(second.with_suffix(".txt"))
    second.with_suffix(".txt").write_text("not an image")
    prepared = prepare(data_copy, out=tmp_path / "p", image_size=32, workers=1)
    assert first.stem in set(prepared.features["patientId"])
    skipped = pd.read_csv(tmp_path / "p" / "skipped.csv")
    assert skipped["patientId"].tolist() == [second.stem]  # not silently dropped


def test_defaults_and_range_are_the_training_ones(synth_dir, tmp_path):
    import inspect

    from pneumo.config import IMAGE_SIZE_RANGE, TrainConfig

    defaults = {k: p.default for k, p in inspect.signature(prepare).parameters.items()}
    assert defaults["image_size"] == TrainConfig().image_size
    assert (defaults["val_fraction"], defaults["seed"]) == (TrainConfig().val_fraction, TrainConfig().seed)
    low, high = IMAGE_SIZE_RANGE
    for size in (low - 1, high + 1):  # sizes a run could not train on are refused before decoding
        with pytest.raises(DataError, match=f"between {low} and {high}"):
            prepare(synth_dir, out=tmp_path / "x", image_size=size)
    with pytest.raises(ConfigError):
        TrainConfig(image_size=high * 2)


def test_out_holding_other_data_is_refused_and_nothing_deleted(data_copy, tmp_path):
    outputs = tmp_path / "outputs"  # what `sweep --out outputs` fills: prepare must not replace it
    (outputs / "models" / "m" / "v1").mkdir(parents=True)
    (outputs / "models" / "m" / "v1" / "model.ckpt").write_bytes(b"weights")
    with pytest.raises(DataError, match="holds other data.*models"):
        prepare(data_copy, out=outputs, image_size=32, workers=1)
    assert (outputs / "models" / "m" / "v1" / "model.ckpt").read_bytes() == b"weights"
    n_files = len(list(data_copy.rglob("*")))
    for out in (data_copy, data_copy.parent):  # the data set itself, or a folder holding it
        with pytest.raises(DataError, match="holds the data directory"):
            prepare(data_copy, out=out, image_size=32, workers=1)
    assert len(list(data_copy.rglob("*"))) == n_files
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        prepare(data_copy, out=tmp_path / "a-file", image_size=32, workers=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(prepare(data_copy, out=empty, image_size=32, workers=1).features) == 48
    # its own earlier output is rebuilt in place (--force)
    assert len(prepare(data_copy, out=empty, image_size=32, workers=1, force=True).features) == 48


def test_bad_label_rows_skip_their_patient_with_the_reason(data_copy, tmp_path):
    labels = pd.read_csv(data_copy / "stage_2_train_labels.csv", dtype={"patientId": str})
    positives = labels[labels["Target"] == 1]["patientId"].unique()
    negatives = labels[labels["Target"] == 0]["patientId"].unique()
    labels["Target"] = labels["Target"].astype(object)
    labels.loc[labels["patientId"] == negatives[0], "Target"] = None  # empty Target
    labels.loc[labels["patientId"] == positives[0], "width"] = -30.0
    labels.loc[labels["patientId"] == positives[1], "height"] = float("inf")
    labels.to_csv(data_copy / "stage_2_train_labels.csv", index=False)
    prepared = prepare(data_copy, out=tmp_path / "prep", image_size=32, workers=1)
    skipped = pd.read_csv(tmp_path / "prep" / "skipped.csv").set_index("patientId")["reason"]
    assert "Target" in skipped[negatives[0]] and "positive" in skipped[positives[0]]
    assert "not finite" in skipped[positives[1]]
    assert len(prepared.features) == 45 and np.isfinite(prepared.boxes[["width", "height"]].to_numpy()).all()


def test_header_only_labels_is_one_clear_error(data_copy, tmp_path):
    (data_copy / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\n")
    with pytest.raises(DataError, match="no labelled"):
        prepare(data_copy, out=tmp_path / "prep", image_size=32, workers=1)


def _rss_file_kb() -> int:
    """Resident file-backed pages of this process (Linux /proc)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_cache_rows_answer_like_the_array(tmp_path):
    from pneumo.data.prepare import CacheRows

    array = np.random.default_rng(0).integers(0, 255, (10, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "images.npy", array)
    rows = CacheRows(tmp_path / "images.npy")
    assert len(rows) == 10 and rows.shape == (10, 6, 6) and rows.dtype == np.uint8
    for key in (3, -1, np.int64(7), slice(2, 9, 3), slice(None), [5, 6, 7, 1, 1, 9], np.array([0, 2, 3]), []):
        assert np.array_equal(rows[key], array[key]), key
    assert np.array_equal(np.asarray(rows), array)
    assert np.array_equal(pickle.loads(pickle.dumps(rows))[[4, 5]], array[[4, 5]])  # spawned loader workers
    with pytest.raises(IndexError):
        rows[[10]]
    for key in (array[:, 0, 0] > 100, (1, 2), [[1, 2]], [1.5]):  # masks, tuples, 2-D or float lists: refused
        with pytest.raises(TypeError):
            rows[key]
    (tmp_path / "cut.npy").write_bytes((tmp_path / "images.npy").read_bytes()[:-40])
    with pytest.raises(DataError, match="unreadable cache"):
        CacheRows(tmp_path / "cut.npy")
    cut_later = CacheRows(tmp_path / "images.npy")
    with open(tmp_path / "images.npy", "r+b") as f:  # cut after it was opened
        f.truncate(len(f.read()) - 40)
    with pytest.raises(DataError, match="truncated cache"):
        cut_later[9]


def test_cache_rows_keep_reading_the_file_they_opened(tmp_path):
    # prepare may replace the cache while a loader's workers still read it: forked workers share
    # the open file, and a copy sent to a spawned worker refuses a different file
    from pneumo.data.prepare import CacheRows

    path = tmp_path / "images.npy"
    np.save(path, np.full((4, 3, 3), 1, dtype=np.uint8))
    rows = CacheRows(path)
    sent = pickle.dumps(rows)
    np.save(tmp_path / "new.npy", np.full((4, 3, 3), 2, dtype=np.uint8))
    (tmp_path / "new.npy").replace(path)
    assert (rows[[0, 1, 2, 3]] == 1).all()  # still the file it opened
    with pytest.raises(DataError, match="replaced since it was opened"):
        pickle.loads(sent)[0]
    assert (CacheRows(path)[0] == 2).all()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reading_the_whole_cache_does_not_grow_resident_memory(tmp_path):
    # an epoch reads every row: through a memory map each page would stay resident in the process
    from pneumo.data.prepare import CacheRows

    path = tmp_path / "images.npy"
    np.save(path, np.full((256, 256, 256), 7, dtype=np.uint8))  # 16 MiB
    rows = CacheRows(path)
    before = _rss_file_kb()
    total = sum(int(rows[list(range(i, i + 16))][:, 0, 0].sum()) for i in range(0, 256, 16))
    assert total == 7 * 256
    assert _rss_file_kb() - before < 4 * 1024
    mapped = np.load(path, mmap_mode="r")
    before = _rss_file_kb()
    assert int(sum(int(mapped[i:i + 16].sum() > 0) for i in range(0, 256, 16))) == 16
    assert _rss_file_kb() - before > 12 * 1024  # the same reads through the map: the whole file resident
