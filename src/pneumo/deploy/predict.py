"""Batch inference on DICOM files: annotations.json, Kaggle submission.csv, annotated PNGs, errors.csv;
with dicom_sr / dicom_gsps also sr/<patientId>.dcm / gsps/<patientId>.dcm and warnings.csv (pneumo.deploy.sr).

Every input file ends up in exactly one of submission.csv and errors.csv. Per-image results
are written as they come (OUT/.parts/), so an interrupted run re-run with the same model and
settings skips what is done; the final files are written atomically at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
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
from pneumo.data.layout import decode_file, dicom_files, skipped_entries
from pneumo.deploy.parts import Parts, file_key, mark_unusable, remove_stale_temporaries, settings_key, unusable
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
    # sha256 of the checkpoint file: what a resumed predict checks its earlier results against
    # (the same path may hold another model by then)
    digest: str = ""

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
            if tta:  # horizontal flip: predict on the mirror image, mirror back (each head knows how), average
                mirrored = self.heads.mirror(self.net(x.flip(-1), meta))
                out = {name: (value + mirrored[name]) / 2 for name, value in out.items()}
        opacity = self.heads.opacity(out)
        return self.heads.decode(out), None if opacity is None else opacity.cpu().numpy()

    def boxes(self, output, rows: int, columns: int, opacity: float | None = None):
        """Boxes (x, y, w, h) in the image's own frame and their confidences."""
        return apply(output, self.settings, rows, columns, opacity)


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
        if "weights_only" in detail:  # torch's advice (weights_only=False) would run the file's code
            detail = "it holds Python objects besides tensors, and pneumo never runs code from a model file"
        raise ModelError(f"{ckpt_path}: not a pneumo checkpoint, or weights that do not fit its config "
                         f"({type(exc).__name__}: {detail[:300]}{'...' if len(detail) > 300 else ''})") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(dev).eval()
    extra = ckpt.get("pneumo", {})
    settings = PostProcess.from_dict(extra.get("postprocess", {"threshold": config.threshold,
                                                              "min_box_area": config.min_box_area}))
    overrides = {k: float(v) for k, v in (("threshold", threshold), ("min_box_area", min_box_area)) if v is not None}
    name = f"{card['name']}/{card['version']}" if card else str(ckpt_path)
    with open(ckpt_path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return Predictor(net, config, dataclasses.replace(settings, **overrides), name, dev, digest=digest)


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


def _loader(files, size: int, keep_image: bool, batch_size: int, workers: int | None):
    """Batches of decoded files (lists of Decoded); two decoding workers unless told, none for one batch."""
    import torch

    n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(_Decoded(files, size, keep_image), batch_size=batch_size,
                                       num_workers=n_workers if len(files) > batch_size else 0,
                                       collate_fn=list, worker_init_fn=child_initializer())


# --images: what each input's annotated image is. preview: half size, JPEG (about 40 KB for a
# real RSNA image against 600 KB for the full-size PNG: the Kaggle test set's 3,000 images in
# 0.12 GB instead of 1.8 GB); full: the image's own size, lossless PNG; none: no image.
IMAGE_KINDS = {"preview": (".jpg", 0.5), "full": (".png", 1.0), "none": (None, None)}


def annotated_image(out, patient_id: str) -> Path | None:
    """The annotated image predict wrote for patient_id into out (either kind), or None."""
    for suffix in (".jpg", ".png"):
        path = Path(out) / "images" / f"{patient_id}{suffix}"
        if path.is_file():
            return path
    return None


def predict_folder(model, images_dir, out, threshold=None, min_box_area=None, tta: bool = False, labels=None,
                   batch_size: int = 16, workers: int | None = None, images: str = "preview",
                   dicom_sr: bool = False, dicom_gsps: bool = False) -> dict:
    """Predict every file of images_dir into out; returns the summary (and the score with labels)."""
    if images not in IMAGE_KINDS:
        raise ConfigError(f"images={images}: use one of {', '.join(IMAGE_KINDS)}")
    images_dir, out = Path(images_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file; --out names the directory predictions go into")
    files = _input_files(images_dir)
    predictor = model if isinstance(model, Predictor) else load_predictor(model, threshold, min_box_area)
    gt = None
    if labels:
        from pneumo.data.layout import read_labels

        gt = read_labels(labels)
    # what shapes an image besides the model: its kind and the truth drawn on it
    drawing = None if images == "none" else [images, file_key(labels) if labels else None]
    # the model by its bytes, not its path: another model copied over the same file starts over
    key = settings_key(predictor.digest or predictor.name, predictor.settings.to_dict(), tta, predictor.image_size)
    parts = Parts(out, key, predictor.name, drawing, files)
    mark_unusable(files, parts)
    todo = [f for f in files if not parts.done(f)]
    if len(todo) < len(files):
        log.info("skipping %d files done by an earlier run", len(files) - len(todo))
    if images != "none":
        (out / "images").mkdir(exist_ok=True)
        remove_stale_temporaries(out / "images")
    loader = _loader(todo, predictor.image_size, images != "none", batch_size, workers)
    start = time.perf_counter()
    finish = functools.partial(_finish, parts=parts, out=out, images=images, gt=gt)
    png_threads = max(1, min(4, (os.cpu_count() or 2) // 2)) if images != "none" else 1  # one per two cores
    _infer(loader, predictor, tta, finish, parts, png_threads, batch_size)
    seconds = time.perf_counter() - start
    summary = _assemble(files, parts.path, out, predictor, gt, len(todo), seconds, (dicom_sr, dicom_gsps),
                        skipped=skipped_entries(images_dir))
    if gt is not None and (version := model_version_dir(model)) is not None:  # the card gets its test score
        changed = {"threshold": threshold, "min_box_area": min_box_area, "tta": tta or None}
        record_test_score(version, json.loads((out / "score.json").read_text()), images_dir,
                          settings={k: v for k, v in changed.items() if v is not None} or None)
    return summary


def model_outputs(model, images_dir, batch_size: int = 16, workers: int | None = None) -> dict[str, tuple]:
    """{patientId: (output, (rows, columns), opacity)} for every image of a folder predict gives a row: what
    post-processing reads (a probability map or Candidates, the image's frame, P(opacity) or None),
    before any setting is applied. pneumo.models.scoring.search tunes settings on these; the real
    benchmark uses them to ask what other post-processing would have scored on the same outputs."""
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    files = _input_files(Path(images_dir))
    refused = unusable(files)  # as predict: no row for them
    files = [f for f in files if f not in refused]
    found = {}
    for batch in _loader(files, predictor.image_size, False, batch_size, workers):
        good = [item for item in batch if item.error is None]
        if not good:
            continue
        outputs, opacity = predictor.outputs(np.stack([item.image for item in good]), [item.meta for item in good])
        for i, (item, output) in enumerate(zip(good, outputs)):
            found[item.patientId] = (output, item.shape, None if opacity is None else float(opacity[i]))
    return found


def _finish(item, boxes, conf, *, parts: Parts, out: Path, images: str, gt) -> None:
    """One image's annotated image and part file. The part is written after the image: a killed
    run never marks an image done whose image is missing, and the re-run draws it again."""
    from pneumo.render import annotate

    path, (rows, columns) = Path(item.path), item.shape
    if images != "none":
        suffix, scale = IMAGE_KINDS[images]
        truth = gt.get(item.patientId, ()) if gt is not None else ()
        picture = annotate(item.full, boxes, conf, truth, title=item.patientId, scale=scale)
        options = {"format": "JPEG", "quality": 85} if suffix == ".jpg" else {"compress_level": 1}
        atomic_save_image(out / "images" / f"{item.patientId}{suffix}",
                          picture.convert("RGB") if suffix == ".jpg" else picture, **options)
    parts.write(path, {"path": str(path), "patientId": item.patientId, "image_size": [rows, columns],
                       "boxes": box_records(boxes, conf), "meta": {k: item.meta.get(k) for k in SUBGROUP_FIELDS}})


def _infer(loader, predictor: Predictor, tta: bool, finish, parts: Parts, threads: int, batch_size: int) -> None:
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
                    parts.write(Path(item.path), {"path": item.path, "error": item.error})
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


def _printable(text: str) -> str:
    """text with the bytes of a non-UTF-8 file name (lone surrogates) as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _assemble(files, part_path, out: Path, predictor: Predictor, gt, n_new: int, seconds: float,
              dicom=(False, False), skipped=()) -> dict:
    """The final files from the per-image parts, each written atomically; dicom = (SR, GSPS) wanted."""
    annotations, submission = {}, ["patientId,PredictionString"]
    errors = io.StringIO()
    error_rows = csv.writer(errors, lineterminator="\n")
    error_rows.writerow(["path", "reason"])
    error_rows.writerows([_printable(str(path)), _printable(reason)] for path, reason in skipped)
    n_errors = len(skipped)
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
