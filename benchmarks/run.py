"""pneumo benchmarks: each measures the package against the straightforward approach in the
same run and writes outputs/bench/<name>.json with the figures and the command that made them.

    nox -s bench                      # all of these (synthetic data, a few minutes)
    nox -s bench -- score loader      # some of: score prepare startup loader train predict sweep serve
    nox -s bench -- real [--data-dir DIR] [--profile NAME] [-p key=value ...] [--splits N] [--label NAME]
    nox -s bench -- search [--trials N] [--epochs E]   # ASHA vs no pruning (benchmarks/search.py)
    nox -s bench -- gpu [--minutes M] [--smoke]        # the GPU check (benchmarks/gpu.py)

`real` (benchmarks/real.py) is the real-data benchmark that decides model changes: it trains a
profile on several patient splits of the real RSNA data (default ../shared/rsna-real) and writes
outputs/bench/real.json and real.md. It needs that data and takes tens of minutes, so a plain
`nox -s bench` never runs it: name it, alone, with its own arguments after it
(`nox -s bench -- real --help`).

`scale` (benchmarks/scale.py) measures prepare, a training epoch, predict and score at the size of
the real training set (26,684 + 3,000 synthetic DICOMs, made once) and writes outputs/bench/scale.json;
`--fraction 0.1` (or `--n-train/--n-test`) for a smaller machine, `--skip-full` to refuse the full
size. Like `real` it goes first, alone, with its own arguments (`nox -s bench -- scale --help`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(os.environ.get("PNEUMO_OUTPUTS", "outputs")) / "bench"
DATA = OUT / "data"


def record(name: str, result: dict) -> dict:
    result = {"benchmark": name, "command": f"nox -s bench -- {name}",
              "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)
    return result


def dataset(n_train=300, n_test=60) -> Path:
    from pneumo.data.synth import make_dataset

    if not (DATA / "stage_2_train_labels.csv").is_file():
        make_dataset(DATA, n_train=n_train, n_test=n_test, seed=11)
    return DATA


# ------------------------------------------------------------------ score


def _naive_iou_masks(a, b, size=1024):
    """The straightforward way: rasterize both boxes into full-size masks."""
    ma = np.zeros((size, size), bool)
    mb = np.zeros((size, size), bool)
    x, y, w, h = (int(round(v)) for v in a)
    ma[y:y + h, x:x + w] = True
    x, y, w, h = (int(round(v)) for v in b)
    mb[y:y + h, x:x + w] = True
    return (ma & mb).sum() / max((ma | mb).sum(), 1)


def _naive_map(gt: dict, preds: dict, thresholds):
    scores = []
    for pid, g in gt.items():
        p, c = preds.get(pid, (np.zeros((0, 4)), np.zeros(0)))
        if not len(g) and not len(p):
            continue
        order = np.argsort(-c, kind="stable")
        ious = [[_naive_iou_masks(p[i], gj) for gj in g] for i in order]
        per_t = []
        for t in thresholds:
            used, tp = set(), 0
            for row in ious:
                cands = [(v, j) for j, v in enumerate(row) if j not in used]
                if cands:
                    v, j = max(cands)
                    if v > t:
                        used.add(j)
                        tp += 1
            per_t.append(tp / (tp + (len(p) - tp) + (len(g) - tp)))
        scores.append(np.mean(per_t))
    return float(np.mean(scores))


def bench_score():
    from pneumo.metrics import THRESHOLDS, mean_average_precision

    rng = np.random.default_rng(0)
    gt, preds = {}, {}
    for i in range(3000):
        n = rng.choice([0, 0, 1, 2, 3], p=[0.4, 0.3, 0.1, 0.15, 0.05])
        # integer pixel boxes, as Kaggle's files hold: the mask rasterization is then exact
        g = np.array([[rng.integers(50, 600), rng.integers(50, 500), rng.integers(100, 300), rng.integers(100, 400)]
                      for _ in range(n)], dtype=float).reshape(-1, 4)
        jitter = g + np.round(rng.normal(0, 25, g.shape))
        extra = rng.integers(0, 2)
        false_positives = np.array([[rng.integers(0, 700), rng.integers(0, 600), 150, 200]] * extra,
                                   dtype=float).reshape(-1, 4)
        p = np.vstack([jitter, false_positives])
        gt[f"p{i}"], preds[f"p{i}"] = g, (p, rng.uniform(0.3, 1, len(p)))
    t_fast = float("inf")
    for _ in range(5):  # best of 5: the fast path is milliseconds
        t0 = time.perf_counter()
        fast = mean_average_precision(gt, preds, THRESHOLDS).map
        t_fast = min(t_fast, time.perf_counter() - t0)
    t0 = time.perf_counter()
    naive = _naive_map(gt, preds, THRESHOLDS)
    t_naive = time.perf_counter() - t0
    return record("score", {"images": 3000, "pneumo_s": round(t_fast, 4), "naive_masks_s": round(t_naive, 2),
                            "speedup": round(t_naive / t_fast, 1), "map_pneumo": fast, "map_naive": naive,
                            "identical": abs(fast - naive) < 1e-9, "target_speedup": 500})


# ------------------------------------------------------------------ prepare


def bench_prepare():
    import shutil

    import pydicom
    from skimage.transform import resize

    from pneumo.data.prepare import prepare

    data = dataset()
    files = sorted((data / "stage_2_train_images").glob("*.dcm"))
    t0 = time.perf_counter()
    for f in files:  # the plain loop: one process, pydicom, scikit-image resize
        resize(pydicom.dcmread(f).pixel_array, (256, 256), anti_aliasing=True, preserve_range=True)
    t_plain = time.perf_counter() - t0
    out = OUT / "prepare-cache"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    prepare(data, out=out, image_size=256)
    t_ours = time.perf_counter() - t0
    n = len(files)
    return record("prepare", {"images": n, "plain_images_per_s": round(n / t_plain, 1),
                              "pneumo_images_per_s": round(n / t_ours, 1), "speedup": round(t_plain / t_ours, 2),
                              "extrapolated_26684_images_min": round(26684 / (n / t_ours) / 60, 1),
                              "note": "pneumo includes process start-up, CSVs and the atomic cache write"})


# ------------------------------------------------------------------ startup


def bench_startup():
    def timed(args, repeat=3):
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *args], capture_output=True)
            best = min(best, time.perf_counter() - t0)
        return round(best, 3)

    check = ("import sys; from pneumo.cli import main; main(['score','--help']) if False else None; "
             "import pneumo.metrics, pneumo.data.validate, pneumo.data.synth; assert 'torch' not in sys.modules")
    imported = subprocess.run([sys.executable, "-c", check], capture_output=True).returncode == 0
    return record("startup", {"pneumo_score_help_s": timed(["-m", "pneumo", "score", "--help"]),
                              "pneumo_validate_help_s": timed(["-m", "pneumo", "validate", "--help"]),
                              "import_torch_s": timed(["-c", "import torch"]),
                              "light_commands_import_torch": not imported})


# ------------------------------------------------------------------ loader


def bench_loader():
    import pydicom
    import torch
    from scipy import ndimage
    from skimage.transform import resize, rotate

    from pneumo.config import TrainConfig
    from pneumo.data.datamodule import RsnaDataModule, augment
    from pneumo.data.prepare import prepare

    data = dataset()
    files = sorted((data / "stage_2_train_images").glob("*.dcm"))[:60]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for f in files:  # the tutorial's per-sample pipeline
        img = resize(pydicom.dcmread(f).pixel_array, (256, 256), anti_aliasing=True)
        dx = ndimage.gaussian_filter(rng.uniform(-1, 1, img.shape), 8) * 30
        dy = ndimage.gaussian_filter(rng.uniform(-1, 1, img.shape), 8) * 30
        yy, xx = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
        img = ndimage.map_coordinates(img, [yy + dy, xx + dx], order=1)
        img = rotate(img, rng.uniform(-10, 10))
    naive = len(files) / (time.perf_counter() - t0)

    prepared = prepare(data, out=OUT / "prepare-cache", image_size=256)
    config = TrainConfig(image_size=256, batch_size=32, num_workers=0)
    dm = RsnaDataModule(prepared, config)
    loader = dm.train_dataloader()

    def throughput(with_augment: bool) -> float:
        n, t0 = 0, time.perf_counter()
        for epoch in range(3):
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                images, masks = batch["images"], batch["masks"]
                if with_augment:
                    images, masks = augment(images.float() / 255, masks.float())
                n += images.shape[0]
        return n / (time.perf_counter() - t0)

    # On a GPU the augmentation runs on the GPU (on_after_batch_transfer): the CPU only has to
    # deliver cached batches. On the CPU it does both; both figures are reported.
    cached = throughput(False)
    ours = throughput(True)
    return record("loader", {"image_size": 256, "naive_samples_per_s": round(naive, 1),
                             "pneumo_samples_per_s_with_cpu_augment": round(ours, 1),
                             "pneumo_samples_per_s_cache_only": round(cached, 1),
                             "speedup_with_cpu_augment": round(ours / naive, 1),
                             "torch_threads": torch.get_num_threads(), "target_speedup": 30,
                             "target_samples_per_s": 2000})


# ------------------------------------------------------------------ train


def bench_train():
    import shutil

    from pneumo.config import TrainConfig
    from pneumo.training.fit import fit

    data = dataset()
    run = OUT / "train-run"
    shutil.rmtree(run, ignore_errors=True)
    metrics = fit(TrainConfig(data_dir=str(data), max_time=5.0), run)
    curve = [(h["epoch"], h["val_map"]) for h in metrics["history"]]
    first_06 = next((e for e, m in curve if m >= 0.6), None)
    return record("train", {"best_val_map": metrics["best_val_map"], "best_epoch": metrics["best_epoch"],
                            "threshold": metrics["threshold"], "wall_time_s": metrics["wall_time_s"],
                            "epochs_done": metrics["epochs_done"], "first_epoch_map_ge_0.6": first_06,
                            "train_images_per_s": metrics["train_images_per_s"], "n_train": metrics["n_train"],
                            "val_map_curve": curve, "target": "val mAP >= 0.6 within 5 min on 2 cores"})


# ------------------------------------------------------------------ predict


def bench_predict():
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    from pneumo.data.dicom import read_dicom, resize_area
    from pneumo.deploy.predict import load_predictor, predict_folder
    from pneumo.training.rundir import RunDir

    data = dataset()
    run = OUT / "train-run"
    if not RunDir(run).best_checkpoint.is_file():
        bench_train()
    images = data / "stage_2_test_images"
    files = sorted(images.glob("*.dcm"))
    predictor = load_predictor(run)
    naive_dir = OUT / "predict-naive"
    naive_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for f in files:  # straightforward: one image at a time, a matplotlib figure each
        image, meta = read_dicom(f)
        outputs, opacity = predictor.outputs(resize_area(image, predictor.image_size)[None], [meta.to_dict()])
        boxes, conf = predictor.boxes(outputs[0], *image.shape, None if opacity is None else float(opacity[0]))
        fig, ax = plt.subplots(figsize=(10.24, 10.24), dpi=100)
        ax.imshow(image, cmap="gray")
        for (x, y, w, h), c in zip(boxes, conf):
            ax.add_patch(patches.Rectangle((x, y), w, h, fill=False, color="red", lw=2))
            ax.text(x, y, f"{c:.2f}", color="white", backgroundcolor="red")
        ax.axis("off")
        fig.savefig(naive_dir / f"{f.stem}.png")
        plt.close(fig)
    naive = len(files) / (time.perf_counter() - t0)
    out = OUT / "predict-pneumo"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = predict_folder(predictor, images, out)
    ours = len(files) / (time.perf_counter() - t0)

    serve = _serve_latency(run, files[0])
    return record("predict", {"images": len(files), "naive_images_per_s": round(naive, 2),
                              "pneumo_images_per_s": round(ours, 2), "speedup": round(ours / naive, 2),
                              "target_speedup": 5, "n_with_boxes": summary["n_with_boxes"], **serve})


def _serve_latency(run, dcm):
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pneumo", "serve", str(run), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = dcm.read_bytes()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/predict", files={"file": (dcm.name, body, "application/dicom")}, timeout=30)
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200
        return {"serve_latency_ms_median": round(1000 * float(np.median(times)), 1),
                "serve_latency_ms_p90": round(1000 * float(np.percentile(times, 90)), 1)}
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------ sweep


def bench_sweep():
    """Wall time vs ideal of the last `nox -s sweep` (sum of run times / parallel slots)."""
    from pneumo.training.rundir import RunDir

    root = Path(os.environ.get("PNEUMO_OUTPUTS", "outputs")) / "runs" / "optimizers"
    records = []
    for path in sorted(p for p in root.glob("*") if not p.name.startswith("marathon")):
        run = RunDir(path)
        proc, metrics = run.process(), run.metrics()
        if proc and metrics and run.log.is_file():
            records.append({"run": run.name, "process_s": proc["seconds"], "fit_s": metrics["wall_time_s"],
                            "end": run.log.stat().st_mtime})
    if not records:
        return record("sweep", {"error": "run `nox -s sweep` first"})
    starts = [r["end"] - r["process_s"] for r in records]
    wall = max(r["end"] for r in records) - min(starts)
    slots = int(os.environ.get("PNEUMO_BENCH_SLOTS", min(len(records), os.cpu_count() or 1)))
    ideal = sum(r["process_s"] for r in records) / slots
    overhead = [r["process_s"] - r["fit_s"] for r in records]
    return record("sweep", {"runs": len(records), "slots": slots, "wall_s": round(wall, 1), "ideal_s": round(ideal, 1),
                            "wall_over_ideal": round(wall / ideal, 3), "target_wall_over_ideal": 1.15,
                            "papermill_kernel_overhead_s_per_run": round(float(np.mean(overhead)), 1),
                            "runs_detail": records})


def bench_serve():
    """pneumo serve under 16 clients mixing good, bad, truncated, bomb and large uploads (serve_load.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import serve_load

    return record("serve", serve_load.run_load(OUT / "serve"))


BENCHES = {"score": bench_score, "prepare": bench_prepare, "startup": bench_startup, "loader": bench_loader,
           "train": bench_train, "predict": bench_predict, "sweep": bench_sweep, "serve": bench_serve}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("real", "scale", "search", "gpu"):  # their own arguments (search: minutes, named alone)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import importlib

        return importlib.import_module(argv[0]).main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        hint = ("; `real` and `scale` go first, alone, with their own arguments"
                if {"real", "scale"} & set(names) else "")
        sys.exit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}, "
                 f"or real or scale (not run by default){hint}")
    for name in names:
        BENCHES[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
