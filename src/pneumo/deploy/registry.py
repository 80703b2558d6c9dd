"""The model registry: a finished run's best checkpoint exported as outputs/models/<name>/vN/
(model.ckpt, model.json, and what an extras hook adds: model.md, model.onnx), and the one rule
that turns a path someone gives into a checkpoint.

Versions are never overwritten: an export claims a new vN by creating its directory, so two
exports into one family can never both get the same version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pneumo.errors import ModelError, RunError
from pneumo.io import atomic_write_json
from pneumo.training.rundir import RunDir, read_json

MODEL_CHECKPOINT = "model.ckpt"
MODEL_CARD = "model.json"
CARD_METRICS = ("best_val_map", "best_epoch", "per_threshold", "epochs_done", "wall_time_s", "n_train", "n_val")


def _version_number(path: Path) -> int | None:
    return int(path.name[1:]) if path.name.startswith("v") and path.name[1:].isdigit() else None


def latest_version(family_dir) -> Path | None:
    """The highest complete version (vN with its model.ckpt) of a model family, None if it has none."""
    family_dir = Path(family_dir)
    versions = [p for p in family_dir.glob("v*") if _version_number(p) is not None
                and (p / MODEL_CHECKPOINT).is_file()]
    return max(versions, key=_version_number, default=None)


def resolve_model(path) -> tuple[Path, dict]:
    """(checkpoint file, model card or {}) for a .ckpt file, a run directory, a model version
    directory or a model family directory (its latest version)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path, {}
    if (path / MODEL_CHECKPOINT).is_file():
        return path / MODEL_CHECKPOINT, read_json(path / MODEL_CARD)
    run_dir = RunDir(path)
    if run_dir.best_checkpoint.is_file():
        return run_dir.best_checkpoint, {}
    latest = latest_version(path)
    if latest is not None:
        return resolve_model(latest)
    if not path.exists():
        raise ModelError(f"{path}: no such model (give a .ckpt file, a run directory or a model directory)")
    best = run_dir.best_checkpoint.relative_to(path)
    raise ModelError(f"{path}: no {MODEL_CHECKPOINT}, {best} or v*/{MODEL_CHECKPOINT} inside")


def export_model(run_dir, models_root: Path, name: str, source_sweep: str, extras=None) -> Path:
    """Copy a finished run's best checkpoint into models_root/name/vN with its model card.

    Each export of a new run is a new version; exporting the same run again returns the
    version it already has. extras(checkpoint, directory, card) may write more files into
    directory (pneumo.deploy.modelcard: model.md, model.onnx) and returns fields to add to model.json;
    it runs before a version is claimed, and its files move into the version with the card.
    """
    run_dir = RunDir(run_dir)
    if not run_dir.finished():
        raise RunError(f"{run_dir.path}: not a finished run; nothing to export")
    source_run = str(run_dir.path.resolve())
    family = Path(models_root) / name
    family.mkdir(parents=True, exist_ok=True)
    for card in sorted(family.glob(f"v*/{MODEL_CARD}")):
        if read_json(card).get("source_run") == source_run and (card.parent / MODEL_CHECKPOINT).is_file():
            return card.parent
    staging = Path(tempfile.mkdtemp(dir=family, prefix=".export-"))
    try:
        # the slow work (copy, extras) happens before a version is claimed, so a claimed vN fills at once
        shutil.copy2(run_dir.best_checkpoint, staging / MODEL_CHECKPOINT)
        card = _model_card(run_dir, name, None, source_sweep)
        if extras is not None:
            card.update(extras(staging / MODEL_CHECKPOINT, staging, card) or {})
        target = _claim_version(family)
        atomic_write_json(target / MODEL_CARD, {**card, "version": target.name})
        for extra in sorted(p for p in staging.iterdir() if p.name != MODEL_CHECKPOINT):
            os.replace(extra, target / extra.name)
        os.replace(staging / MODEL_CHECKPOINT, target / MODEL_CHECKPOINT)  # last: a vN with it is complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _claim_version(family: Path) -> Path:
    """Create the next free vN. mkdir either creates the directory or fails, never both for two
    exporters: the loser takes N+1 (a rename would silently replace an empty directory)."""
    number = max((_version_number(p) or 0 for p in family.glob("v*")), default=0) + 1
    while True:
        target = family / f"v{number}"
        try:
            target.mkdir()
            return target
        except FileExistsError:
            number += 1


def _model_card(run_dir: RunDir, name: str, version: str | None, source_sweep: str) -> dict:
    metrics = run_dir.metrics()
    return {
        "name": name, "version": version,
        "params": run_dir.read_config(),
        "metrics": {k: metrics.get(k) for k in CARD_METRICS},
        "threshold": metrics.get("threshold"), "postprocess": metrics.get("postprocess"),
        "git_commit": _git_commit(), "data_fingerprint": metrics.get("data_fingerprint"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source_sweep": source_sweep,
        "source_run": str(run_dir.path.resolve()),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
