"""The serve load check (`nox -s bench -- serve`): 200 requests from 16 clients at a real
`pneumo serve` on 127.0.0.1, mixing good, bad, truncated, decompression-bomb and large 16-bit
uploads. Every request must be answered (good ones with the boxes a lone request gets, the others
with a 4xx), and the server's memory must stay bounded (pneumo.limits). Reports requests/s,
p50/p99 latency and the server's peak RSS."""

from __future__ import annotations

import os
import random
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


def run_load(root: Path) -> dict:
    import httpx

    run, files = _model_and_files(root)
    proc, url = _start(run, root / "serve.log")
    try:
        expected = {}  # what a lone request gets for each good file
        with httpx.Client(timeout=120) as client:
            for path in files["good"]:
                r = client.post(f"{url}/predict", files={"file": (path.name, path.read_bytes(), "application/dicom")})
                expected[path.name] = r.json()["boxes"]
        idle = _memory_mb(proc.pid)
        kinds = ["good"] * 120 + ["bad"] * 40 + ["bomb"] * 30 + ["large"] * 10
        random.Random(0).shuffle(kinds)
        jobs = [(kind, files[kind][i % len(files[kind])]) for i, kind in enumerate(kinds)]
        local, clients = threading.local(), []

        def post(i):  # each of the 16 client threads keeps one connection, as 16 users would
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
        with ThreadPoolExecutor(N_CLIENTS) as pool:
            results = list(pool.map(post, range(N_REQUESTS)))
        wall = time.perf_counter() - t0
        for c in clients:
            c.close()
        memory = _memory_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    wrong = [(k, n, s, str(body)[:120]) for k, n, s, body, _ in results
             if (k in ("good", "large") and s != 200) or (k in ("bad", "bomb") and s != 422)
             or (k == "good" and body.get("boxes") != expected[n])]
    latency = np.array([r[4] for r in results]) * 1000
    return {"requests": N_REQUESTS, "clients": N_CLIENTS, "answered": len(results), "wrong": wrong[:10],
            "n_wrong": len(wrong), "mix": {k: kinds.count(k) for k in sorted(set(kinds))},
            "requests_per_s": round(N_REQUESTS / wall, 2),
            "latency_ms_p50": round(float(np.percentile(latency, 50)), 1),
            "latency_ms_p99": round(float(np.percentile(latency, 99)), 1), "wall_s": round(wall, 1),
            "server_rss_mb_idle": idle["rss_mb"], "server_peak_rss_mb": memory["peak_rss_mb"],
            "client_cpu_s": round(sum(os.times()[:2]) - sum(cpu0[:2]), 1), "load_average": os.getloadavg(),
            "limits": _limits()}


def _limits() -> dict:
    from pneumo import limits

    return {k: getattr(limits, k) for k in dir(limits) if k.startswith("MAX_")}
