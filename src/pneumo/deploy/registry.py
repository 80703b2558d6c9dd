"""The model registry: a finished run's best checkpoint exported as outputs/models/<name>/vN/
(model.ckpt, model.json, its text model.md, and what an extras hook adds: model.onnx and the
figures of pneumo.deploy.modelcard), and the one rule that turns a path someone gives into a checkpoint.

Versions are never overwritten: an export claims a new vN by creating its directory, so two
exports into one family can never both get the same version. model.json is the card as data and
model.md is rendered from it alone (`card_markdown`), so the two always agree; a test score
recorded later (`record_test_score`) updates both.

A card names paths relative to the outputs root (runs/<sweep>/marathon, data/<fingerprint>)
and, for a path outside it, only its last part: never where the training machine kept it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pneumo.deploy.cardfile import read_card
from pneumo.errors import ModelError, RunError
from pneumo.io import atomic_write_json, atomic_write_text
from pneumo.training.rundir import RunDir, read_json

MODEL_CHECKPOINT = "model.ckpt"
MODEL_CARD = "model.json"
MODEL_MARKDOWN = "model.md"
CARD_METRICS = ("best_val_map", "best_epoch", "per_threshold", "epochs_done", "wall_time_s", "n_train", "n_val")
PACKAGES = ("torch", "lightning", "timm")  # their versions on the card, beside pneumo's (when installed)
INTENDED_USE = """\
**Intended use.** Research on detecting pneumonia opacities in frontal (PA/AP) chest radiographs of
the kind in the RSNA Pneumonia Detection Challenge: comparing methods, studying errors, drafting
boxes for a human reader to check. Its boxes and confidences are suggestions to be reviewed.

**Not for.** Diagnosis, triage or any clinical decision about a patient; images other than
frontal chest radiographs (lateral views, CT, children's films if the training data had few);
populations or scanners unlike the training data without checking the subgroup figures below on
local data first. The validation split was used to choose the post-processing, so its figures
are optimistic; a held-out test set says more."""
SYNTHETIC = ("**Synthetic data.** This model was trained on synthetic images written by `pneumo synth` "
             "(drawn shapes in DICOM files, not radiographs of patients). Its figures test the software; "
             "they say nothing about how it does on real chest X-rays.")


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
        return path / MODEL_CHECKPOINT, read_card(path / MODEL_CARD)
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


def model_version_dir(model) -> Path | None:
    """The version directory a model path names (a version, its model.ckpt, a family: its latest),
    None for anything else (a run directory, a loose checkpoint, a predictor object)."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    try:
        checkpoint, _ = resolve_model(model)
    except ModelError:
        return None
    version = checkpoint.parent
    return version if checkpoint.name == MODEL_CHECKPOINT and (version / MODEL_CARD).is_file() else None


# ---------------------------------------------------------------- what a card says


def outputs_root_of(models_root) -> Path:
    """The outputs root a models folder belongs to (pneumo.paths.Outputs: <root>/models)."""
    from pneumo.paths import outputs_root

    models_root = Path(models_root)
    return models_root.parent if models_root.name == "models" else outputs_root()


def portable_path(path, root) -> str | None:
    """path relative to the outputs root when under it, else its last part alone."""
    if path is None or path == "":
        return path
    path = Path(path).expanduser().absolute()
    root = Path(root).expanduser().absolute()
    for inside, base in ((path, root), (path.resolve(), root.resolve())):
        if inside == base or base in inside.parents:
            return inside.relative_to(base).as_posix() or "."
    return path.name


def portable_text(text: str | None, root) -> str | None:
    """text (an error message) with each absolute path in it made portable (portable_path)."""
    if not text:
        return text
    return re.sub(r"(?<![\w.~])/[^\s:;,'\"()\[\]]+", lambda m: portable_path(m.group(0), root), text)


def portable_card(card: dict, root) -> dict:
    """The card with every path it names made portable (portable_path): the run, the parameters
    that are paths (data_dir, and any absolute path such as a weights file), the data, the test
    images and the paths in the note on missing subgroup figures."""
    card = dict(card)
    if card.get("source_run"):
        card["source_run"] = portable_path(card["source_run"], root)
    card["params"] = {k: portable_path(v, root) if isinstance(v, str) and (k == "data_dir" or v.startswith(("/", "~")))
                      else v for k, v in (card.get("params") or {}).items()}
    if card.get("subgroups_note"):
        card["subgroups_note"] = portable_text(card["subgroups_note"], root)
    for field, keys in (("training_data", ("source", "root")), ("test", ("images",))):
        if card.get(field):
            card[field] = {**card[field], **{k: portable_path(card[field][k], root) for k in keys
                                            if card[field].get(k)}}
    return card


def data_source(data_dir) -> tuple[bool | None, Path | None]:
    """(synthetic?, the RSNA-layout directory) of a run's data_dir; a prepared cache is followed to
    its source. synthetic is None when the source is not on this machine to look at."""
    from pneumo.data.synth import SYNTH_MARKER

    if not data_dir:
        return None, None
    path = Path(data_dir).expanduser()
    if (path / "manifest.json").is_file():  # a `pneumo prepare` output: what it was prepared from
        try:
            path = Path(json.loads((path / "manifest.json").read_text())["data_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, path
    if not path.is_dir():
        return None, path
    return (path / SYNTH_MARKER).is_file(), path


def package_versions() -> dict[str, str]:
    """pneumo's version and those of the packages that trained and run the model (those installed)."""
    from importlib import metadata

    from pneumo import __version__

    versions = {"pneumo": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# ---------------------------------------------------------------- export


def export_model(run_dir, models_root: Path, name: str, source_sweep: str, extras=None) -> Path:
    """Copy a finished run's best checkpoint into models_root/name/vN with its model card.

    Each export of a new run is a new version; exporting the same run again returns the
    version it already has. extras(checkpoint, directory, card) may write more files into
    directory (pneumo.deploy.modelcard: model.onnx) and returns fields to add to model.json;
    it runs before a version is claimed, and its files move into the version with the card.
    """
    run_dir = RunDir(run_dir)
    if not run_dir.finished():
        raise RunError(f"{run_dir.path}: not a finished run; nothing to export")
    root = outputs_root_of(models_root)
    family = Path(models_root) / name
    family.mkdir(parents=True, exist_ok=True)
    existing = _exported_version(family, run_dir, root)
    if existing is not None:
        return existing
    staging = Path(tempfile.mkdtemp(dir=family, prefix=".export-"))
    try:
        # the slow work (copy, extras) happens before a version is claimed, so a claimed vN fills at once
        shutil.copy2(run_dir.best_checkpoint, staging / MODEL_CHECKPOINT)
        card = _model_card(run_dir, name, None, source_sweep)
        if extras is not None:
            card.update(extras(staging / MODEL_CHECKPOINT, staging, card) or {})
        card = portable_card(card, root)
        atomic_write_text(staging / MODEL_MARKDOWN, card_markdown(card))
        target = _claim_version(family)
        atomic_write_json(target / MODEL_CARD, {**card, "version": target.name})
        for extra in sorted(p for p in staging.iterdir() if p.name != MODEL_CHECKPOINT):
            os.replace(extra, target / extra.name)
        os.replace(staging / MODEL_CHECKPOINT, target / MODEL_CHECKPOINT)  # last: a vN with it is complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _exported_version(family: Path, run_dir: RunDir, root: Path) -> Path | None:
    """The version this run was exported as: the same run (by its portable path, or the absolute
    path cards held before) with the same checkpoint."""
    absolute, portable = str(run_dir.path.resolve()), portable_path(run_dir.path, root)
    digest = _sha256(run_dir.best_checkpoint)
    for card_file in sorted(family.glob(f"v*/{MODEL_CARD}")):
        card = read_json(card_file)
        same = card.get("source_run") == absolute or (
            card.get("source_run") == portable and card.get("checkpoint_sha256") == digest)
        if same and (card_file.parent / MODEL_CHECKPOINT).is_file():
            return card_file.parent
    return None


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
    """The card as the run tells it (paths still absolute: export_model makes them portable)."""
    metrics, params = run_dir.metrics(), run_dir.read_config()
    synthetic, source = data_source(params.get("data_dir"))
    return {
        "name": name, "version": version,
        "params": params,
        "metrics": {k: metrics.get(k) for k in CARD_METRICS},
        "threshold": metrics.get("threshold"), "postprocess": metrics.get("postprocess"),
        "git_commit": _git_commit(), "data_fingerprint": metrics.get("data_fingerprint"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source_sweep": source_sweep,
        "source_run": str(run_dir.path.resolve()),
        "parent_run": {"sweep": source_sweep, "run": run_dir.path.name, "best_epoch": metrics.get("best_epoch"),
                       "best_val_map": metrics.get("best_val_map"), "epochs_done": metrics.get("epochs_done")},
        "training_data": {"synthetic": synthetic, "source": str(source) if source else None,
                          "fingerprint": metrics.get("data_fingerprint"),
                          "n_train": metrics.get("n_train"), "n_val": metrics.get("n_val")},
        "checkpoint_sha256": _sha256(run_dir.best_checkpoint),
        "packages": package_versions(),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- the test score


def record_test_score(model_version_dir, score: dict, images_dir, settings: dict | None = None) -> dict:
    """Put a test score (score.json of `pneumo predict --labels`) on a version's card: model.json's
    `test` field, replaced atomically, and model.md rendered again from it. settings: how predict
    ran when not as the card says (post-processing overrides, TTA). Returns the test field."""
    version = Path(model_version_dir)
    if not (version / MODEL_CARD).is_file():
        raise ModelError(f"{version}: not a model version (no {MODEL_CARD})")
    overall = (score.get("subgroups") or {}).get("overall") or {}
    test = {"map": score.get("map"), "n_images": overall.get("n_images", score.get("n_images")),
            "n_scored": score.get("n_images"), "per_threshold": score.get("per_threshold"),
            "images": portable_path(images_dir, outputs_root_of(version.parent.parent)),
            "scored_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings or None,
            "subgroups": score.get("subgroups")}
    with _locked(version):  # two predicts at once: model.json and model.md from the same writer
        card = {**read_json(version / MODEL_CARD), "test": test}
        atomic_write_json(version / MODEL_CARD, card)
        atomic_write_text(version / MODEL_MARKDOWN, card_markdown(card))
    return test


@contextmanager
def _locked(directory: Path):
    """An exclusive lock on a directory (flock on its descriptor: no file added); none where flock is not."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------- model.md


def card_markdown(card: dict) -> str:
    """model.md from model.json alone: intended use, training data, parameters, metrics overall
    and by subgroup (validation split, and the test set once scored), provenance."""
    from pneumo.deploy.subgroups import breakdown_markdown

    data = card.get("training_data") or {}
    lines = [f"# Model card: {card.get('name')}", "",
             "Pneumonia opacity boxes on chest X-rays (pneumo: a UNet with a mask or centre head; "
             "see the project's README).", ""]
    lines += [SYNTHETIC, ""] if data.get("synthetic") else []
    lines += [INTENDED_USE, "", "## Training data", "", *_data_lines(card, data)]
    lines += ["", "## Parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted((card.get("params") or {}).items())]
    metrics = card.get("metrics") or {}
    lines += ["", f"Post-processing chosen on the validation split: `{card.get('postprocess')}`", "",
              "## Metrics (validation split)", "",
              f"Best validation mAP {_figure(metrics.get('best_val_map'))} at epoch {metrics.get('best_epoch')} "
              f"of {metrics.get('epochs_done')}.", ""]
    breakdown = card.get("subgroups")
    lines += [breakdown_markdown(breakdown)] if breakdown else \
        [f"No subgroup figures: {card.get('subgroups_note') or 'the validation pass did not run for this export'}"]
    lines += _test_lines(card.get("test"))
    lines += _provenance_lines(card)
    return "\n".join(lines)


def _data_lines(card: dict, data: dict) -> list[str]:
    synthetic = {True: "yes: written by `pneumo synth`", False: "no",
                 None: "unknown (the data directory was not there to look at)"}[data.get("synthetic")]
    evaluated = data.get("fingerprint")
    lines = [f"- synthetic: {synthetic}", f"- source: `{data.get('source')}`",
             f"- data fingerprint: `{card.get('data_fingerprint')}`"
             + (f" (evaluated on `{evaluated}`)" if evaluated not in (None, card.get("data_fingerprint")) else ""),
             f"- images: {data.get('n_train')} training, {data.get('n_val')} validation"]
    for split in ("train", "val"):
        classes = data.get(f"{split}_classes")
        if classes:
            lines.append(f"- class balance ({split}): " + ", ".join(f"{k}: {v}" for k, v in classes.items()))
    return lines


def _test_lines(test: dict | None) -> list[str]:
    from pneumo.deploy.subgroups import breakdown_markdown

    if not test:
        return ["", "## Metrics (test set)", "", "Not scored yet: `pneumo predict MODEL_DIR IMAGES --labels LABELS` "
                "on a held-out set puts its score here."]
    lines = ["", "## Metrics (test set)", "",
             f"mAP {_figure(test.get('map'))} on {test.get('n_images')} labelled images of `{test.get('images')}` "
             f"(`pneumo predict --labels`, {test.get('scored_at')}; the metric counts {test.get('n_scored')}: "
             "an image with neither boxes nor predicted boxes does not count)."]
    if test.get("settings"):
        lines.append(f"Predicted with `{json.dumps(test['settings'])}`, not the card's own settings.")
    return lines + (["", breakdown_markdown(test["subgroups"])] if test.get("subgroups") else [])


def _provenance_lines(card: dict) -> list[str]:
    parent = card.get("parent_run") or {}
    packages = ", ".join(f"{k} {v}" for k, v in (card.get("packages") or {}).items())
    return ["", "## Provenance", "",
            f"- exported from run `{parent.get('run')}` of sweep `{parent.get('sweep', card.get('source_sweep'))}` "
            f"(best validation mAP {_figure(parent.get('best_val_map'))} at epoch {parent.get('best_epoch')}): "
            f"`{card.get('source_run')}`",
            f"- commit `{card.get('git_commit')}`, created {card.get('created_at')}",
            f"- packages: {packages or 'not recorded'}",
            "- files: model.ckpt (PyTorch Lightning checkpoint), model.json (this card as data), "
            "model.onnx (the network; its inputs and outputs are described in pneumo/portable.py)", ""]


def _figure(value) -> str:
    """A metric as the card shows it (three decimals), or what it is when not a number."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)
