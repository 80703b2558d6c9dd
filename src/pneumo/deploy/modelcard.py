"""What an exported model version holds besides its checkpoint and card: the figures the card
reports about the validation split (metrics by subgroup, the data's class balance: a second pass
over the split) and model.onnx (pneumo.deploy.onnx). model.md itself is rendered from model.json
by pneumo.deploy.registry.card_markdown.

`write_extras` is the hook pneumo.sweeps.sweep hands to `pneumo.deploy.registry.export_model`: it runs while
the version directory is filled, before model.ckpt marks the version complete.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from pneumo.deploy.registry import (
    MODEL_CARD,
    MODEL_MARKDOWN,
    card_markdown,
    data_source,
    outputs_root_of,
    portable_card,
)
from pneumo.deploy.subgroups import subgroup_scores
from pneumo.errors import PneumoError
from pneumo.io import atomic_write_text

log = logging.getLogger(__name__)


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
    synthetic, source = data_source(prepared.root)  # the directory it was prepared from: pneumo synth's?
    data = {"synthetic": synthetic, "source": str(source) if source else None,
            "fingerprint": prepared.manifest.get("fingerprint"), "root": str(prepared.root),
            "n_train": int(len(dm.train_rows)), "n_val": int(len(dm.val_rows)),
            "train_classes": {str(k): int(v) for k, v in train["class"].value_counts().items()},
            "val_classes": {str(k): int(v) for k, v in features.loc[dm.val_rows, "class"].value_counts().items()}}
    return {"truth": truth, "predictions": predictions, "attributes": attributes, "data": data}


def write_extras(checkpoint: Path, directory: Path, card: dict, outputs=None) -> dict:
    """model.onnx into directory; returns what model.json adds: the subgroup breakdown of the
    validation split (or subgroups_note: why there is none) and the training data's figures.

    The hook pneumo.deploy.registry.export_model calls (it renders model.md from the card with these
    fields). A checkpoint or data that cannot be loaded leaves the card without subgroup figures
    (it says why) and no model.onnx: the export still succeeds.
    """
    from pneumo.deploy.predict import load_predictor

    breakdown, evaluation, note = None, None, ""
    try:
        predictor = load_predictor(checkpoint, device="cpu")
    except PneumoError as exc:
        # the checkpoint by its name in the version, not the staging path it was loaded from
        reason = str(exc).replace(str(checkpoint), Path(checkpoint).name)
        predictor, note = None, f"the checkpoint could not be loaded ({reason})"
    if predictor is not None:
        from pneumo.deploy.onnx import ONNX_FILE, export_onnx

        # named by the card, not by the staging path the checkpoint was loaded from
        export_onnx(dataclasses.replace(predictor, name=str(card.get("name"))), Path(directory) / ONNX_FILE)
        try:
            evaluation = validation_predictions(predictor, outputs=outputs)
            breakdown = subgroup_scores(evaluation["truth"], evaluation["predictions"], evaluation["attributes"])
        except PneumoError as exc:
            note = f"the validation data could not be opened ({exc})"
    if note:
        log.warning("model card for %s: %s", card.get("source_run"), note)
    data = {**(card.get("training_data") or {}), **((evaluation or {}).get("data") or {})}
    return {"subgroups": breakdown, "subgroups_note": note or None, "training_data": data}


def complete_version(model_dir, outputs=None) -> list[str]:
    """Add model.md and model.onnx to a version exported before they existed; returns what was added.

    Only missing files are written (model.json and the rest are left as they are); model.md shows
    the validation figures computed now.
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
        card = json.loads((model_dir / MODEL_CARD).read_text())
        fields = write_extras(model_dir / "model.ckpt", staging, card, outputs=outputs)
        root = outputs_root_of(model_dir.parent.parent)
        atomic_write_text(staging / MODEL_MARKDOWN, card_markdown(portable_card({**card, **fields}, root)))
        added = [name for name in missing if (staging / name).exists()]
        for name in added:
            os.replace(staging / name, model_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return added
