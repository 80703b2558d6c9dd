"""The real-data benchmark: the figure that decides a model change.

    nox -s bench -- real [--data-dir DIR] [--profile NAME_OR_PATH] [-p key=value ...] [--splits N]
                         [--test-fraction F] [--label NAME] [--out DIR]

Trains one profile (a TrainConfig params file: params/<NAME>.yaml or a path; default
params/real-cpu.yaml) on N repeated stratified patient splits of a real RSNA-layout directory
(default ../shared/rsna-real next to the repository). Split s (seed s) holds out a TEST part
(--test-fraction of each class's patients) and trains on the rest, the DEV part, whose own
validation split (val_fraction) is where the run tunes its box threshold. The TEST part is never
seen in training or tuning; its official RSNA mAP is the figure per split. Written to <out>:

    real.json   one entry per label (re-running a label replaces its entry; other labels stay):
                profile, resolved TrainConfig, command, per split figures, mean and sample std
    real.md     the table, one row per label: before/after comparisons accumulate in it
    real/splits/<fingerprint>/split<s>/{dev,test}/   RSNA-layout split directories (symlinks)
    real/runs/<label>/split<s>/                      the runs (resumable; finished ones reused)

These are development-set figures (cross-validation on the development set): use them to choose
between methods, never report them as test scores.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "rsna-real"
DEFAULT_PROFILE = "real-cpu"
MIN_SPLITS = 3  # the benchmark's rule; fewer only for tests, with a warning
SPLIT_VERSION = 1  # bump when the split rule changes: it renames every split directory
SPLIT_SALT = 0x5EA1  # keeps the split's random stream apart from prepare's val split (also seeded by s)
IMAGES, LABELS, CLASS_INFO = "stage_2_train_images", "stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"
POSITIVE = "Lung Opacity"
# TrainConfig fields that change how a run executes, not what it learns (pneumo.training.fit keeps the
# same set for resuming): a finished run whose config differs only in these is reused.
EXECUTION_FIELDS = {"threads", "num_workers", "max_time"}


def default_out() -> Path:
    return Path(os.environ.get("PNEUMO_OUTPUTS", "outputs")) / "bench"


# ------------------------------------------------------------------ splits


def _csv_lines(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """(header line, [(patientId, original line)]): lines are kept byte for byte."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if not lines:
        raise ValueError(f"{path}: empty file")
    rows = []
    for line in lines[1:]:
        if not line.strip():
            continue
        fields = next(csv.reader(io.StringIO(line)), [""])
        rows.append((fields[0].strip() if fields else "", line))
    return lines[0], rows


def _image_files(data_dir: Path) -> dict[str, Path]:
    folder = data_dir / IMAGES
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return {(p.stem if p.suffix.lower() == ".dcm" else p.name): p for p in files}


def read_patients(data_dir) -> dict[str, str]:
    """{patientId: class} for every labelled patient with an image; class from the class-info
    file ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal"), else from Target."""
    data_dir = Path(data_dir)
    _, labels = _csv_lines(data_dir / LABELS)
    target: dict[str, int] = {}
    for pid, line in labels:
        fields = next(csv.reader(io.StringIO(line)))
        try:
            t = int(float(fields[5]))
        except (IndexError, ValueError):
            t = 0
        target[pid] = max(target.get(pid, 0), t)
    classes: dict[str, str] = {}
    if (data_dir / CLASS_INFO).is_file():
        for pid, line in _csv_lines(data_dir / CLASS_INFO)[1]:
            fields = next(csv.reader(io.StringIO(line)))
            if len(fields) > 1:
                classes.setdefault(pid, fields[1].strip())
    images = _image_files(data_dir)
    return {pid: classes.get(pid) or (POSITIVE if t == 1 else "Target 0")
            for pid, t in target.items() if pid in images}


HEAD_BYTES = 4096  # of each image: a DICOM's header with its SOP Instance UID, far before the pixels


def data_fingerprint(data_dir, test_fraction: float) -> str:
    """Hash of the CSV contents, each image's name, size and first HEAD_BYTES, the test fraction and
    the rule. Not modification times: a copy of the same data (rsync without -t, a fresh checkout of
    a shared folder) keeps its splits, and so its finished runs."""
    data_dir = Path(data_dir)
    h = hashlib.sha256(f"split-v{SPLIT_VERSION}|{test_fraction}".encode())
    for name in (LABELS, CLASS_INFO):
        path = data_dir / name
        h.update(path.read_bytes() if path.is_file() else b"-")
    for name, path in _image_files(data_dir).items():
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
        h.update(f"{name}|{path.name}|{path.stat().st_size}|".encode() + hashlib.sha256(head).digest())
    return h.hexdigest()[:12]


def split_patients(classes: dict[str, str], test_fraction: float, seed: int) -> set[str]:
    """The TEST patients of split `seed`: round(n * test_fraction) of each class, at least one
    and never all of a class with two or more patients."""
    rng = np.random.default_rng([SPLIT_SALT, seed])
    test: set[str] = set()
    for klass in sorted(set(classes.values())):
        pids = sorted(p for p, c in classes.items() if c == klass)
        rng.shuffle(pids)
        n = int(round(len(pids) * test_fraction))
        if len(pids) > 1:
            n = min(max(n, 1), len(pids) - 1)
        test.update(pids[:n])
    return test


def _write_part(src: Path, dst: Path, pids: set[str], images: dict[str, Path]) -> None:
    (dst / IMAGES).mkdir(parents=True)
    for pid in sorted(pids):
        (dst / IMAGES / images[pid].name).symlink_to(images[pid].resolve())
    for name in (LABELS, CLASS_INFO):
        if not (src / name).is_file():
            continue
        header, rows = _csv_lines(src / name)
        text = header + "".join(line if line.endswith(("\n", "\r")) else line + "\n"
                                for pid, line in rows if pid in pids)
        (dst / name).write_text(text, encoding="utf-8")


def make_split(data_dir, root, split: int, test_fraction: float = 0.25) -> Path:
    """Materialise split `split` as root/<fingerprint>/split<split>/{dev,test}/ (RSNA layout,
    symlinked images, filtered CSVs in the source's row order) and return that split directory.
    Built in a temporary directory and renamed; reused when present."""
    from pneumo.io import atomic_dir, atomic_write_json

    data_dir = Path(data_dir).resolve()
    out = Path(root) / data_fingerprint(data_dir, test_fraction) / f"split{split}"
    if (out / "split.json").is_file():
        return out
    classes = read_patients(data_dir)
    if len(classes) < 2:
        raise ValueError(f"{data_dir}: {len(classes)} labelled patients with images; a split needs at least 2")
    images = _image_files(data_dir)
    test = split_patients(classes, test_fraction, split)
    dev = set(classes) - test
    with atomic_dir(out) as tmp:
        _write_part(data_dir, tmp / "dev", dev, images)
        _write_part(data_dir, tmp / "test", test, images)
        counts = {part: {k: sum(classes[p] == k for p in pids) for k in sorted(set(classes.values()))}
                  for part, pids in (("dev", dev), ("test", test))}
        atomic_write_json(tmp / "split.json", {
            "data_dir": str(data_dir), "split": split, "seed": split, "test_fraction": test_fraction,
            "n_dev": len(dev), "n_test": len(test), "classes": counts, "split_version": SPLIT_VERSION})
    return out


# ------------------------------------------------------------------ one split


def _image_counts(annotations: Path, labels: Path) -> dict:
    """False-positive images (no opacity, >= 1 box), positives with >= 1 box, boxes per image."""
    truth: dict[str, bool] = {}  # patientId -> has an opacity box (read here: no package internals)
    for pid, line in _csv_lines(labels)[1]:
        fields = next(csv.reader(io.StringIO(line)))
        truth[pid] = truth.get(pid, False) or any(f.strip() for f in fields[1:5])
    predicted = json.loads(annotations.read_text())["images"]
    n_boxes = {pid: len(a["boxes"]) for pid, a in predicted.items()}
    negatives = [pid for pid, positive in truth.items() if not positive]
    positives = [pid for pid, positive in truth.items() if positive]
    return {"n_test_negative": len(negatives),
            "fp_images": sum(n_boxes.get(pid, 0) > 0 for pid in negatives),
            "tp_images": sum(n_boxes.get(pid, 0) > 0 for pid in positives),
            "boxes_per_image": round(sum(n_boxes.values()) / max(len(n_boxes), 1), 3)}


def score_bounds(submission: Path, labels: Path) -> dict:
    """What bounds a split's mAP, by the official metric on the same predictions: without the
    boxes on negative images (what a perfect negative gate would score) and on the positive images
    that got a box only (how good the boxes are where the gate let them through)."""
    from pneumo.data.submission import read_labels, read_submission
    from pneumo.metrics import mean_average_precision

    truth, predicted = read_labels(labels), read_submission(submission)
    positives = {pid for pid, boxes in truth.items() if len(boxes)}
    boxed = {pid for pid in positives if pid in predicted and len(predicted[pid][0])}
    on_positives = {pid: p for pid, p in predicted.items() if pid in positives}
    return {"test_map_without_fp_images": mean_average_precision(truth, on_positives).map,
            "test_map_boxed_positives": (mean_average_precision({pid: truth[pid] for pid in boxed}, predicted).map
                                         if boxed else None)}


def _changed(saved: dict, config) -> list[str]:
    current = config.to_dict()
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k not in EXECUTION_FIELDS)


def run_split(config, split_dir: Path, run_dir: Path, seed: int) -> dict:
    """Train (or reuse) the run of one split and score it on the split's TEST part."""
    from pneumo.deploy.predict import predict_folder
    from pneumo.errors import RunError
    from pneumo.io import atomic_write_json
    from pneumo.training.fit import fit
    from pneumo.training.rundir import RunDir

    info = json.loads((split_dir / "split.json").read_text())
    test_dir = split_dir / "test"
    run = RunDir(run_dir)
    result_file = run_dir.parent / f"{run_dir.name}.result.json"
    if run.finished():
        changed = _changed(run.read_config(), config)
        if changed:
            raise RunError(f"{run_dir}: a finished run with other parameters ({', '.join(changed)}); "
                           "choose another --label or delete that run directory")
        cached = json.loads(result_file.read_text()) if result_file.is_file() else {}
        if cached.get("config") == config.to_dict():
            print(f"split {seed}: reusing {result_file}", flush=True)
            result, submission = cached["result"], run_dir / "test-predictions" / "submission.csv"
            if "test_map_without_fp_images" not in result and submission.is_file():  # saved before they existed
                result.update(score_bounds(submission, test_dir / LABELS))
            return result
        metrics = run.metrics()
        print(f"split {seed}: reusing the finished run {run_dir}", flush=True)
    else:
        print(f"split {seed}: training {run_dir} on {info['n_dev']} dev patients", flush=True)
        metrics = fit(config, run_dir)
    t0 = time.perf_counter()
    predictions = run_dir / "test-predictions"
    summary = predict_folder(run_dir, test_dir / IMAGES, predictions, labels=test_dir / LABELS, images="none")
    predict_s = time.perf_counter() - t0
    counts = _image_counts(predictions / "annotations.json", test_dir / LABELS)
    counts.update(score_bounds(predictions / "submission.csv", test_dir / LABELS))
    score = json.loads((predictions / "score.json").read_text())  # the official mAP, as predict wrote it
    # the same model with horizontal-flip test-time augmentation (predict --tta), on the same images
    flipped = run_dir / "test-predictions-tta"
    predict_folder(run_dir, test_dir / IMAGES, flipped, labels=test_dir / LABELS, images="none", tta=True)
    tta_map = json.loads((flipped / "score.json").read_text())["map"]
    result = {
        "seed": seed, "n_dev": info["n_dev"], "n_test": info["n_test"],
        "n_test_positive": info["classes"]["test"].get(POSITIVE, 0),
        "test_map": score["map"], "test_map_tta": tta_map, "val_map": metrics.get("best_val_map"),
        "threshold": metrics.get("threshold"),
        "train_seconds": metrics.get("wall_time_s"), "predict_seconds": round(predict_s, 1),
        "train_images_per_s": metrics.get("train_images_per_s"), "epochs_done": metrics.get("epochs_done"),
        "best_epoch": metrics.get("best_epoch"), "stopped_early": metrics.get("stopped_early"),
        "n_train": metrics.get("n_train"), "n_val": metrics.get("n_val"),
        "n_scored": score.get("n_images", summary.get("n_scored")),
        "n_errors": summary.get("n_errors"), **counts, "run_dir": str(run_dir),
    }
    atomic_write_json(result_file, {"config": config.to_dict(), "result": result})
    print(f"split {seed}: test mAP {result['test_map']:.4f} (flip TTA {tta_map:.4f})  val mAP {result['val_map']}  "
          f"false-positive images {counts['fp_images']}/{counts['n_test_negative']}", flush=True)
    return result


def tuning_bounds(splits: list[dict], config) -> list[dict]:
    """Per split, the official mAP of its model's test outputs under post-processing tuned elsewhere
    than on its own ~150-image validation split, searched as training searches (config.postprocess):

    pooled: on the other splits' held-out outputs, each from its own model (out of fold for it),
    leaving out this split's test patients: two to four times the images of one validation split;
    on_test: on this split's own test outputs, an upper bound for any tuning of this model (a
    bound, never a result).

    splits: [{"outputs": {patientId: (output, frame, opacity)} (model_outputs), "truth": {patientId: boxes}}]."""
    from pneumo.metrics import mean_average_precision
    from pneumo.models.postprocess import PostProcess, apply
    from pneumo.models.scoring import search

    start = PostProcess(threshold=config.threshold, min_box_area=config.min_box_area)

    def tuned(outputs: dict, truth: dict) -> PostProcess:
        keys = list(outputs)
        opacity = {k: outputs[k][2] for k in keys} if config.classifier else None
        return search({k: outputs[k][0] for k in keys}, {k: outputs[k][1] for k in keys},
                      {k: truth[k] for k in keys}, opacity, start, config.postprocess).settings

    def score(split: dict, settings: PostProcess) -> float:
        predicted = {pid: apply(out, settings, *frame, opacity)
                     for pid, (out, frame, opacity) in split["outputs"].items()}
        return mean_average_precision({pid: split["truth"][pid] for pid in predicted}, predicted).map

    results = []
    for i, split in enumerate(splits):
        pool, truth = {}, {}
        for j, other in enumerate(splits):
            for pid, value in other["outputs"].items():
                if j != i and pid not in split["truth"]:
                    pool[(j, pid)], truth[(j, pid)] = value, other["truth"][pid]
        pooled = tuned(pool, truth)
        results.append({"test_map_pooled_tuning": score(split, pooled), "pooled_tuning_images": len(pool),
                        "pooled_postprocess": pooled.to_dict(),
                        "test_map_tuned_on_test": score(split, tuned(split["outputs"], split["truth"]))})
    return results


def _tuning_columns(config, split_dirs: list[Path], per_split: list[dict]) -> None:
    """Adds tuning_bounds' figures to each split's result (one more forward pass over each test part)."""
    from pneumo.data.layout import read_labels
    from pneumo.deploy.predict import model_outputs

    splits = [{"outputs": model_outputs(Path(result["run_dir"]), split_dir / "test" / IMAGES),
               "truth": read_labels(split_dir / "test" / LABELS)}
              for split_dir, result in zip(split_dirs, per_split)]
    for result, bounds in zip(per_split, tuning_bounds(splits, config)):
        result.update(bounds)
    pooled = ", ".join(_fmt(r["test_map_pooled_tuning"]) for r in per_split)
    on_test = ", ".join(_fmt(r["test_map_tuned_on_test"]) for r in per_split)
    print(f"post-processing tuned on the other splits' pooled held-out outputs: test mAP {pooled}; "
          f"tuned on the test part itself (a bound): {on_test}", flush=True)


# ------------------------------------------------------------------ report


def _mean_std(values) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return round(statistics.mean(values), 4), (round(statistics.stdev(values), 4) if len(values) > 1 else None)


def _fmt(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table(entries: list[dict]) -> str:
    lines = [
        "# Real-data benchmark",
        "",
        "Development-set figures: each split trains on its DEV patients and scores the official RSNA mAP on its",
        "held-out TEST patients of the same development set. Use them to choose between configurations;",
        "never report them as test scores. `nox -s bench -- real --label NAME ...` adds or replaces a row.",
        "",
        "What bounds it: the mean test mAP without the false-positive images (a perfect negative gate), and on",
        "the positive images that got a box only (the boxes). Post-processing tuned elsewhere than on the run's",
        "validation split, on the same test outputs: on the other splits' pooled held-out outputs (pooled tuning),",
        "and on the test part itself (an upper bound for any tuning of these models, not a result).",
        "",
        "| label | test mAP (mean ± std) | per split | val mAP (mean) | false-positive images "
        "| without them | boxed positives only | pooled tuning | tuned on test | splits | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        splits = e["per_split"]
        fp = sum(s["fp_images"] for s in splits)
        neg = sum(s["n_test_negative"] for s in splits)
        # entries written before these figures existed have none: a dash
        bounds = [_mean_std(s.get(key) for s in splits)[0]  # _mean_std skips the missing ones
                  for key in ("test_map_without_fp_images", "test_map_boxed_positives",
                              "test_map_pooled_tuning", "test_map_tuned_on_test")]
        lines.append(f"| {e['label']} | {_fmt(e['test_map_mean'])} ± {_fmt(e['test_map_std'])} "
                     f"| {', '.join(_fmt(s['test_map']) for s in splits)} | {_fmt(e['val_map_mean'])} "
                     f"| {fp}/{neg} | {' | '.join(_fmt(b) for b in bounds)} | {len(splits)} "
                     f"| {e['total_seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def _save(out: Path, entry: dict) -> list[dict]:
    from pneumo.io import atomic_write_json, atomic_write_text

    path = out / "real.json"
    try:
        entries = json.loads(path.read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        entries = []
    entries = [entry if e.get("label") == entry["label"] else e for e in entries]
    if not any(e is entry for e in entries):
        entries.append(entry)
    atomic_write_json(path, {"benchmark": "real", "entries": entries})
    atomic_write_text(out / "real.md", table(entries))
    return entries


# ------------------------------------------------------------------ command


def _profile_path(profile: str) -> Path:
    for path in (Path(profile), ROOT / "params" / f"{profile}.yaml", ROOT / "params" / profile):
        if path.is_file():
            return path
    raise SystemExit(f"--profile {profile}: neither a file nor params/{profile}.yaml")


def default_label(profile: Path, overrides: list[str]) -> str:
    return "+".join([profile.stem, *overrides])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nox -s bench -- real",
        description="Train a profile on several stratified patient splits of the real RSNA data and report "
                    "the official mAP on each split's held-out part (development-set figures, never test "
                    "scores) in <out>/real.json and real.md. Not part of a plain `nox -s bench`.")
    p.add_argument("--data-dir", type=Path, help=f"RSNA-layout directory (default: {DEFAULT_DATA} when present)")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help="TrainConfig params file: params/<NAME>.yaml or a path (default: %(default)s)")
    p.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (repeatable), as `pneumo train -p`")
    p.add_argument("--splits", type=int, default=MIN_SPLITS,
                   help="repeated splits, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.25,
                   help="held-out part of each class (default: %(default)s)")
    p.add_argument("--label", help="name of the result row (default: profile name plus the overrides)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: outputs/bench)")
    return p


def main(argv=None) -> int:
    from pneumo.config import load_config
    from pneumo.errors import PneumoError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    data_dir = args.data_dir
    if data_dir is None:
        if not DEFAULT_DATA.is_dir():
            print(f"real: no data at {DEFAULT_DATA}; pass --data-dir DIR (an RSNA-layout directory)", file=sys.stderr)
            return 2
        data_dir = DEFAULT_DATA
    data_dir = data_dir.expanduser().resolve()
    if not (data_dir / LABELS).is_file() or not (data_dir / IMAGES).is_dir():
        print(f"real: {data_dir} has no {LABELS} and {IMAGES}/; pass --data-dir DIR (an RSNA-layout directory)",
              file=sys.stderr)
        return 2
    if args.splits < 2:
        print("real: --splits must be at least 2 (a spread needs two splits)", file=sys.stderr)
        return 2
    if not 0 < args.test_fraction < 1:
        print("real: --test-fraction must be in (0, 1)", file=sys.stderr)
        return 2
    warnings = []
    if args.splits < MIN_SPLITS:
        warnings.append(f"{args.splits} splits: the benchmark's rule is at least {MIN_SPLITS}; "
                        "do not compare this entry with others")
        print(f"real: warning: {warnings[-1]}", file=sys.stderr)
    out = (args.out or default_out())
    profile = _profile_path(args.profile)
    label = args.label or default_label(profile, args.overrides)
    safe_label = re.sub(r"[^\w.,=+-]", "_", label)
    try:
        base = load_config(profile, args.overrides)
    except PneumoError as exc:
        print(f"real: {exc}", file=sys.stderr)
        return 1
    for name in ("data_dir", "seed"):
        if getattr(base, name) != getattr(type(base)(), name):
            print(f"real: note: {name} is set per split by the benchmark; the profile's value is ignored",
                  file=sys.stderr)

    start = time.perf_counter()
    fingerprint = data_fingerprint(data_dir, args.test_fraction)
    budget = f"at most {base.max_time:g} min of training per split (max_time)" if base.max_time else "no max_time"
    print(f"real: {label}: {args.splits} splits of {data_dir} (test fraction {args.test_fraction:g}), "
          f"{base.epochs} epochs at {base.image_size} px, {budget}", flush=True)
    per_split, split_dirs, config = [], [], base
    try:
        for s in range(args.splits):
            t0 = time.perf_counter()
            split_dir = make_split(data_dir, out / "real" / "splits", s, args.test_fraction)
            prep = time.perf_counter() - t0
            config = dataclasses.replace(base, data_dir=str((split_dir / "dev").resolve()), seed=s)
            result = run_split(config, split_dir, out / "real" / "runs" / safe_label / f"split{s}", s)
            result["split_seconds"] = round(prep, 1)
            per_split.append(result)
            split_dirs.append(split_dir)
        _tuning_columns(config, split_dirs, per_split)
    except PneumoError as exc:
        print(f"real: {exc}", file=sys.stderr)
        return 1

    import torch

    test_mean, test_std = _mean_std(s["test_map"] for s in per_split)
    val_mean, val_std = _mean_std(s["val_map"] for s in per_split)
    total = sum((s["train_seconds"] or 0) + s["predict_seconds"] for s in per_split)
    resolved = config.to_dict()
    resolved.update(data_dir=str(out / "real" / "splits" / fingerprint / "split<s>" / "dev"), seed="<s>")
    entry = {
        "label": label, "profile": str(profile.resolve().relative_to(ROOT) if profile.resolve().is_relative_to(ROOT)
                                       else profile.resolve()),
        "overrides": args.overrides, "config": resolved,
        "command": shlex.join(["nox", "-s", "bench", "--", "real", *argv]),
        "data_dir": str(data_dir), "data_fingerprint": fingerprint,
        "n_patients": per_split[0]["n_dev"] + per_split[0]["n_test"],
        "splits": args.splits, "test_fraction": args.test_fraction,
        "test_map_mean": test_mean, "test_map_std": test_std, "val_map_mean": val_mean, "val_map_std": val_std,
        "per_split": per_split,
        "total_seconds": round(total, 1), "budget_minutes_per_split": config.max_time or None,
        "wall_seconds_this_call": round(time.perf_counter() - start, 1),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "note": "development-set figures (held-out part of the development set), never test scores",
        "warnings": warnings,
    }
    entries = _save(out, entry)
    print(f"\nwrote {out / 'real.json'} and {out / 'real.md'}\n", flush=True)
    print(table(entries), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
