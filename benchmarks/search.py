"""Search benchmark: a 16-trial ASHA search against the same 16-trial search without pruning
(same TPE sampler, same seed, same space) on synthetic data, both real `pneumo sweep` runs.

    nox -s bench -- search [--trials N] [--epochs E] [--parallel P] [--min-resource R] [--reduction-factor F]
                           [--seed S] [--baseline outputs/bench/search-OLD.json]

Writes outputs/bench/search.json: per search the best val mAP, the sum of the epochs trained
over all trials, wall time, the children's CPU seconds, and the load average around it (the
machine may be shared). Sized for a small CPU machine: 64 px images, an 8-channel UNet of depth
3, 240 training images, 27 epochs per trial with ASHA rungs at epochs 3, 6, 12 and 24 (reduction
factor 2): the first rung at epoch 3 because nearly every trial scores 0 after one epoch here (a
rung of ties promotes or prunes by noise), and factor 2 because with factor 3 the best trial of
the unpruned search (a slow starter: 0.04 at epoch 3, 0.90 at the end) was pruned at epoch 3.
With 9 epochs a trial the per-trial start (papermill, kernel, imports: ~10 s against ~3.4 s an
epoch) is a large share of what pruning can save.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import OUT, dataset, record  # noqa: E402

SPACE = {"lr": {"low": 3e-4, "high": 3e-2, "log": True}, "optimizer": ["adam", "adamw", "sgd"],
         "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True}}
BASE = {"image_size": 64, "depth": 3, "width": 8, "batch_size": 16, "n_val_images": 0, "save_images": False,
        "scheduler": "cosine", "postprocess": "threshold"}


def _search(name: str, pruner: dict, args, data: Path) -> dict:
    spec = {"name": name, "notebook": str(Path(__file__).resolve().parents[1] / "notebooks" / "02-train.ipynb"),
            "base": {"data_dir": str(data), "epochs": args.epochs, **BASE},
            "search": {"params": SPACE, "trials": args.trials, "sampler": "tpe", "seed": args.seed,
                       "pruner": pruner}}
    work = OUT / "search"
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = work / f"outputs-{time.strftime('%Y%m%d-%H%M%S')}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pneumo", "sweep", str(path), "--out", str(out), "--max-parallel",
                           str(args.parallel)], capture_output=True, text=True,
                          env={**os.environ, "PNEUMO_NO_PROGRESS": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{name}: sweep failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from pneumo.training.rundir import RunDir

    runs = [RunDir(p) for p in sorted((out / "runs" / name).iterdir())]
    metrics = [r.metrics() for r in runs]
    return {"pruner": pruner, "trials": len(runs), "best_val_map": max(m.get("best_val_map") or 0 for m in metrics),
            "sum_epochs": sum(m.get("epochs_done") or 0 for m in metrics),
            "pruned": sum(m.get("status") == "pruned" for m in metrics), "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "load_avg_1m_start_end": [round(load[0], 2), round(os.getloadavg()[0], 2)],
            "epochs_per_trial": [m.get("epochs_done") for m in metrics],
            "study": str(out / "sweeps" / name / "study.db")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nox -s bench -- search", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=27)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--min-resource", type=int, default=3, help="ASHA's first rung, in epochs")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (both searches)")
    parser.add_argument("--reduction-factor", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="an earlier search.json of the same size, from this machine: "
                        "its no-pruning search is reused (a trial's training is deterministic; with trials in "
                        "parallel TPE's later suggestions may still depend on the order trials end)")
    args = parser.parse_args(argv)
    data = dataset()
    size = {"trials": args.trials, "epochs": args.epochs, "parallel": args.parallel, "seed": args.seed, **BASE,
            "n_train_images": "300 synthetic (80% train)", "space": SPACE}
    if args.baseline:
        earlier = json.loads(args.baseline.read_text())
        if earlier.get("size") != size:
            sys.exit(f"{args.baseline}: its search differs from this one (size {earlier.get('size')})")
        if earlier.get("cores") != os.cpu_count():
            sys.exit(f"{args.baseline}: measured on {earlier.get('cores')} cores, not this machine's {os.cpu_count()}")
        plain = {**earlier["no_pruning"], "reused_from": f"{args.baseline} ({earlier['when']})"}
    else:
        plain = _search("bench-no-pruning", {"type": "none"}, args, data)
    asha = _search("bench-asha", {"type": "asha", "min_resource": args.min_resource,
                                         "reduction_factor": args.reduction_factor}, args, data)
    result = {"size": size,
              "no_pruning": plain, "asha": asha,
              "best_val_map_gap": round(plain["best_val_map"] - asha["best_val_map"], 4),
              "epochs_ratio": round(asha["sum_epochs"] / plain["sum_epochs"], 3),
              "wall_ratio": round(asha["wall_s"] / plain["wall_s"], 3),
              "cpu_ratio": round(asha["cpu_s"] / plain["cpu_s"], 3),
              "targets": {"best_val_map_gap": "<= 0.02", "epochs_ratio": "<= 0.5", "wall_ratio": "<= 0.6"}}
    record("search", result)
    print(json.dumps({k: result[k] for k in ("best_val_map_gap", "epochs_ratio", "wall_ratio", "cpu_ratio")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
