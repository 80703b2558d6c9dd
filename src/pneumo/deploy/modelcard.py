"""What an exported model version holds besides its checkpoint: model.md (the model card, with
metrics by subgroup on the validation split) and model.onnx (pneumo.deploy.onnx).

`write_extras` is the hook pneumo.sweeps.sweep hands to `pneumo.deploy.registry.export_model`: it runs while
the version directory is filled, before model.ckpt marks the version complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pneumo.deploy.subgroups import breakdown_markdown, subgroup_scores
from pneumo.errors import PneumoError
from pneumo.io import atomic_write_text

log = logging.getLogger(__name__)

MODEL_MARKDOWN = "model.md"
INTENDED_USE = """\
**Intended use.** Research on detecting pneumonia opacities in frontal (PA/AP) chest radiographs of
the kind in the RSNA Pneumonia Detection Challenge: comparing methods, studying errors, drafting
boxes for a human reader to check. Its boxes and confidences are suggestions to be reviewed.

**Not for.** Diagnosis, triage or any clinical decision about a patient; images other than
frontal chest radiographs (lateral views, CT, children's films if the training data had few);
populations or scanners unlike the training data without checking the subgroup figures below on
local data first. The validation split was used to choose the post-processing, so its figures
are optimistic; a held-out test set says more."""


def validation_predictions(predictor, outputs=None, batch_size: int = 32) -> dict:
    """The checkpoint's boxes on its own validation split, with what the card reports about the data.

    Returns {"truth", "predictions", "attributes", "data"} keyed by patientId; DataError (or
    another PneumoError) when the prepared data cannot be opened.
    """
    from pneumo.data.datamodule import RsnaDataModule
    from pneumo.data.prepare import prepared_for

    prepared = prepared_for(predictor.config, outputs=outputs)
    dm = RsnaDataModule(prepared, predictor.config)
    images, features = prepared.images(), dm.features
    fields = ["patientId", "PatientSex", "PatientAge", "ViewPosition"]
    truth, predictions, attributes = {}, {}, {}
    for start in range(0, len(dm.val_rows), batch_size):
        rows = dm.val_rows[start:start + batch_size]
        metas = [features.loc[row, fields].to_dict() for row in rows]
        outputs_, opacity = predictor.outputs(np.asarray(images[rows]), metas)
        for i, (row, meta, output) in enumerate(zip(rows, metas, outputs_)):
            pid = meta["patientId"]
            predictions[pid] = predictor.boxes(output, *dm.frame[row], None if opacity is None else float(opacity[i]))
            truth[pid], attributes[pid] = dm.gt_boxes[row], meta
    train = features.loc[dm.train_rows]
    data = {"fingerprint": prepared.manifest.get("fingerprint"), "root": str(prepared.root),
            "n_train": int(len(dm.train_rows)), "n_val": int(len(dm.val_rows)),
            "train_classes": {str(k): int(v) for k, v in train["class"].value_counts().items()},
            "val_classes": {str(k): int(v) for k, v in features.loc[dm.val_rows, "class"].value_counts().items()}}
    return {"truth": truth, "predictions": predictions, "attributes": attributes, "data": data}


def card_markdown(card: dict, evaluation: dict | None, breakdown: dict | None, note: str = "") -> str:
    """The model card: intended use, training data, parameters, metrics overall and by subgroup."""
    metrics = card.get("metrics") or {}
    lines = [f"# Model card: {card.get('name')}", "",
             "Pneumonia opacity boxes on chest X-rays (pneumo: a UNet with a mask or centre head; "
             "see the project's README).", "", INTENDED_USE, "", "## Training data", ""]
    data = (evaluation or {}).get("data", {})
    lines += [f"- data fingerprint: `{card.get('data_fingerprint')}`"
              + (f" (evaluated on `{data['fingerprint']}`)"
                 if data.get("fingerprint") not in (None, card.get("data_fingerprint")) else ""),
              f"- images: {metrics.get('n_train', data.get('n_train'))} training, "
              f"{metrics.get('n_val', data.get('n_val'))} validation"]
    for split in ("train", "val"):
        classes = data.get(f"{split}_classes")
        if classes:
            lines.append(f"- class balance ({split}): " + ", ".join(f"{k}: {v}" for k, v in classes.items()))
    lines += ["", "## Parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted((card.get("params") or {}).items())]
    lines += ["", f"Post-processing chosen on the validation split: `{card.get('postprocess')}`", "",
              "## Metrics (validation split)", "",
              f"Best validation mAP {_figure(metrics.get('best_val_map'))} at epoch {metrics.get('best_epoch')} "
              f"of {metrics.get('epochs_done')}.", ""]
    lines += [breakdown_markdown(breakdown)] if breakdown else [f"No subgroup figures: {note}"]
    lines += ["", "## Provenance", "", f"- source run: `{card.get('source_run')}`",
              f"- sweep: `{card.get('source_sweep')}`, commit `{card.get('git_commit')}`, "
              f"created {card.get('created_at')}",
              "- files: model.ckpt (PyTorch Lightning checkpoint), model.json (this card as data), "
              "model.onnx (the network; its inputs and outputs are described in pneumo/portable.py)", ""]
    return "\n".join(lines)


def write_extras(checkpoint: Path, directory: Path, card: dict, outputs=None) -> dict:
    """model.onnx and model.md into directory; returns what model.json adds (the subgroup breakdown).

    The hook pneumo.deploy.registry.export_model calls. A checkpoint or data that cannot be loaded leaves
    the card without subgroup figures (it says why) and no model.onnx: the export still succeeds.
    """
    from pneumo.deploy.predict import load_predictor

    breakdown, evaluation, note = None, None, ""
    try:
        predictor = load_predictor(checkpoint, device="cpu")
    except PneumoError as exc:
        predictor, note = None, f"the checkpoint could not be loaded ({exc})"
    if predictor is not None:
        from pneumo.deploy.onnx import ONNX_FILE, export_onnx

        export_onnx(predictor, Path(directory) / ONNX_FILE)
        try:
            evaluation = validation_predictions(predictor, outputs=outputs)
            breakdown = subgroup_scores(evaluation["truth"], evaluation["predictions"], evaluation["attributes"])
        except PneumoError as exc:
            note = f"the validation data could not be opened ({exc})"
    if note:
        log.warning("model card for %s: %s", card.get("source_run"), note)
    atomic_write_text(Path(directory) / MODEL_MARKDOWN, card_markdown(card, evaluation, breakdown, note))
    return {"subgroups": breakdown, "training_data": (evaluation or {}).get("data")}


def complete_version(model_dir, outputs=None) -> list[str]:
    """Add model.md and model.onnx to a version exported before they existed; returns what was added.

    Only missing files are written (model.json and the rest are left as they are).
    """
    import json
    import os
    import shutil
    import tempfile

    from pneumo.deploy.onnx import ONNX_FILE

    model_dir = Path(model_dir)
    missing = [name for name in (MODEL_MARKDOWN, ONNX_FILE) if not (model_dir / name).exists()]
    if not missing:
        return []
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".extras-"))
    try:
        card = json.loads((model_dir / "model.json").read_text())
        write_extras(model_dir / "model.ckpt", staging, card, outputs=outputs)
        added = [name for name in missing if (staging / name).exists()]
        for name in added:
            os.replace(staging / name, model_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return added


def _figure(value) -> str:
    """A metric as the card's tables show it (three decimals), or what it is when not a number."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)
