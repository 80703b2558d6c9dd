import json
import subprocess
import sys

import numpy as np
import pydicom

from pneumo.data.validate import validate


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pneumo", *map(str, args)], capture_output=True, text=True)


def test_clean_synthetic_data_has_no_problems(synth_dir):
    report = validate(synth_dir, workers=1)
    assert report.usable and report.problems == []
    assert report.n_usable_train == 48 and report.n_test_images == 8


def test_reports_each_problem_file_by_file(data_copy):
    images = data_copy / "stage_2_train_images"
    files = sorted(images.glob("*.dcm"))
    (images / "notdicom.dcm").write_text("hello")
    files[0].write_bytes(files[0].read_bytes()[:400])  # truncated
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    ds.save_as(files[1])
    ds = pydicom.dcmread(files[2])
    ds.decompress()
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint8).tobytes()
    ds.save_as(files[2])  # blank
    labels = data_copy / "stage_2_train_labels.csv"
    text = labels.read_text().splitlines()
    text.append(text[1])  # duplicate row
    text.append("ghost-patient,,,,,0")  # label without image
    text.append(f"{files[3].stem},10,10,5000,20,1")  # box outside image, Target mixed
    labels.write_text("\n".join(text) + "\n")
    (images / "unlabelled-one.dcm").write_bytes(files[4].read_bytes())
    info = data_copy / "stage_2_detailed_class_info.csv"
    info.write_text(info.read_text().replace(",Normal\n", ",Healthy\n", 1))

    out = _run("validate", data_copy, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    by_kind = {}
    for p in doc["problems"]:
        assert set(p) == {"patientId", "path", "problem", "detail", "severity"}
        by_kind.setdefault(p["problem"], []).append(p)
    assert {"unreadable", "blank image", "duplicate row", "label without image", "box outside image",
            "image without labels", "inconsistent rows", "unknown class"} <= set(by_kind)
    unreadable = {p["patientId"] for p in by_kind["unreadable"]}
    assert {"notdicom", files[0].stem, files[1].stem} <= unreadable
    assert any("no pixel data" in p["detail"] for p in by_kind["unreadable"])
    assert by_kind["label without image"][0]["patientId"] == "ghost-patient"
    human = _run("validate", data_copy)
    assert human.returncode == 0 and "blank image" in human.stdout


def test_missing_labels_is_not_usable(data_copy):
    (data_copy / "stage_2_train_labels.csv").unlink()
    out = _run("validate", data_copy)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "stage_2_train_labels.csv" in out.stderr and "missing" in out.stderr


def test_missing_columns_and_missing_dir(data_copy, tmp_path):
    (data_copy / "stage_2_train_labels.csv").write_text("patientId,x\na,1\n")
    out = _run("validate", data_copy)
    assert out.returncode == 1 and "missing column(s)" in out.stderr
    out = _run("validate", tmp_path / "nowhere")
    assert out.returncode == 1 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_non_numeric_box_value_is_one_clear_line(data_copy, tmp_path):
    labels = data_copy / "stage_2_train_labels.csv"
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + ",abc,10,20,30,1"
    labels.write_text("\n".join(lines) + "\n")
    for command in (["validate", data_copy], ["prepare", data_copy, "--out", tmp_path / "p"]):
        out = _run(*command)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "line 4, column x: 'abc' is not a number" in out.stderr, out.stderr


def test_library_tracebacks_stay_off_the_screen(tmp_path):
    """pydicom logs a traceback when one decoder plugin fails and it tries the next: on pydicom's
    own test files `validate` showed "Traceback" from a run that succeeded."""
    import re
    import shutil
    from pathlib import Path

    images = tmp_path / "d" / "stage_2_train_images"
    images.mkdir(parents=True)
    for path in sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm")):
        shutil.copy(path, images / (re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) + ".dcm"))
    (tmp_path / "d" / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\n")
    out = _run("validate", tmp_path / "d")
    assert "unreadable" in out.stdout or "cannot decode" in out.stdout  # the bad files are reported
    assert "Traceback" not in out.stderr and "UserWarning" not in out.stderr, out.stderr[-2000:]
