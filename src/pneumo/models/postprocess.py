"""From model outputs to the boxes a user gets, and the grids of settings the search picks from.

A model output for one image is either a probability map (the mask head: boxes are connected
components above the threshold) or `Candidates` (the centre head: scored boxes decoded from
heat-map peaks, kept above the threshold). Everything after that is the same for both.

Pure functions of numpy arrays: the same `apply` runs in validation, `pneumo predict` and
`pneumo serve`, with the settings that the search (pneumo.models.scoring, over the grids below) chose
on the validation split and training stored in the checkpoint. The search scores every
candidate with the official metric, because the RSNA score punishes a misplaced threshold or
gate hard (one box on an image without opacity scores that image 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pneumo.boxes import as_boxes, boxes_in_image, from_corners, iou_matrix, to_corners

THRESHOLD_GRID = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))  # centre-head peaks run lower than mask pixels
GATE_GRID = (0.0, *np.round(np.arange(0.1, 0.91, 0.05), 2))
# Searched around the best threshold. Shrinking follows the leaderboard's finding that many
# labels are the intersection of several readers' boxes; merging, that true boxes never overlap.
SHAPE_GRID = {"min_box_area": (0.0, 1000.0, 3000.0, 6000.0), "max_boxes": (0, 1, 2, 3),
              "box_scale": (1.0, 0.875, 0.75), "merge": (False, True)}


@dataclass(frozen=True)
class PostProcess:
    """How one probability map (and the image's opacity probability) becomes boxes."""

    threshold: float = 0.5  # pixel probability above which a pixel belongs to a box
    min_box_area: float = 1000.0  # boxes smaller than this (original image pixels) are dropped
    max_boxes: int = 0  # keep the most confident boxes only; 0: all
    box_scale: float = 1.0  # width and height multiplied by this about the box centre
    merge: bool = False  # overlapping boxes become their enclosing box
    gate: float = 0.0  # no boxes on an image whose opacity probability is below this; 0: off

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PostProcess:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class Candidates:
    """Scored boxes at model resolution (side x side pixels), decoded from a centre head."""

    boxes: np.ndarray  # (N, 4) x, y, w, h in model pixels
    scores: np.ndarray  # (N,) peak heights
    side: int

    def above(self, threshold: float, rows: int, columns: int):
        keep = self.scores > threshold
        sx, sy = columns / self.side, rows / self.side
        return as_boxes(self.boxes[keep]) * np.array([sx, sy, sx, sy]), self.scores[keep].astype(np.float64)


def decode_centres(heat: np.ndarray, log_size: np.ndarray, side: int, offsets: np.ndarray | None = None,
                   top_k: int = 10, min_score: float = 0.05, window: int = 3) -> Candidates:
    """Candidates from one centre head output on its grid: heat (h, w) probabilities, log_size
    (2, h, w) log of width and height as fractions of the side; side is the model input's side
    (the grid is side / stride). A peak is a cell that is the maximum of its window (the usual
    max-pool suppression); the most confident top_k peaks are kept. offsets (2, h, w): where in
    its cell each centre lies (0..1); the cell's middle without them."""
    from scipy import ndimage

    heat = np.asarray(heat, dtype=np.float32)
    stride = side / heat.shape[-1]
    peaks = (heat == ndimage.maximum_filter(heat, size=window, mode="constant")) & (heat > min_score)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-heat[ys, xs], kind="stable")[:top_k]
    ys, xs = ys[order], xs[order]
    w = np.exp(np.asarray(log_size[0], np.float32)[ys, xs]) * side
    h = np.exp(np.asarray(log_size[1], np.float32)[ys, xs]) * side
    off_x, off_y = ((np.asarray(offsets[0])[ys, xs], np.asarray(offsets[1])[ys, xs]) if offsets is not None
                    else (0.5, 0.5))
    cx, cy = (xs + off_x) * stride, (ys + off_y) * stride
    boxes = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1) if len(ys) else np.zeros((0, 4))
    return Candidates(boxes.astype(np.float64), heat[ys, xs].astype(np.float64), side)


def candidates(output, threshold: float, rows: int, columns: int):
    """Boxes in the image's own frame and their confidences above threshold, for either head."""
    if isinstance(output, Candidates):
        return output.above(threshold, rows, columns)
    return boxes_in_image(output, threshold, 0.0, rows, columns)


def merge_overlapping(boxes: np.ndarray, confidences: np.ndarray):
    """Replace every group of overlapping boxes by its enclosing box, with the group's best
    confidence. Pairs merge one at a time, so a chain of overlaps (and a merged box that now
    overlaps another) ends as one box."""
    boxes, conf = as_boxes(boxes).copy(), np.asarray(confidences, dtype=np.float64).copy()
    if len(boxes) < 2:
        return boxes, conf
    # which pairs overlap (upper triangle), updated for the merged box only: the search merges
    # every threshold's boxes, and a noisy map at a low threshold has hundreds
    touching = np.triu(iou_matrix(boxes, boxes) > 0, k=1)
    while True:
        rows = touching.any(axis=1)
        if not rows.any():
            break
        i = int(rows.argmax())  # the first overlapping pair in row-major order
        j = int(touching[i].argmax())
        corners = to_corners(boxes[[i, j]])
        boxes[i] = from_corners(np.concatenate([corners[:, :2].min(0), corners[:, 2:].max(0)]))[0]
        conf[i] = max(conf[i], conf[j])
        boxes, conf = np.delete(boxes, j, axis=0), np.delete(conf, j)
        touching = np.delete(np.delete(touching, j, axis=0), j, axis=1)
        overlaps = iou_matrix(boxes[i:i + 1], boxes)[0] > 0
        touching[i, i + 1:] = overlaps[i + 1:]
        touching[:i, i] = overlaps[:i]
    return boxes, conf


def shape_boxes(boxes: np.ndarray, confidences: np.ndarray, settings: PostProcess):
    """Everything but the threshold and gate: min area, merging, the most confident few, scale."""
    boxes, conf = as_boxes(boxes), np.asarray(confidences, dtype=np.float64)
    keep = boxes[:, 2] * boxes[:, 3] >= settings.min_box_area
    boxes, conf = boxes[keep], conf[keep]
    if settings.merge and len(boxes) > 1:
        boxes, conf = merge_overlapping(boxes, conf)
    order = np.argsort(-conf, kind="stable")
    if settings.max_boxes:
        order = order[: settings.max_boxes]
    boxes, conf = boxes[order], conf[order]
    if settings.box_scale != 1.0:
        centre = boxes[:, :2] + boxes[:, 2:] / 2
        size = boxes[:, 2:] * settings.box_scale
        boxes = np.concatenate([centre - size / 2, size], axis=1)
    return boxes, conf


def apply(output, settings: PostProcess, rows: int, columns: int, opacity: float | None = None):
    """Boxes (N, 4) in the image's own frame and their confidences for one image's model output
    (a model-resolution probability map, or Candidates).

    opacity is the image-level probability of an opacity (None without a classifier); it gates
    the image and scales the box confidences.
    """
    if opacity is not None and opacity < settings.gate:
        return np.zeros((0, 4)), np.zeros(0)
    boxes, conf = shape_boxes(*candidates(output, settings.threshold, rows, columns), settings)
    return boxes, conf * (opacity if opacity is not None else 1.0)
