"""The full-scale benchmark: pneumo at the size of the real RSNA training set, on this machine.

    nox -s bench -- scale [--n-train N --n-test M | --fraction F] [--parts decode,prepare,...]

Makes once (cached under outputs/bench/scale-data-<n_train>-<n_test>/) a synthetic dataset of
the real size and layout (26,684 train and 3,000 test DICOMs, 1024 px JPEG Baseline, about 22.5%
positive with 1-4 boxes: pneumo.data.synth), then measures each step as the user runs it, a `pneumo`
child process: prepare (128 and 256 px), one training epoch at 128 and 256 px, predict on the test
images with and without PNGs, and `pneumo score`. Peak memory is the largest sum of the resident
memory of the child and its own children (psutil, sampled every 0.2 s), the same without
file-backed pages (a memory-mapped cache counts in RSS but is page cache the kernel can drop), and
the largest single process; CPU seconds are getrusage's, so figures taken on a shared machine can be
read beside the load average, recorded with each step. Figures go to outputs/bench/scale.json.

`decode` compares, on real RSNA files (../shared/rsna-real, or --real DIR), the decoder-scaled
JPEG decode with the full decode and the same area resize: grey-level difference and time.

The full scale needs about 10 GB of disk and an hour or more on 2 cores: on a small machine give
--fraction 0.1 (or --n-train/--n-test); `--skip-full` makes a run that was asked for the full
scale stop with a message instead (CI and quick checks).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

FULL_TRAIN, FULL_TEST = 26_684, 3_000
REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "rsna-real"
PNEUMO_SRC = ""  # set by --pneumo-src


def _outputs() -> Path:
    return Path(os.environ.get("PNEUMO_OUTPUTS", "outputs")) / "bench"


# ------------------------------------------------------------------ measuring a child process


class _TreeMemory(threading.Thread):
    """The peak of the summed resident memory of a process and its descendants, sampled."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self._done = pid, every, threading.Event()
        self.peak = self.largest = self.peak_private = 0

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._done.is_set():
            total = private = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        info = p.memory_info()
                    except psutil.Error:
                        continue
                    total += info.rss
                    private += info.rss - info.shared  # without file pages (a memory-mapped cache)
                    self.largest = max(self.largest, info.rss)
            except psutil.Error:
                break
            self.peak = max(self.peak, total)
            self.peak_private = max(self.peak_private, private)
            self._done.wait(self.every)

    def stop(self):
        self._done.set()
        self.join()


def measured(args: list[str], env: dict | None = None, program: list[str] | None = None) -> dict:
    """Run `python -m pneumo ARGS` (or PROGRAM ARGS) and return its wall and CPU seconds, peak
    memory and output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    env = {**os.environ, "PNEUMO_NO_PROGRESS": "1", **(env or {})}
    if PNEUMO_SRC:  # another checkout's package (--pneumo-src), for before/after figures
        env["PYTHONPATH"] = os.pathsep.join([PNEUMO_SRC, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen([*(program or [sys.executable, "-m", "pneumo"]), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    watcher = _TreeMemory(proc.pid)
    watcher.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    watcher.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(program or ['pneumo'])} {' '.join(args)} failed ({proc.returncode}): "
                           f"{err.strip()[-2000:]}")
    return {"wall_s": round(wall, 2),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
            "peak_rss_tree_mb": round(watcher.peak / 2**20, 1),
            "peak_rss_tree_without_file_pages_mb": round(watcher.peak_private / 2**20, 1),
            "peak_rss_largest_process_mb": round(watcher.largest / 2**20, 1),
            "load_average_1min_start": round(load, 2), "load_average_1min_end": round(os.getloadavg()[0], 2),
            "stdout": out, "stderr_tail": err.strip()[-500:]}


# ------------------------------------------------------------------ decode: scaled vs full, real files


def measure_decode(folder: Path, sizes=(128, 256), limit: int = 0) -> dict:
    """Decoder-scaled JPEG decode vs full decode + the same area resize on the same files, in one
    run (interleaved, so contention hits both alike): mean absolute grey-level difference and time
    of each piece (header read, pixel decode, resize)."""
    import pydicom

    from pneumo.data.dicom import (
        _decode,
        _meta,
        _read_dataset,
        quiet_pydicom,
        read_dicom,
        resize_area,
    )

    files = sorted(Path(folder).glob("*.dcm"))[: limit or None]
    if not files:
        return {"error": f"no DICOM files in {folder}"}
    result = {"folder": str(folder), "files": len(files), "sizes": {}}
    read_s = 0.0
    for size in sizes:
        diffs, max_diff, t_full, t_scaled, t_resize, t_dec_full, t_dec_scaled = [], 0, 0.0, 0.0, 0.0, 0.0, 0.0
        for path in files:
            t0 = time.perf_counter()
            full, _ = read_dicom(path)
            t1 = time.perf_counter()
            a = resize_area(full, size)
            t2 = time.perf_counter()
            scaled, _ = read_dicom(path, min_size=size)
            b = resize_area(scaled, size)
            t3 = time.perf_counter()
            t_full += t2 - t0
            t_resize += t2 - t1
            t_scaled += t3 - t2
            # the pieces: header read alone, and each decode alone on an already read dataset
            t4 = time.perf_counter()
            ds = _read_dataset(path)
            t5 = time.perf_counter()
            with quiet_pydicom():
                meta = _meta(path, ds)
            again = pydicom.dcmread(path)
            t6a = time.perf_counter()
            _decode(path, ds, meta)
            t6 = time.perf_counter()
            _decode(path, again, meta, size)
            t7 = time.perf_counter()
            read_s += t5 - t4
            t_dec_full += t6 - t6a
            t_dec_scaled += t7 - t6
            diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
            diffs.append(float(diff.mean()))
            max_diff = max(max_diff, int(diff.max()))
        n = len(files)
        result["sizes"][str(size)] = {
            "decoded_side": int(scaled.shape[0]),
            "mean_abs_grey_diff": round(float(np.mean(diffs)), 4),
            "worst_image_mean_abs_grey_diff": round(float(np.max(diffs)), 4),
            "max_pixel_diff": max_diff,
            "full_decode_plus_resize_ms": round(1000 * t_full / n, 2),
            "scaled_decode_plus_resize_ms": round(1000 * t_scaled / n, 2),
            "speedup": round(t_full / t_scaled, 2),
            "pieces_ms": {"pixel_decode_full": round(1000 * t_dec_full / n, 2),
                          "pixel_decode_scaled": round(1000 * t_dec_scaled / n, 2),
                          "resize_from_full": round(1000 * t_resize / n, 2)},
        }
    result["header_read_ms"] = round(1000 * read_s / (n * len(sizes)), 2)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    return result


# ------------------------------------------------------------------ the dataset


def dataset(n_train: int, n_test: int, seed: int = 13) -> Path:
    """The synthetic dataset of this size, made once: its sample submission is written last."""
    from pneumo.data.layout import SAMPLE_SUBMISSION
    from pneumo.data.synth import make_dataset

    root = _outputs() / f"scale-data-{n_train}-{n_test}"
    if not (root / SAMPLE_SUBMISSION).is_file():
        start = time.perf_counter()
        make_dataset(root, n_train=n_train, n_test=n_test, seed=seed)
        print(f"made {n_train} + {n_test} DICOMs in {time.perf_counter() - start:.0f} s", flush=True)
    return root


# ------------------------------------------------------------------ the steps


def step_prepare(data: Path, size: int, n: int, label: str = "") -> dict:
    import shutil

    out = _outputs() / f"scale-cache-{size}-{n}{label}"
    shutil.rmtree(out, ignore_errors=True)  # the benchmark's own output, remade each run
    m = measured(["prepare", str(data), "--out", str(out), "--image-size", str(size)])
    return {"cache": str(out), "images_per_s": round(n / m["wall_s"], 1), **_without_output(m)}


def step_train(cache: str, size: int, profile: str, label: str = "") -> dict:
    import shutil

    run = _outputs() / f"scale-run-{size}{label}"
    shutil.rmtree(run, ignore_errors=True)
    m = measured(["train", "--data-dir", cache, "--out", str(run), "--params", profile, "-p", "epochs=1",
                  "-p", f"image_size={size}", "-p", "max_time=0", "-p", "n_val_images=8"])
    metrics = json.loads((run / "metrics.json").read_text())
    record = metrics["history"][-1]
    fit_s = metrics["wall_time_s"]
    return {"run": str(run), "profile": profile, "train_images_per_s": record.get("train_images_per_s"),
            "n_train": metrics.get("n_train"), "n_val": metrics.get("n_val"), "fit_s": fit_s,
            "val_scoring_s": record.get("val_scoring_s"),
            "val_scoring_share_of_fit": round(record["val_scoring_s"] / fit_s, 4)
            if record.get("val_scoring_s") is not None and fit_s else None,
            "val_map": record.get("val_map"), **_without_output(m)}


def step_predict(run: str, images: Path, labels: Path, n: int, png: bool, label: str = "") -> dict:
    import shutil

    out = _outputs() / f"scale-predict-{'png' if png else 'nopng'}{label}"
    shutil.rmtree(out, ignore_errors=True)
    m = measured(["predict", run, str(images), "--out", str(out), "--labels", str(labels),
                  *([] if png else ["--no-images"])])
    return {"out": str(out), "pngs": png, "images_per_s": round(n / m["wall_s"], 1), **_without_output(m)}


def step_score(submission: Path, labels: Path) -> dict:
    m = measured(["score", str(submission), str(labels), "--json"])
    return {"map": json.loads(m["stdout"])["map"], **_without_output(m)}


def _without_output(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "stdout"}


def measure_pieces(run: str, images: Path, limit: int = 96, batch: int = 16) -> dict:
    """Where predict's time goes, per image, in this process: header read, pixel decode (full and
    decoder-scaled), resize, the forward pass, drawing and PNG encoding."""
    import io

    import pydicom

    from pneumo.data.dicom import _decode, _meta, _read_dataset, resize_area
    from pneumo.deploy.predict import load_predictor
    from pneumo.io import atomic_save_image  # noqa: F401  (the PNG settings predict uses: level 1)
    from pneumo.render import annotate

    predictor = load_predictor(run)
    size = predictor.image_size
    files = sorted(images.glob("*.dcm"))[:limit]
    t = dict.fromkeys(("read", "decode_full", "decode_scaled", "resize", "forward", "draw_png"), 0.0)
    inputs, fulls = [], []
    for path in files:
        t0 = time.perf_counter()
        ds = _read_dataset(path)
        meta = _meta(path, ds)
        t1 = time.perf_counter()
        full = _decode(path, ds, meta)
        t2 = time.perf_counter()
        small = resize_area(full, size)
        t3 = time.perf_counter()
        again = pydicom.dcmread(path)
        t4 = time.perf_counter()
        _decode(path, again, meta, size)
        t5 = time.perf_counter()
        t["read"] += t1 - t0
        t["decode_full"] += t2 - t1
        t["resize"] += t3 - t2
        t["decode_scaled"] += t5 - t4
        inputs.append(small)
        fulls.append(full)
    for i in range(0, len(inputs), batch):
        t0 = time.perf_counter()
        outputs, _ = predictor.outputs(np.stack(inputs[i:i + batch]))
        t["forward"] += time.perf_counter() - t0
    for full in fulls:
        t0 = time.perf_counter()
        image = annotate(full, np.array([[200.0, 300.0, 250.0, 300.0]]), np.array([0.7]), ())
        image.save(io.BytesIO(), format="PNG", compress_level=1)
        t["draw_png"] += time.perf_counter() - t0
    return {"images": len(files), "image_size": size, "batch": batch,
            "ms_per_image": {k: round(1000 * v / len(files), 2) for k, v in t.items()},
            "load_average_1min": round(os.getloadavg()[0], 2)}


# ------------------------------------------------------------------ main


PARTS = ("decode", "prepare", "train", "predict", "score", "pieces")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nox -s bench -- scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=None, help="this share of the real sizes (e.g. 0.1)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--skip-full", action="store_true", help="refuse to run at the full scale (small machines)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--sizes", default="128,256", help="training (and prepare) image sizes")
    parser.add_argument("--profile", default="params/real-cpu-unet.yaml",
                        help="training parameters (default: %(default)s, full-cpu.yaml's model)")
    parser.add_argument("--real", type=Path, default=REAL / "stage_2_train_images", help="real DICOMs for `decode`")
    parser.add_argument("--pneumo-src", default="", help="run the steps with another checkout's src/ (before/after)")
    parser.add_argument("--model", default="", help="predict with this run or model instead of the 128 px epoch's")
    parser.add_argument("--label", default="", help="a name for this run: figures go to scale[-LABEL].json")
    args = parser.parse_args(argv)
    global PNEUMO_SRC
    PNEUMO_SRC = str(Path(args.pneumo_src).resolve()) if args.pneumo_src else ""
    fraction = args.fraction or 1.0
    n_train = args.n_train or max(20, round(FULL_TRAIN * fraction))
    n_test = args.n_test or max(10, round(FULL_TEST * fraction))
    full = n_train >= FULL_TRAIN
    if full and args.skip_full:
        print(f"scale: skipped: full scale ({n_train} + {n_test} images) and --skip-full given", file=sys.stderr)
        return 0
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}")
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"benchmark": "scale", "full_scale": full, "n_train": n_train, "n_test": n_test,
              "command": "nox -s bench -- scale " + " ".join(argv), "cores": os.cpu_count(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_average_start": [round(v, 2) for v in os.getloadavg()],
              "steps": {}}
    out = _outputs() / (f"scale-{args.label}.json" if args.label else "scale.json")
    result["pneumo_src"] = PNEUMO_SRC or "this checkout"

    def save():
        result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        from pneumo.io import atomic_write_json

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)  # read while the benchmark runs: never half-written

    steps = result["steps"]
    if "decode" in parts:
        steps["decode"] = (measure_decode(args.real) if args.real.is_dir()
                           else {"skipped": f"{args.real}: no such folder"})
        save()
    if not set(parts) - {"decode"}:
        print(json.dumps(result, indent=2))
        return 0
    data = dataset(n_train, n_test)
    suffix = f"-{args.label}" if args.label else ""
    caches = {}
    for size in sizes:
        if "prepare" in parts or "train" in parts:
            steps[f"prepare_{size}"] = step_prepare(data, size, n_train, suffix)
            caches[size] = steps[f"prepare_{size}"]["cache"]
            save()
        if "train" in parts:
            steps[f"train_{size}"] = step_train(caches[size], size, args.profile, suffix)
            save()
    run = args.model or steps.get(f"train_{sizes[0]}", {}).get("run")
    labels = data / "stage_2_test_labels.csv"
    if run and "predict" in parts:
        for png in (False, True):
            steps[f"predict_{'png' if png else 'nopng'}"] = step_predict(run, data / "stage_2_test_images", labels,
                                                                         n_test, png, suffix)
            save()
    if run and "score" in parts:
        steps["score"] = step_score(_outputs() / f"scale-predict-png{suffix}" / "submission.csv", labels)
        save()
    if run and "pieces" in parts:
        steps["pieces"] = measure_pieces(run, data / "stage_2_test_images")
        save()
    save()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
