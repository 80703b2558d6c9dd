"""Batch inference on DICOM files: annotations.json, Kaggle submission.csv, annotated PNGs, errors.csv;
with dicom_sr / dicom_gsps also sr/<patientId>.dcm / gsps/<patientId>.dcm and warnings.csv (pneumo.deploy.sr).

Every input file ends up in exactly one of submission.csv and errors.csv. Per-image results
are written as they come (OUT/.parts/), so an interrupted run re-run with the same model and
settings skips what is done; the final files are written atomically at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pneumo.boxes import box_records, format_prediction_string
from pneumo.config import TrainConfig
from pneumo.data.layout import decode_file, dicom_files
from pneumo.deploy.registry import model_version_dir, record_test_score, resolve_model
from pneumo.errors import ConfigError, DataError, ModelError
from pneumo.io import atomic_save_image, atomic_write_json, atomic_write_text
from pneumo.models.postprocess import PostProcess, apply
from pneumo.processes import child_initializer

if TYPE_CHECKING:
    import torch

    from pneumo.models.net import Net

log = logging.getLogger(__name__)
SUBGROUP_FIELDS = ("PatientSex", "PatientAge", "ViewPosition")  # kept per image for score.json's subgroups


@dataclass
class Predictor:
    """A trained network with the post-processing chosen for it: images in, boxes out."""

    net: Net  # what runs: the network, or anything answering like it (pneumo.deploy.onnx.OnnxNet)
    config: TrainConfig
    settings: PostProcess
    name: str
    device: torch.device
    # the torch network whose heads decode the outputs: net itself, kept when net is replaced
    # (dataclasses.replace(predictor, net=OnnxNet(path)))
    heads: Net | None = None

    def __post_init__(self):
        if self.heads is None:
            self.heads = self.net

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def threshold(self) -> float:
        return self.settings.threshold

    def outputs(self, batch: np.ndarray, metas=None, tta: bool = False):
        """(B, S, S) uint8 at model resolution (and the images' DICOM metadata) -> per image what
        post-processing reads (an opacity map, or the centre head's candidates), and (B,) image-level
        opacity probabilities (None without a classifier)."""
        import torch

        from pneumo.data.metadata import metadata_of

        x = torch.from_numpy(batch).to(self.device)[:, None].float() / 255.0
        meta = None
        if self.heads.reads_metadata:
            rows = [metadata_of(m) for m in (metas or [{}] * len(batch))]
            meta = torch.tensor(rows, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            out = self.net(x, meta)
            if tta:  # horizontal flip: predict on the mirror image and mirror back, then average
                flipped = self.net(x.flip(-1), meta)
                out = {name: _mirror_mean(value, flipped[name]) for name, value in out.items()}
        opacity = self.heads.opacity(out)
        return self.heads.decode(out), None if opacity is None else opacity.cpu().numpy()

    def boxes(self, output, rows: int, columns: int, opacity: float | None = None):
        """Boxes (x, y, w, h) in the image's own frame and their confidences."""
        return apply(output, self.settings, rows, columns, opacity)


def _mirror_mean(output, mirrored_output):
    """The mean of an output and the mirror image's, mirrored back where it is a map (4-d)."""
    return (output + (mirrored_output.flip(-1) if output.dim() == 4 else mirrored_output)) / 2


def load_predictor(model, threshold: float | None = None, min_box_area: float | None = None,
                   device: str | None = None) -> Predictor:
    """Rebuild the predictor from a checkpoint alone (weights_only loading: no pickled code).

    threshold and min_box_area replace the checkpoint's own post-processing values.
    """
    import torch

    from pneumo.models.net import net_for_weights

    if threshold is not None and not 0 < threshold < 1:
        raise ConfigError(f"threshold {threshold:g}: must be a probability between 0 and 1")
    if min_box_area is not None and not min_box_area >= 0:
        raise ConfigError(f"min box area {min_box_area:g}: must be 0 or more pixels")
    ckpt_path, card = resolve_model(model)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        config = TrainConfig.from_dict(ckpt["hyper_parameters"]["config"])
        state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        net = net_for_weights(config, state)
    except Exception as exc:  # torch raises many types for files that are not pneumo checkpoints
        detail = " ".join(str(exc).split())  # torch lists every mismatched tensor on its own line
        raise ModelError(f"{ckpt_path}: not a pneumo checkpoint, or weights that do not fit its config "
                         f"({type(exc).__name__}: {detail[:300]}{'...' if len(detail) > 300 else ''})") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(dev).eval()
    extra = ckpt.get("pneumo", {})
    settings = PostProcess.from_dict(extra.get("postprocess", {"threshold": config.threshold,
                                                              "min_box_area": config.min_box_area}))
    overrides = {k: float(v) for k, v in (("threshold", threshold), ("min_box_area", min_box_area)) if v is not None}
    name = f"{card['name']}/{card['version']}" if card else str(ckpt_path)
    return Predictor(net, config, dataclasses.replace(settings, **overrides), name, dev)


# ---------------------------------------------------------------- batch


def _input_files(images_dir: Path) -> list[Path]:
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: images directory does not exist")
    return dicom_files(images_dir)


class _Decoded:
    """DataLoader items (pneumo.data.layout.Decoded): decoding happens in worker processes, in
    parallel with inference."""

    def __init__(self, files, size: int, keep_image: bool):
        # the full-size image crosses the process boundary only when a PNG will be drawn from it
        self.files, self.size, self.keep_image = files, size, keep_image

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return decode_file(self.files[i], self.size, keep_full=self.keep_image)


def _settings_key(predictor: Predictor, tta: bool) -> str:
    return hashlib.sha256(json.dumps([predictor.name, predictor.settings.to_dict(), tta,
                                      predictor.image_size]).encode()).hexdigest()[:16]


def _parts_dir(out: Path, predictor: Predictor, tta: bool) -> Path:
    """OUT/.parts, emptied of the results of another model or other settings."""
    parts = out / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    key = _settings_key(predictor, tta)
    settings = parts / "settings.key"  # not *.json: that name space belongs to the input files
    if settings.is_file() and json.loads(settings.read_text()).get("key") != key:
        for p in parts.glob("*.json"):  # other model or settings: start over
            p.unlink()
    atomic_write_json(settings, {"key": key, "model": predictor.name})
    return parts


def predict_folder(model, images_dir, out, threshold=None, min_box_area=None, tta: bool = False, labels=None,
                   batch_size: int = 16, workers: int | None = None, save_images: bool = True,
                   dicom_sr: bool = False, dicom_gsps: bool = False) -> dict:
    """Predict every file of images_dir into out; returns the summary (and the score with labels)."""
    import torch

    from pneumo.render import annotate

    images_dir, out = Path(images_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file; --out names the directory predictions go into")
    files = _input_files(images_dir)
    predictor = model if isinstance(model, Predictor) else load_predictor(model, threshold, min_box_area)
    parts = _parts_dir(out, predictor, tta)
    gt = None
    if labels:
        from pneumo.data.layout import read_labels

        gt = read_labels(labels)

    def part_path(path: Path) -> Path:
        # named by a hash: an input name may be as long as the file system allows, and the
        # part file adds a suffix (and its temporary file a prefix) to it
        return parts / f"{hashlib.sha256(path.name.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.json"

    _mark_duplicates(files, part_path)
    todo = [f for f in files if not part_path(f).is_file()]
    if len(todo) < len(files):
        log.info("skipping %d files done by an earlier run", len(files) - len(todo))
    if save_images:
        (out / "images").mkdir(exist_ok=True)
    n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(_Decoded(todo, predictor.image_size, save_images), batch_size=batch_size,
                                         num_workers=n_workers if len(todo) > batch_size else 0,
                                         collate_fn=list, worker_init_fn=child_initializer())
    start = time.perf_counter()

    def finish(item, boxes, conf) -> None:
        # the part file is written after the PNG: a killed run never marks an image done whose
        # PNG is missing, and the re-run draws it again
        path, (rows, columns) = Path(item.path), item.shape
        if save_images:
            truth = gt.get(item.patientId, ()) if gt is not None else ()
            atomic_save_image(out / "images" / f"{item.patientId}.png", annotate(item.full, boxes, conf, truth),
                              compress_level=1)
        atomic_write_json(part_path(path), {"path": str(path), "patientId": item.patientId,
                                            "image_size": [rows, columns], "boxes": box_records(boxes, conf),
                                            "meta": {k: item.meta.get(k) for k in SUBGROUP_FIELDS}})

    png_threads = max(1, min(4, (os.cpu_count() or 2) // 2)) if save_images else 1  # one per two cores
    _infer(loader, predictor, tta, finish, part_path, png_threads, batch_size)
    seconds = time.perf_counter() - start
    summary = _assemble(files, part_path, out, predictor, gt, len(todo), seconds, (dicom_sr, dicom_gsps))
    if gt is not None and (version := model_version_dir(model)) is not None:  # the card gets its test score
        changed = {"threshold": threshold, "min_box_area": min_box_area, "tta": tta or None}
        record_test_score(version, json.loads((out / "score.json").read_text()), images_dir,
                          settings={k: v for k, v in changed.items() if v is not None} or None)
    return summary


def _infer(loader, predictor: Predictor, tta: bool, finish, part_path, threads: int, batch_size: int) -> None:
    """Run the network over the loader's batches and hand each image's boxes to finish.

    finish (drawing and encoding the PNG: ~25-35 ms of zlib per 1024 px image, the GIL released)
    runs on threads while the next batch goes through the network: in the main loop it would cap
    a GPU machine's predict at ~30 images/s. At most two batches wait, so memory stays bounded."""
    from pneumo.progress import track

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pneumo-png") as writer:
        pending: deque = deque()
        for batch in track(loader, len(loader), "predicting"):
            good = [item for item in batch if item.error is None]
            for item in batch:
                if item.error is not None:
                    atomic_write_json(part_path(Path(item.path)), {"path": item.path, "error": item.error})
            if not good:
                continue
            probs, opacity = predictor.outputs(np.stack([item.image for item in good]),
                                               [item.meta for item in good], tta=tta)
            for i, (item, prob) in enumerate(zip(good, probs)):
                rows, columns = item.shape
                boxes, conf = predictor.boxes(prob, rows, columns, None if opacity is None else float(opacity[i]))
                pending.append(writer.submit(finish, item, boxes, conf))
            while len(pending) > 2 * batch_size:
                pending.popleft().result()  # re-raises a failed write here, in order
        while pending:
            pending.popleft().result()


def _mark_duplicates(files, part_path) -> None:
    """One patientId, one row: a later name of the same stem (abc, abc.dcm) is an error, decided
    over the whole folder so that a re-run after a new name appeared cannot add a second row."""
    first_of: dict[str, Path] = {}
    for f in files:
        if f.stem in first_of:
            atomic_write_json(part_path(f), {"path": str(f), "error": f"duplicate patientId (also {first_of[f.stem]})"})
        else:
            first_of[f.stem] = f


def _printable(text: str) -> str:
    """text with the bytes of a non-UTF-8 file name (lone surrogates) as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _assemble(files, part_path, out: Path, predictor: Predictor, gt, n_new: int, seconds: float,
              dicom=(False, False)) -> dict:
    """The final files from the per-image parts, each written atomically; dicom = (SR, GSPS) wanted."""
    annotations, submission = {}, ["patientId,PredictionString"]
    errors = io.StringIO()
    error_rows = csv.writer(errors, lineterminator="\n")
    error_rows.writerow(["path", "reason"])
    n_errors = 0
    attributes = {}  # patientId -> the DICOM fields subgroups are made of
    for f in files:
        record = json.loads(part_path(f).read_text())
        if "error" in record:  # any name the file system allows: quoted by csv, undecodable bytes escaped
            error_rows.writerow([_printable(record["path"]), _printable(record["error"])])
            n_errors += 1
            continue
        boxes = record["boxes"]
        attributes[record["patientId"]] = record.get("meta", {})
        annotations[record["patientId"]] = {"image_size": record["image_size"], "boxes": boxes}
        text = format_prediction_string([[b["x"], b["y"], b["width"], b["height"]] for b in boxes],
                                        [b["confidence"] for b in boxes])
        submission.append(f"{record['patientId']},{text}")
    atomic_write_json(out / "annotations.json", {"model": predictor.name, "postprocess": predictor.settings.to_dict(),
                                                 "images": annotations})
    atomic_write_text(out / "submission.csv", "\n".join(submission) + "\n")
    atomic_write_text(out / "errors.csv", errors.getvalue())
    summary = {"n_inputs": len(files), "n_predicted": len(annotations),
               "n_with_boxes": sum(1 for a in annotations.values() if a["boxes"]), "n_errors": n_errors,
               "images_per_second": round(n_new / seconds, 1) if seconds > 0 and n_new else None,
               "out": str(out), "model": predictor.name}
    if gt is not None:
        from pneumo.data.submission import read_submission
        from pneumo.deploy.subgroups import subgroup_scores
        from pneumo.metrics import mean_average_precision

        preds = read_submission(out / "submission.csv")
        scored = {pid: boxes for pid, boxes in gt.items() if pid in preds}
        score = mean_average_precision(scored, preds)
        atomic_write_json(out / "score.json",
                          {**score.to_dict(), "subgroups": subgroup_scores(scored, preds, attributes)})
        summary["map"] = score.map
        summary["n_scored"] = score.n_images
    if any(dicom):
        from pneumo.deploy.sr import parts_records, write_reports

        summary.update(write_reports(parts_records(files, part_path), out, predictor.name, *dicom))
    return summary
