"""The serve load check (`nox -s bench -- serve`): 200 requests from 16 clients at a real
`pneumo serve` on 127.0.0.1, mixing good, bad, truncated, decompression-bomb and large 16-bit
uploads, after 8 maximum-size JSON uploads at once, all of it while 31 idle connections and 2
uploads trickling a byte every 5 s try to hold the server. Every request must be answered (good
ones with the boxes a lone request gets, the others with a 4xx), /health within a second
throughout, the trickling uploads with 408 at pneumo.limits.BODY_TIMEOUT_S, and the server's
memory must stay under the bound pneumo.limits states. Reports requests/s, p50/p99 latency,
/health latency in each phase and the server's peak RSS.

    python benchmarks/serve_load.py [--requests N] [--clients C] [--out DIR]   # a smaller run
"""

from __future__ import annotations

import base64
import json
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

N_REQUESTS, N_CLIENTS = 200, 16


def _model_and_files(root: Path) -> tuple[Path, dict[str, list[Path]]]:
    """A tiny model (what is measured is serving, not accuracy) and the upload files by kind."""
    from pneumo.config import TrainConfig
    from pneumo.data.synth import make_dataset, write_bomb
    from pneumo.training.fit import fit
    from pneumo.training.rundir import RunDir

    data, run = root / "data", root / "run"
    if not (data / "pneumo-synth.json").is_file() or not (data / "stage_2_train_labels.csv").is_file():
        make_dataset(data, n_train=24, n_test=12, seed=5)  # RSNA size: 1024 x 1024 JPEG Baseline
    if not RunDir(run).best_checkpoint.is_file():
        fit(TrainConfig(data_dir=str(data), epochs=1, image_size=64, depth=3, width=4, batch_size=8, n_val_images=2),
            run)
    good = sorted((data / "stage_2_test_images").glob("*.dcm"))
    files = root / "uploads"
    files.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    (files / "bad.dcm").write_bytes(rng.bytes(50_000))
    (files / "truncated.dcm").write_bytes(good[0].read_bytes()[:3000])
    write_bomb(good[1], files / "bomb.dcm", 14000, 14000)
    write_bomb(good[2], files / "bomb-jpeg-only.dcm", 14000, 14000, in_header=False)
    large = files / "large16.dcm"  # a large detector's 16-bit image: 18 MB, decoded at once by few
    if not large.is_file():
        _write_16_bit(large, rng.integers(0, 4096, (3000, 3000), dtype=np.uint16))
    return run, {"good": good, "bad": [files / "bad.dcm", files / "truncated.dcm"],
                 "bomb": [files / "bomb.dcm", files / "bomb-jpeg-only.dcm"], "large": [large]}


def _write_16_bit(path: Path, pixels: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _memory_mb(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss_mb": round(field["VmRSS"] / 1024, 1), "peak_rss_mb": round(field["VmHWM"] / 1024, 1)}


def _start(run: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pneumo", "serve", str(run), "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("pneumo serve did not start")


class Holders:
    """31 idle connections (opened again whenever the server closes one) and 2 JSON uploads that
    send a byte every 5 s (started again when answered): the clients that once held the server."""

    def __init__(self, port: int, n_idle: int = 31, n_trickling: int = 2):
        self.port, self.n_idle, self.stop = port, n_idle, threading.Event()
        self.idle_closed, self.trickle_answers = 0, []
        self.threads = [threading.Thread(target=self._idle, daemon=True)]
        self.threads += [threading.Thread(target=self._trickle, daemon=True) for _ in range(n_trickling)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port))

    def _idle(self):
        socks = [self._connect() for _ in range(self.n_idle)]
        while not self.stop.wait(0.5):
            readable, _, _ = select.select(socks, [], [], 0)
            for s in readable:  # readable and empty: the server closed it
                if not s.recv(100):
                    s.close()
                    socks[socks.index(s)] = self._connect()
                    self.idle_closed += 1
        for s in socks:
            s.close()

    def _trickle(self):
        while not self.stop.is_set():
            with self._connect() as s:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000000\r\n\r\n{\"dicom_base64\": \"")
                t0, answer = time.perf_counter(), b""
                while not answer and not self.stop.is_set():
                    if select.select([s], [], [], 5)[0]:
                        answer = s.recv(200) or b"(closed)"
                    else:
                        s.sendall(b"A")
                if answer:
                    self.trickle_answers.append({"answer": answer.split(b"\r\n")[0].decode(errors="replace"),
                                                 "after_s": round(time.perf_counter() - t0, 1)})


_PROBE = """
import sys, time, httpx
while True:
    t0, start = time.time(), time.perf_counter()
    try:
        status = httpx.get(sys.argv[1] + "/health", timeout=10).status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    print(t0, status, time.perf_counter() - start, flush=True)
    time.sleep(0.2)
"""


class HealthProbe:
    """GET /health on a new connection every 0.2 s, as a monitor would, from a process of its own
    (in this one, the clients' threads would delay it more than the server does), by phase."""

    def __init__(self, url: str, log: Path):
        self.url, self.log, self.marks = url, log, []

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _PROBE, self.url], stdout=self.log.open("w"))
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)

    def phase(self, name: str) -> None:
        self.marks.append((time.time(), name))

    def report(self) -> dict:
        samples = {}
        for line in self.log.read_text().splitlines():
            t0, status, seconds = line.split()
            phase = [name for t, name in self.marks if t <= float(t0)]
            if phase and phase[-1] != "end":
                samples.setdefault(phase[-1], []).append((status, float(seconds)))
        out = {}
        for phase, got in samples.items():
            ms = np.array([s for _, s in got]) * 1000
            bad = sorted({st for st, _ in got if st != "200"})
            out[phase] = {"n": len(ms), "not_200": sum(st != "200" for st, _ in got), "answers_not_200": bad,
                          "ms_p50": round(float(np.percentile(ms, 50)), 1),
                          "ms_p99": round(float(np.percentile(ms, 99)), 1), "ms_max": round(float(ms.max()), 1)}
        return out


def _json_uploads(url: str, n: int) -> dict:
    """n maximum-size JSON uploads at once (random bytes: read, decoded, refused 422 as not DICOM)."""
    import httpx

    from pneumo.limits import MAX_UPLOAD_BYTES

    text = base64.b64encode(np.random.default_rng(1).bytes(MAX_UPLOAD_BYTES - 4096))
    body = b'{"filename": "big.dcm", "dicom_base64": "' + text + b'"}'
    del text

    def post(_):
        t0 = time.perf_counter()
        try:
            status = httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/json"},
                                timeout=600).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        return status, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(post, range(n)))
    return {"n": n, "body_mb": round(len(body) / 2**20, 1), "statuses": sorted(str(s) for s, _ in results),
            "wall_s": round(time.perf_counter() - t0, 1)}


def _mixed_load(url: str, files: dict, expected: dict, n_requests: int, n_clients: int) -> dict:
    import httpx

    kinds = (["good"] * 12 + ["bad"] * 4 + ["bomb"] * 3 + ["large"]) * max(1, n_requests // 20)
    random.Random(0).shuffle(kinds)
    jobs = [(kind, files[kind][i % len(files[kind])]) for i, kind in enumerate(kinds)]
    local, clients = threading.local(), []

    def post(i):  # each client thread keeps one connection, as one user would
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=300)
            clients.append(local.client)
        kind, path = jobs[i]
        t0 = time.perf_counter()
        r = local.client.post(f"{url}/predict", files={"file": (path.name, path.read_bytes(), "application/dicom")})
        try:
            body = r.json()
        except ValueError:
            body = {"text": r.text[:200]}
        return kind, path.name, r.status_code, body, time.perf_counter() - t0

    cpu0, t0 = os.times(), time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(post, range(len(jobs))))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    wrong = [(k, n, s, str(body)[:120]) for k, n, s, body, _ in results
             if (k in ("good", "large") and s != 200) or (k in ("bad", "bomb") and s != 422)
             or (k == "good" and body.get("boxes") != expected[n])]
    latency = np.array([r[4] for r in results]) * 1000
    return {"requests": len(jobs), "clients": n_clients, "answered": len(results), "wrong": wrong[:10],
            "n_wrong": len(wrong), "mix": {k: kinds.count(k) for k in sorted(set(kinds))},
            "requests_per_s": round(len(jobs) / wall, 2), "latency_ms_p50": round(float(np.percentile(latency, 50)), 1),
            "latency_ms_p99": round(float(np.percentile(latency, 99)), 1), "wall_s": round(wall, 1),
            "client_cpu_s": round(sum(os.times()[:2]) - sum(cpu0[:2]), 1)}


def run_load(root: Path, n_requests: int = N_REQUESTS, n_clients: int = N_CLIENTS, n_json: int = 8) -> dict:
    import httpx

    from pneumo.limits import BODY_TIMEOUT_S, SERVE_MEMORY_BYTES

    root.mkdir(parents=True, exist_ok=True)
    run, files = _model_and_files(root)
    proc, url = _start(run, root / "serve.log")
    try:
        expected = {}  # what a lone request gets for each good file, before anyone holds the server
        with httpx.Client(timeout=120) as client:
            for path in files["good"]:
                r = client.post(f"{url}/predict", files={"file": (path.name, path.read_bytes(), "application/dicom")})
                expected[path.name] = r.json()["boxes"]
        idle = _memory_mb(proc.pid)
        with Holders(int(url.rsplit(":", 1)[1])) as holders, HealthProbe(url, root / "health.log") as probe:
            probe.phase("idle_and_trickling")
            time.sleep(5)
            probe.phase("json_uploads")
            json_uploads = _json_uploads(url, n_json)
            probe.phase("mixed_load")
            load = _mixed_load(url, files, expected, n_requests, n_clients)
            probe.phase("until_trickling_answered")  # each is cut at the body timeout: wait for the first two
            deadline = time.perf_counter() + BODY_TIMEOUT_S + 20
            while len(holders.trickle_answers) < len(holders.threads) - 1 and time.perf_counter() < deadline:
                time.sleep(1)
            probe.phase("end")
        memory = _memory_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    bound_mb = round(idle["rss_mb"] + SERVE_MEMORY_BYTES / 2**20, 1)
    return {**load, "json_uploads": json_uploads, "health": probe.report(),
            "idle_connections_closed_by_server": holders.idle_closed, "trickling_answers": holders.trickle_answers,
            "server_rss_mb_idle": idle["rss_mb"], "server_peak_rss_mb": memory["peak_rss_mb"],
            "memory_bound_mb": bound_mb, "within_bound": memory["peak_rss_mb"] <= bound_mb,
            "load_average": os.getloadavg(), "limits": _limits()}


def _limits() -> dict:
    from pneumo import limits

    return {k: getattr(limits, k) for k in dir(limits) if k.isupper()}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=N_REQUESTS)
    parser.add_argument("--clients", type=int, default=N_CLIENTS)
    parser.add_argument("--json-uploads", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("PNEUMO_OUTPUTS", "outputs"), "bench", "serve"))
    args = parser.parse_args()
    result = json.dumps(run_load(args.out, args.requests, args.clients, args.json_uploads), indent=2)
    (args.out / "serve-load.json").write_text(result + "\n")
    print(result)
