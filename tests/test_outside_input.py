"""Property tests over every reader of outside input (Hypothesis): whatever a careless user or an
attacker hands pneumo, the answer is a valid result or one package error (PneumoError, or a 4xx
for HTTP), never another exception; valid input loses no row and invents none; no output path
leaves its directory."""

import io
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pneumo.errors import PneumoError

# tmp_path is shared by the examples of one test: each example writes its own file name
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

CSV_CELLS = st.one_of(st.text(max_size=12), st.sampled_from(["", "1e", "nan", "inf", "-inf", "-1", "0", "1e309",
                                                              "1", "0x10", " 3 ", "1,5", '"', "\n", "NULL"]))
PATIENT_IDS = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=12).filter(
    lambda s: s[0].isalnum())


def _write(tmp_path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


# ---------------------------------------------------------------- labels and submission CSVs


@PROPERTY
@given(header=st.lists(st.sampled_from(["patientId", "x", "y", "width", "height", "Target", "class", ""]),
                       max_size=7),
       rows=st.lists(st.lists(CSV_CELLS, max_size=7), max_size=6))
def test_any_labels_csv_reads_or_is_one_package_error(tmp_path, header, rows):
    from pneumo.data.layout import read_labels, read_labels_table

    text = "\n".join(",".join(r) for r in [header, *rows])
    path = _write(tmp_path, "labels.csv", text)
    for reader in (read_labels, read_labels_table):
        try:
            reader(path)
        except PneumoError:
            pass


@st.composite
def _labels(draw):
    """A valid labels table: per patient either one empty row (negative) or 1-4 boxes."""
    ids = draw(st.lists(PATIENT_IDS, min_size=1, max_size=8, unique=True))
    truth, lines = {}, ["patientId,x,y,width,height,Target"]
    for pid in ids:
        n = draw(st.integers(0, 4))
        boxes = [draw(st.tuples(*(st.integers(0, 900),) * 2, *(st.integers(1, 300),) * 2)) for _ in range(n)]
        boxes = list(dict.fromkeys(boxes))  # the same box twice is one box (a repeated row)
        truth[pid] = boxes
        lines += [f"{pid},{x},{y},{w},{h},1" for x, y, w, h in boxes] or [f"{pid},,,,,0"]
        if boxes and draw(st.booleans()):
            lines.append(lines[-1])  # a careless merge repeats a row
    return truth, "\n".join(lines) + "\n"


@PROPERTY
@given(labels=_labels())
@example(labels=({"NaN": [], "null": [(1, 2, 3, 4)]},  # found: pandas read these ids as missing
                 "patientId,x,y,width,height,Target\nNaN,,,,,0\nnull,1,2,3,4,1\n"))
def test_valid_labels_lose_no_row_and_invent_none(tmp_path, labels):
    from pneumo.data.layout import read_labels

    truth, text = labels
    read = read_labels(_write(tmp_path, "labels.csv", text))
    assert set(read) == set(truth)
    for pid, boxes in truth.items():
        assert sorted(map(tuple, read[pid].tolist())) == sorted(map(tuple, np.asarray(boxes, float).tolist()))


@PROPERTY
@given(labels=_labels())
def test_labels_scored_against_themselves_are_perfect(tmp_path, labels):
    from pneumo.data.submission import score_files

    truth, text = labels
    lines = ["patientId,PredictionString"] + [
        f"{pid}," + " ".join(f"0.9 {x} {y} {w} {h}" for x, y, w, h in boxes) for pid, boxes in truth.items()]
    score = score_files(_write(tmp_path, "sub.csv", "\n".join(lines) + "\n"), _write(tmp_path, "labels.csv", text))
    assert score.n_images == sum(1 for b in truth.values() if b)
    assert score.n_images == 0 or score.map == 1.0


@PROPERTY
@given(text=st.one_of(st.text(max_size=80), st.lists(CSV_CELLS, max_size=12).map(" ".join)))
def test_any_prediction_string_parses_or_is_a_value_error(text):
    from pneumo.boxes import parse_prediction_string

    try:
        boxes, conf = parse_prediction_string(text)
    except ValueError:
        return
    assert boxes.shape == (len(conf), 4) and np.isfinite(boxes).all() and (boxes[:, 2:] >= 0).all()


@PROPERTY
@given(boxes=st.lists(st.tuples(*(st.floats(0, 2000, allow_nan=False),) * 2, *(st.floats(0, 2000),) * 2,
                                st.floats(0, 1)), max_size=6))
def test_prediction_strings_round_trip(boxes):
    from pneumo.boxes import format_prediction_string, parse_prediction_string

    text = format_prediction_string([b[:4] for b in boxes], [b[4] for b in boxes])
    parsed, conf = parse_prediction_string(text)
    assert len(parsed) == len(boxes)  # a box is never lost or invented by the round trip


@PROPERTY
@given(rows=st.lists(st.tuples(st.one_of(PATIENT_IDS, CSV_CELLS), CSV_CELLS), max_size=6),
       header=st.sampled_from(["patientId,PredictionString", "patientId", "PredictionString,patientId", ""]))
def test_any_submission_csv_reads_or_is_one_package_error(tmp_path, rows, header):
    from pneumo.data.submission import read_submission

    text = "\n".join([header, *(f"{a},{b}" for a, b in rows)])
    try:
        read_submission(_write(tmp_path, "sub.csv", text))
    except PneumoError:
        pass


# ---------------------------------------------------------------- DICOM headers and file names


@pytest.fixture(scope="module")
def small_dicom(tmp_path_factory) -> bytes:
    from pneumo.data.synth import make_dataset

    root = tmp_path_factory.mktemp("one")
    make_dataset(root, n_train=1, n_test=1, seed=3, size=64, workers=1)
    return next((root / "stage_2_train_images").glob("*.dcm")).read_bytes()


@PROPERTY
@given(data=st.data())
def test_a_garbled_dicom_decodes_or_is_one_dicom_error(tmp_path, small_dicom, data):
    from pneumo.data.dicom import read_dicom
    from pneumo.errors import DicomError

    raw = bytearray(small_dicom)
    for _ in range(data.draw(st.integers(1, 8))):  # overwrite a few bytes anywhere, header included
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at:at + 4] = data.draw(st.binary(min_size=1, max_size=4))
    cut = data.draw(st.integers(0, len(raw)))
    path = _write(tmp_path, "x.dcm", bytes(raw[:cut] if data.draw(st.booleans()) else raw))
    try:
        image, meta = read_dicom(path)
    except DicomError:
        return
    assert image.dtype == np.uint8 and image.shape == (meta.rows, meta.columns)


def test_an_odd_length_bits_stored_is_one_dicom_error(tmp_path, small_dicom):
    # found by the property test above: pydicom raises its own BytesLengthException for it
    from pneumo.data.dicom import read_dicom, read_meta
    from pneumo.errors import DicomError

    bits_stored = b"(\x00\x01\x01US\x02\x00\x08\x00"
    assert small_dicom.count(bits_stored) == 1
    path = _write(tmp_path, "x.dcm", small_dicom.replace(bits_stored, b"(\x00\x01\x01US\x03\x00\x08\x00\x00"))
    for read in (read_dicom, read_meta):
        with pytest.raises(DicomError, match="x.dcm.*invalid DICOM header value"):
            read(path)


@PROPERTY
@given(rows=st.integers(0, 65535), columns=st.integers(0, 65535), bits=st.sampled_from([1, 8, 12, 16, 32]),
       stored=st.integers(0, 40), photometric=st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", ""]),
       frames=st.sampled_from([None, "1", "2", "x", ""]), pixels=st.binary(max_size=4096))
def test_any_uncompressed_header_decodes_or_is_one_dicom_error(tmp_path, rows, columns, bits, stored, photometric,
                                                                  frames, pixels):
    from pydicom import config
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from pneumo.data.dicom import read_dicom
    from pneumo.errors import DicomError

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE  # write what a broken exporter writes
    try:
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = rows, columns, bits, stored
        ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = max(stored - 1, 0), 0, 1
        ds.PhotometricInterpretation = photometric
        if frames is not None:
            ds.NumberOfFrames = "97" if frames == "x" else frames  # pydicom cannot write "x": patched below
        ds.PixelData = pixels + b"\0" * (len(pixels) % 2)
        path = tmp_path / "h.dcm"
        ds.save_as(path, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = mode
    path.write_bytes(path.read_bytes().replace(b"\x28\x00\x08\x00IS\x02\x0097", b"\x28\x00\x08\x00IS\x02\x00x "))
    try:
        image, info = read_dicom(path)
    except DicomError:
        return
    assert image.dtype == np.uint8 and image.shape == (info.rows, info.columns) == (rows, columns)


FILE_NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1,
                     max_size=60).filter(lambda s: s not in (".", "..") and len(s.encode()) < 250)


@PROPERTY
@given(name=FILE_NAMES)
def test_any_file_name_is_decoded_or_reported_and_outputs_stay_inside(tmp_path, small_dicom, name):
    from pneumo.boxes import check_patient_id
    from pneumo.data.layout import decode_file

    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(small_dicom)
    try:
        item = decode_file(path, 32)
    finally:
        path.unlink()
    assert (item.error is None) == _valid_id(check_patient_id, path.stem)
    if item.error is None:  # the patientId becomes output names: they stay inside the output directory
        out = tmp_path / "out"
        for output in (out / "images" / f"{item.patientId}.png", out / "sr" / f"{item.patientId}.dcm"):
            assert output.resolve().parent.parent == out.resolve()


def _valid_id(check, pid) -> bool:
    try:
        check(pid)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- params YAML


YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=10), st.sampled_from(["1e-3", "adamw", "sgd", "~", "inf", ".nan"]))
TRAIN_KEYS = st.sampled_from(["lr", "optimizer", "epochs", "image_size", "batch_size", "threshold", "data_dir",
                              "seed", "width", "depth", "head", "postprocess", "unknown_key", "max_time"])


@PROPERTY
@given(values=st.one_of(st.dictionaries(TRAIN_KEYS, st.one_of(YAML_SCALARS, st.lists(YAML_SCALARS, max_size=2)),
                                        max_size=6), YAML_SCALARS, st.lists(YAML_SCALARS, max_size=3)),
       garbage=st.text(max_size=30))
@example(values={}, garbage="?")  # found: "?" is {None: None}, and naming the null key raised TypeError
def test_any_params_yaml_is_a_config_or_one_config_error(tmp_path, values, garbage):
    import yaml

    from pneumo.config import load_config

    for text in (yaml.safe_dump(values), garbage):
        path = _write(tmp_path, "params.yaml", text)
        try:
            load_config(path)
        except PneumoError:
            pass


NESTED = st.recursive(YAML_SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=40)
NON_FINITE = st.sampled_from([".inf", "-.inf", ".nan", ".NaN", "1e999", "-1e999"])


@st.composite
def _anchored(draw):
    """YAML whose anchors stand for width ** depth items ("billion laughs" when both are large)."""
    width, depth = draw(st.integers(1, 12)), draw(st.integers(1, 9))
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + f"\n{draw(TRAIN_KEYS)}: *a{depth - 1}\n", width ** depth


@PROPERTY
@given(key=TRAIN_KEYS, value=st.one_of(NESTED, NON_FINITE.map(lambda text: ("raw", text))), anchored=_anchored())
def test_nesting_size_and_non_finite_numbers_cost_nothing_and_are_one_line(tmp_path, key, value, anchored):
    """Any nesting, a YAML anchor bomb or a non-finite number in a params file: a TrainConfig whose
    numbers are all finite, or one ConfigError line of bounded length, in well under a second."""
    import math
    import time

    import yaml

    from pneumo.config import load_config

    text = f"{key}: {value[1]}\n" if isinstance(value, tuple) else yaml.safe_dump({key: value})
    for document in (text, anchored[0]):
        path = _write(tmp_path, "params.yaml", document)
        start = time.perf_counter()
        try:
            config = load_config(path)
        except PneumoError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)[:2000]
        else:
            assert all(math.isfinite(v) for v in config.to_dict().values() if isinstance(v, float))
        assert time.perf_counter() - start < 2  # the anchored bomb is refused before anything formats it


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    import torch

    return torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)


MODEL_NUMBERS = st.one_of(st.integers(-10, 10**12), st.floats(allow_nan=True, allow_infinity=True), NESTED)


@settings(PROPERTY, max_examples=40)  # each example saves and loads a checkpoint
@given(config=st.dictionaries(st.sampled_from(["width", "depth", "image_size", "threshold", "min_box_area", "head",
                                               "encoder", "classifier", "lr"]), MODEL_NUMBERS, max_size=3),
       postprocess=st.dictionaries(st.sampled_from(["threshold", "min_box_area", "max_boxes", "gate", "merge"]),
                                   MODEL_NUMBERS, max_size=3))
def test_a_model_file_with_any_config_loads_or_is_one_model_error(tmp_path, checkpoint, config, postprocess):
    """A checkpoint's own config and post-processing, hostile or careless (huge sizes, nesting,
    non-finite numbers): the predictor loads or the load is one PneumoError, cheaply."""
    import copy
    import time

    import torch

    from pneumo.deploy.predict import load_predictor

    ckpt = copy.deepcopy(checkpoint)
    ckpt["hyper_parameters"]["config"].update(config)
    ckpt.setdefault("pneumo", {}).setdefault("postprocess", {}).update(postprocess)
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path)
    start = time.perf_counter()
    try:
        load_predictor(path, device="cpu")
    except PneumoError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000
    assert time.perf_counter() - start < 10  # never builds a network the weights do not fit


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=4), max_leaves=30)


# ---------------------------------------------------------------- HTTP uploads


@pytest.fixture(scope="module")
def upload_client():
    """pneumo.deploy.serve's upload reader behind a minimal app (the model plays no part in reading)."""
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from pneumo.deploy.serve import read_upload

    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request):
        data, filename = await read_upload(request)
        return {"n": len(data), "filename": filename}

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@PROPERTY
@given(body=st.one_of(st.binary(max_size=2000), st.text(max_size=200).map(str.encode)),
       content_type=st.one_of(st.sampled_from(["multipart/form-data; boundary=b", "multipart/form-data",
                                               "application/json", "text/plain", "", "multipart/form-data; boundary="]),
                              st.text(max_size=30)),
       length=st.one_of(st.none(), st.sampled_from(["0", "-1", "abc", "99999999999", "10"])))
def test_any_upload_is_read_or_refused_with_a_4xx(upload_client, body, content_type, length):
    headers = {"content-type": content_type}
    if length is not None:
        headers["content-length"] = length
    assume(all(c in string.printable and c not in "\r\n" for c in content_type))
    try:
        r = upload_client.post("/upload", content=body, headers=headers)
    except Exception:  # the client itself may refuse a lying Content-Length before sending
        return
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)


@PROPERTY
@given(payload=st.one_of(st.binary(max_size=500), st.text(max_size=100).map(str.encode)),
       filename=st.text(max_size=40), field=st.sampled_from(["file", "other"]))
def test_any_multipart_upload_gives_back_exactly_its_bytes_or_a_4xx(upload_client, payload, filename, field):
    r = upload_client.post("/upload", files={field: (filename, io.BytesIO(payload), "application/dicom")})
    if field != "file" or not filename:  # a part without a filename is a form field, not a file
        assert r.status_code == 400 and "file part named 'file'" in r.text
        return
    assert r.status_code == 200, r.text
    assert r.json()["n"] == len(payload)  # nothing lost, nothing added


@settings(PROPERTY, max_examples=60)
@given(extra=st.dictionaries(st.sampled_from(["filename", "patientId", "x"]), JSON_VALUES, max_size=3),
       payload=st.binary(max_size=200), depth=st.integers(0, 3000), literal=st.sampled_from(["NaN", "Infinity", "1"]))
def test_any_json_upload_is_read_or_refused_with_a_4xx(upload_client, extra, payload, depth, literal):
    """JSON uploads with nesting, size and non-finite numbers (NaN and Infinity literals, which
    Python's json accepts) beside the DICOM: read, or a 4xx with the reason; never a 500."""
    import base64
    import json

    body = json.dumps({"dicom_base64": base64.b64encode(payload).decode(), **extra})
    nested = "[" * depth + literal + "]" * depth
    for text in (body, body[:-1] + f', "deep": {nested}}}'):
        r = upload_client.post("/upload", content=text.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        if r.status_code == 200:
            assert r.json()["n"] == len(payload)
