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


_SERVER = {}  # the running server's pid, to read its memory


def _peak_rss_mb() -> float:
    """The server process's peak resident memory so far (VmHWM), in MB."""
    status = open(f"/proc/{_SERVER['pid']}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


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
    _SERVER["pid"] = proc.pid
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
    r = httpx.post(f"{server}/predict?annotated=true",
                   json={"dicom_base64": base64.b64encode(dcm.read_bytes()).decode(), "filename": dcm.name},
                   timeout=30)
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
    from pneumo.deploy.serve import MAX_UPLOAD_BYTES

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


def _post_streamed(url, head: bytes, n_bytes: int, tail: bytes, content_type: str):
    """POST a body sent chunked (no Content-Length); the server may answer and close early."""
    def body():
        yield head
        chunk = b"0" * (1 << 20)
        for _ in range(n_bytes >> 20):
            yield chunk
        yield tail

    try:
        return httpx.post(url, content=body(), headers={"content-type": content_type}, timeout=120).status_code
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        return "closed"


@pytest.mark.parametrize("kind", ["multipart", "json"])
def test_chunked_upload_is_cut_at_the_byte_cap_not_read_whole(server, kind):
    from pneumo.limits import MAX_JSON_BODY_BYTES

    before = _peak_rss_mb()
    n = 3 * MAX_JSON_BODY_BYTES  # well over either cap; before the fix the server read it all
    if kind == "multipart":
        head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.dcm"\r\n\r\n'
        status = _post_streamed(f"{server}/predict", head, n, b"\r\n--b--\r\n", "multipart/form-data; boundary=b")
    else:
        status = _post_streamed(f"{server}/predict", b'{"dicom_base64": "', n, b'"}', "application/json")
    assert status in (413, "closed")
    assert _peak_rss_mb() - before < 0.6 * n / 2**20  # bounded by the cap, not by what was sent
    assert httpx.get(f"{server}/health").status_code == 200


def test_json_upload_takes_the_documented_upload_size(server):
    from pneumo.limits import MAX_UPLOAD_BYTES

    data = b"\0" * (MAX_UPLOAD_BYTES - 1024)  # base64 makes it 4/3 as long: it was refused at 48 MB
    r = httpx.post(f"{server}/predict", json={"dicom_base64": base64.b64encode(data).decode()}, timeout=120)
    assert r.status_code == 422, r.text  # read and judged (not a DICOM), not refused for its size


def test_decompression_bomb_upload_is_refused_quickly(server, synth_dir, tmp_path):
    from pneumo.data.synth import write_bomb

    bomb = tmp_path / "bomb.dcm"
    write_bomb(next((synth_dir / "stage_2_test_images").glob("*.dcm")), bomb, 14000, 14000)
    start = time.perf_counter()
    r = httpx.post(f"{server}/predict", files={"file": ("bomb.dcm", bomb.read_bytes(), "application/dicom")},
                   timeout=60)
    assert r.status_code == 422 and "over the limit" in r.json()["detail"]
    assert time.perf_counter() - start < 5


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
