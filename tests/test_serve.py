"""pneumo serve against a real uvicorn server on loopback, with a real HTTP client."""

import base64
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

# the server loads tiny_run, a model trained for the session (conftest.py)
pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pneumo", "serve", str(tiny_run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(proc.stdout.read().decode()[-2000:])
    yield url
    proc.terminate()
    proc.wait(10)


def test_health_and_model_card(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    card = httpx.get(f"{server}/model").json()
    assert card["image_size"] == 64 and 0 < card["threshold"] < 1 and card["params"]["optimizer"] == "adamw"


def test_predict_multipart_and_json(server, synth_dir):
    dcm = next((synth_dir / "stage_2_test_images").glob("*.dcm"))
    r = httpx.post(f"{server}/predict", files={"file": (dcm.name, dcm.read_bytes(), "application/dicom")}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["patientId"] == dcm.stem and body["image_size"] == [256, 256] and isinstance(body["boxes"], list)
    assert body["model"]
    r = httpx.post(f"{server}/predict?annotated=true", json={"dicom_base64": base64.b64encode(dcm.read_bytes()).decode(),
                                                            "filename": dcm.name}, timeout=30)
    assert r.status_code == 200
    assert base64.b64decode(r.json()["annotated_png_base64"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_uploads_get_4xx_and_service_keeps_serving(server, synth_dir):
    dcm = next((synth_dir / "stage_2_test_images").glob("*.dcm"))
    cases = [
        httpx.post(f"{server}/predict", files={"file": ("x.dcm", b"not dicom", "application/dicom")}),
        httpx.post(f"{server}/predict", files={"file": ("t.dcm", dcm.read_bytes()[:500], "application/dicom")}),
        httpx.post(f"{server}/predict", files={"file": ("e.dcm", b"", "application/dicom")}),
        httpx.post(f"{server}/predict", files={"other": ("x.dcm", b"abc", "application/dicom")}),
        httpx.post(f"{server}/predict", json={"dicom_base64": "%%%"}),
        httpx.post(f"{server}/predict", content=b"raw", headers={"content-type": "text/plain"}),
    ]
    assert [r.status_code for r in cases] == [422, 422, 400, 400, 400, 415]
    assert "not a DICOM file" in cases[0].json()["detail"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_oversized_upload_is_refused(server):
    from pneumo.serve import MAX_UPLOAD_BYTES

    big = b"0" * (MAX_UPLOAD_BYTES + 2 * 1024 * 1024)
    r = httpx.post(f"{server}/predict", files={"file": ("big.dcm", big, "application/dicom")}, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_concurrent_requests(server, synth_dir):
    files = sorted((synth_dir / "stage_2_test_images").glob("*.dcm"))

    def post(path):
        return httpx.post(f"{server}/predict", files={"file": (path.name, path.read_bytes(), "application/dicom")},
                          timeout=60)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, files))
    assert [r.status_code for r in responses] == [200] * len(files)
    assert sorted(r.json()["patientId"] for r in responses) == sorted(p.stem for p in files)


def test_predict_as_dicom_sr(server, synth_dir, tmp_path):
    import io

    import pydicom

    from test_sr import read_report

    dcm = sorted((synth_dir / "stage_2_test_images").glob("*.dcm"))[1]
    upload = {"file": (dcm.name, dcm.read_bytes(), "application/dicom")}
    boxes = httpx.post(f"{server}/predict", files=upload, timeout=30).json()["boxes"]
    r = httpx.post(f"{server}/predict?format=sr", files=upload, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    assert "x-pneumo-warnings" not in r.headers
    (tmp_path / "sr.dcm").write_bytes(r.content)
    got, confidences, evaluation, references, _ = read_report(tmp_path / "sr.dcm")
    expected = [[b["x"], b["y"], b["width"], b["height"]] for b in boxes]
    assert got.tolist() == pytest.approx(expected, abs=0.5) and evaluation == ("Present" if boxes else "Absent")
    assert references == {pydicom.dcmread(dcm).SOPInstanceUID}
    ds = pydicom.dcmread(dcm)
    del ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf)
    r = httpx.post(f"{server}/predict?format=sr", files={"file": ("x.dcm", buf.getvalue(), "application/dicom")},
                   timeout=30)
    assert r.status_code == 200 and "SOPInstanceUID missing" in r.headers["x-pneumo-warnings"]
    assert httpx.post(f"{server}/predict?format=xml", files=upload, timeout=30).status_code == 400
