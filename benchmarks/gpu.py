"""The GPU check: one command that says what this package does on a machine with a GPU.

    nox -s bench -- gpu [--minutes M] [--n-train N] [--n-test N] [--sizes 256,512] [--smoke]

Makes (once, reused while complete) synthetic 1024 px RSNA-layout data (pneumo.data.synth), prepares
it, trains the GPU profile (params/full.yaml's `base:` with its first run's optimizer and lr) for
--minutes of training (max_time), then measures inference. Figures, stage by stage, go to
outputs/bench/gpu.json (written atomically after each stage, so a run that is cut short still says
how far it got) and to the terminal:

    device          the GPU (torch.cuda.get_device_name), torch and CUDA versions, bf16 support
    data            making the synthetic DICOMs (or finding them made)
    profile         the resolved TrainConfig that trains
    prepare         the prepared cache at the profile's image size
    train           fit's training images/s, wall time and epochs, peak GPU memory
                    (torch.cuda.max_memory_allocated) and nvidia-smi's utilisation and memory, sampled
                    every second in a thread while training (absent without nvidia-smi)
    forward         the trained network's forward pass alone at each --sizes side on random batches,
                    under bf16 autocast where the GPU has it: how the model scales with the input
    predictor       Predictor.outputs on the synthetic test images at the trained size (uint8 batches
                    in, decoded maps out), bf16 autocast likewise
    predict_folder  predict_folder on the test images as `pneumo predict --no-images` runs it (its own
                    precision: no autocast), images/s including DICOM decoding

A stage that fails is recorded with its error and the stages after it still run (those that need it
say so). Sized to finish within 10 minutes on a GPU machine with the defaults. Without a GPU it stops
at once unless given --smoke: tiny data and a 1-epoch run at 64 px, on the CPU if need be, which
tests this script itself in about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "params" / "full.yaml"
DATA_SIZE = 1024  # the real RSNA images' side: decoding and resizing cost what they cost there
SEED = 17
SMOKE = {"n_train": 16, "n_test": 4, "data_size": 256, "sizes": (64, 128), "batch": 2, "iters": 2}


def _outputs() -> Path:
    return Path(os.environ.get("PNEUMO_OUTPUTS", "outputs")) / "bench"


# ------------------------------------------------------------------ stages


class Report:
    """The JSON of the run, saved whole after every stage."""

    def __init__(self, path: Path, head: dict):
        self.path = path
        self.result = {**head, "stages": {}, "errors": []}
        self.start = time.perf_counter()

    def stage(self, name: str, fn, *args, needs=()):
        """Run fn(*args) as stage `name`: its figures (a dict) or its error go into the report."""
        missing = [n for n in needs if not self.ok(n)]
        if missing:
            self.result["stages"][name] = {"ok": False, "skipped": f"needs {', '.join(missing)}, which failed"}
            self.save()
            return None
        print(f"gpu: {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            figures = fn(*args)
        except Exception as exc:  # any failure of a stage is a result: the others still run
            error = f"{type(exc).__name__}: {exc}"
            self.result["stages"][name] = {"ok": False, "error": error, "seconds": round(time.perf_counter() - t0, 1),
                                           "traceback": traceback.format_exc()[-3000:]}
            self.result["errors"].append({"stage": name, "error": error})
            print(f"gpu: {name} failed: {error}", file=sys.stderr, flush=True)
            self.save()
            return None
        self.result["stages"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), **figures}
        self.save()
        return figures

    def ok(self, name: str) -> bool:
        return self.result["stages"].get(name, {}).get("ok", False)

    def save(self) -> None:
        from pneumo.io import atomic_write_json

        self.result["total_s"] = round(time.perf_counter() - self.start, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.result)  # read while the check runs: never half-written


# ------------------------------------------------------------------ device


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if not torch.cuda.is_available():
        return {**info, "device": "cpu", "bf16_supported": False}
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {**info, "device": torch.cuda.get_device_name(index), "device_count": torch.cuda.device_count(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
            "memory_gib": round(props.total_memory / 2**30, 1), "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(), "driver": _nvidia_smi("driver_version")}


def _nvidia_smi(query: str) -> str | None:
    """One nvidia-smi field of this process's GPU, None without nvidia-smi or on its failure."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--id={_gpu_id()}", f"--query-gpu={query}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _gpu_id() -> str:
    # nvidia-smi numbers every GPU of the machine; torch's device 0 is CUDA_VISIBLE_DEVICES' first entry
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


class GpuSampler(threading.Thread):
    """nvidia-smi's utilisation (%) and used memory (MiB) of the GPU, sampled every second."""

    QUERY = "utilization.gpu,memory.used"

    def __init__(self, every: float = 1.0):
        super().__init__(daemon=True)
        self.every, self._done = every, threading.Event()
        self.utilisation: list[float] = []
        self.memory: list[float] = []
        self.failed = 0

    def run(self):
        while not self._done.is_set():
            line = _nvidia_smi(self.QUERY)
            try:
                util, mem = (float(v) for v in line.splitlines()[0].split(","))
                self.utilisation.append(util)
                self.memory.append(mem)
            except (AttributeError, ValueError):  # None, "[N/A]" (MIG instances), or an odd line
                self.failed += 1
            self._done.wait(self.every)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        if not self.utilisation:
            return {"gpu_samples": 0, "gpu_samples_failed": self.failed}
        return {"gpu_utilisation_mean_pct": round(sum(self.utilisation) / len(self.utilisation), 1),
                "gpu_utilisation_max_pct": max(self.utilisation),
                "gpu_memory_used_max_mib": max(self.memory), "gpu_samples": len(self.utilisation),
                "gpu_samples_failed": self.failed}


# ------------------------------------------------------------------ data and training


def make_data(work: Path, n_train: int, n_test: int, size: int, workers: int) -> dict:
    """The synthetic dataset of this size, reused when a finished one is there."""
    from pneumo.data.layout import SAMPLE_SUBMISSION, TEST_IMAGES, TRAIN_IMAGES
    from pneumo.data.synth import SYNTH_MARKER, make_dataset

    root = work / f"data-{n_train}-{n_test}-{size}"
    wanted = {"n_train": n_train, "n_test": n_test, "seed": SEED, "size": size}
    if _complete(root, wanted, SAMPLE_SUBMISSION, SYNTH_MARKER, (TRAIN_IMAGES, n_train), (TEST_IMAGES, n_test)):
        return {"data_dir": str(root), "reused": True, "n_train": n_train, "n_test": n_test, "size": size}
    t0 = time.perf_counter()
    # a half-made one is synth's own (its marker comes first): make_dataset writes into it again
    make_dataset(root, n_train=n_train, n_test=n_test, seed=SEED, size=size, workers=workers)
    seconds = time.perf_counter() - t0
    return {"data_dir": str(root), "reused": False, "n_train": n_train, "n_test": n_test, "size": size,
            "workers": workers, "images_per_s": round((n_train + n_test) / seconds, 1)}


def _complete(root: Path, wanted: dict, last_file: str, marker: str, *folders) -> bool:
    # synth writes its sample submission last: with it, the right marker and every image, it is done
    try:
        if not (root / last_file).is_file() or json.loads((root / marker).read_text()) != wanted:
            return False
    except (OSError, ValueError):
        return False
    return all(sum(1 for _ in (root / name).glob("*.dcm")) == n for name, n in folders)


def gpu_profile(data_dir: str, minutes: float, smoke: bool) -> dict:
    """params/full.yaml's base with its first run's optimizer and lr (a sweep file, not a params
    file: load_config takes its base as the layer under the overrides), resolved."""
    import yaml

    from pneumo.config import load_config

    sweep = yaml.safe_load(PROFILE.read_text())
    first = sweep["runs"][0]
    overrides = {"optimizer": first["optimizer"], "lr": first["lr"], "data_dir": data_dir, "max_time": float(minutes)}
    if smoke:  # the script's own test: a tiny run anywhere, on two CPU threads at most
        overrides.update(image_size=64, epochs=1, batch_size=8, n_val_images=2, threads=min(2, os.cpu_count() or 1))
    return {"config": load_config(None, overrides, base=sweep["base"]).to_dict()}


def prepare_cache(config) -> dict:
    """The prepared cache at the profile's size, made here so that fit's wall time is training's."""
    from pneumo.data.prepare import prepared_for

    t0 = time.perf_counter()
    prepared = prepared_for(config)
    seconds = time.perf_counter() - t0
    n = len(prepared.features)
    return {"cache": str(prepared.root), "image_size": prepared.image_size, "images": n,
            "images_per_s": round(n / seconds, 1) if seconds > 0 else None}


def train(config, run: Path) -> dict:
    import torch

    from pneumo.training.fit import fit

    shutil.rmtree(run, ignore_errors=True)  # fit refuses a finished run: each check trains afresh
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = GpuSampler() if cuda and shutil.which("nvidia-smi") else None
    if sampler:
        sampler.start()
    try:
        metrics = fit(config, run)
    finally:
        utilisation = sampler.stop() if sampler else {}
    epochs = [{"epoch": h.get("epoch"), "train_images_per_s": h.get("train_images_per_s"), "val_map": h.get("val_map")}
              for h in metrics["history"]]
    # the first epoch pays for cuDNN's autotuning and the loader's start: the later ones are the speed
    later = [e["train_images_per_s"] for e in epochs[1:] if e["train_images_per_s"]]
    figures = {"run_dir": str(run), "accelerator": metrics.get("accelerator"),
               "train_images_per_s": metrics["train_images_per_s"],
               "train_images_per_s_after_first_epoch": round(sum(later) / len(later), 1) if later else None,
               "wall_time_s": metrics["wall_time_s"], "epochs_done": metrics["epochs_done"],
               "stopped_early": metrics.get("stopped_early"), "n_train": metrics["n_train"], "n_val": metrics["n_val"],
               "best_val_map": metrics["best_val_map"], "epochs": epochs}
    if cuda:
        figures.update(peak_memory_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1),
                       peak_memory_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20, 1))
    if cuda and sampler is None:
        figures["nvidia_smi"] = "not found: no utilisation figures"
    return {**figures, **utilisation}


# ------------------------------------------------------------------ inference


def _autocast(device):
    """bf16 autocast on a GPU that has it (what a deployment would use), else full precision."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), "bf16-autocast"
    return contextlib.nullcontext(), "float32"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":  # kernels run asynchronously: without this the clock stops too early
        torch.cuda.synchronize(device)


def forward(run: Path, sizes, batch: int, iters: int) -> dict:
    """The trained network's forward pass at each side (the model is fully convolutional, and the
    classifier pools): random images, so the figure is the network's alone, no decoding or I/O."""
    import torch

    from pneumo.data.metadata import metadata_of
    from pneumo.deploy.predict import load_predictor

    predictor = load_predictor(run)
    net, device = predictor.net, predictor.device
    meta = torch.tensor([metadata_of({})] * batch, dtype=torch.float32, device=device) \
        if predictor.heads.reads_metadata else None
    autocast, precision = _autocast(device)
    result = {"device": str(device), "precision": precision, "batch": batch, "iterations": iters,
              "trained_size": predictor.image_size, "sizes": {}}
    for size in sizes:
        x = torch.rand(batch, 1, size, size, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode(), autocast:
            for _ in range(3 if device.type == "cuda" else 1):  # warm-up: cuDNN picks its kernels per shape
                net(x, meta)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                net(x, meta)
            _sync(device)
            seconds = time.perf_counter() - t0
        figures = {"images_per_s": round(batch * iters / seconds, 1), "ms_per_batch": round(1000 * seconds / iters, 2)}
        if device.type == "cuda":
            figures["peak_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["sizes"][str(size)] = figures
    return result


def predictor_outputs(run: Path, test_images: Path, batch: int) -> dict:
    """Predictor.outputs on the test images, decoded and resized beforehand: (B, S, S) uint8 batches
    at the trained size with their DICOM metadata, as predict hands them over."""
    import numpy as np

    from pneumo.data.dicom import read_dicom, resize_area
    from pneumo.deploy.predict import load_predictor

    predictor = load_predictor(run)
    size = predictor.image_size
    images, metas = [], []
    for path in sorted(test_images.glob("*.dcm")):
        image, meta = read_dicom(path, min_size=size)
        images.append(resize_area(image, size))
        metas.append(meta.to_dict())
    batches = [(np.stack(images[i:i + batch]), metas[i:i + batch]) for i in range(0, len(images), batch)]
    autocast, precision = _autocast(predictor.device)
    with autocast:
        predictor.outputs(*batches[0])  # warm-up
        _sync(predictor.device)
        t0 = time.perf_counter()
        for pixels, meta in batches:
            predictor.outputs(pixels, meta)  # returns numpy on the host: synchronised by its copy
        seconds = time.perf_counter() - t0
    return {"device": str(predictor.device), "precision": precision, "image_size": size, "images": len(images),
            "batch": batch, "images_per_s": round(len(images) / seconds, 1)}


def predict_whole(run: Path, test_images: Path, out: Path) -> dict:
    from pneumo.deploy.predict import predict_folder

    shutil.rmtree(out, ignore_errors=True)  # predict skips images an earlier run finished
    n = sum(1 for _ in test_images.glob("*.dcm"))
    t0 = time.perf_counter()
    summary = predict_folder(run, test_images, out, images="none")
    seconds = time.perf_counter() - t0
    return {"images": n, "images_per_s": round(n / seconds, 1), "wall_s": round(seconds, 2),
            "images_per_s_inference_loop": summary.get("images_per_second"), "n_with_boxes": summary["n_with_boxes"],
            "n_errors": summary["n_errors"], "precision": "as predict runs it (no autocast)",
            "note": "wall time includes loading the checkpoint and DICOM decoding; no PNGs"}


# ------------------------------------------------------------------ main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nox -s bench -- gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=4.0, help="training budget, max_time (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=800, help="synthetic training images (default: %(default)s)")
    p.add_argument("--n-test", type=int, default=200, help="synthetic test images (default: %(default)s)")
    p.add_argument("--sizes", default="256,512", help="forward-pass sides, comma-separated (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="inference batch size (default: %(default)s)")
    p.add_argument("--iters", type=int, default=20, help="timed forward batches per side (default: %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny everything (16 + 4 images at 256 px, a 64 px model, 1 epoch): tests this script; "
                        "CPU allowed")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    import torch

    from pneumo.config import TrainConfig

    if not args.smoke and not torch.cuda.is_available():
        print("gpu: no CUDA device; run with --smoke to test the script on the CPU", file=sys.stderr)
        return 2
    if args.smoke:
        n_train, n_test, data_size = SMOKE["n_train"], SMOKE["n_test"], SMOKE["data_size"]
        sizes, batch, iters, workers = SMOKE["sizes"], SMOKE["batch"], SMOKE["iters"], 1
    else:
        n_train, n_test, data_size = args.n_train, args.n_test, DATA_SIZE
        sizes, batch, iters = tuple(int(s) for s in args.sizes.split(",") if s), args.batch, args.iters
        workers = os.cpu_count() or 1
    out = _outputs()
    work = out / "gpu-work"
    run, predictions = work / "run", work / "predict"
    report = Report(out / "gpu.json", {
        "benchmark": "gpu", "command": shlex.join(["nox", "-s", "bench", "--", "gpu", *argv]), "smoke": args.smoke,
        "device": None, "profile": f"{PROFILE.relative_to(ROOT)}: base + runs[0]", "minutes": args.minutes,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "work_dir": str(work)})

    device = report.stage("device", device_info)
    if device:
        report.result["device"] = device["device"]
    data = report.stage("data", make_data, work, n_train, n_test, data_size, workers)
    profile = report.stage("profile", gpu_profile, data and data["data_dir"], args.minutes, args.smoke,
                           needs=("data",))
    config = TrainConfig.from_dict(profile["config"]) if profile else None
    report.stage("prepare", prepare_cache, config, needs=("profile",))
    report.stage("train", train, config, run, needs=("prepare",))
    test_images = Path(data["data_dir"]) / "stage_2_test_images" if data else None
    report.stage("forward", forward, run, sizes, batch, iters, needs=("train",))
    report.stage("predictor", predictor_outputs, run, test_images, batch, needs=("train",))
    report.stage("predict_folder", predict_whole, run, test_images, predictions, needs=("train",))
    report.save()
    print(json.dumps(report.result, indent=2), flush=True)
    return 1 if report.result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
