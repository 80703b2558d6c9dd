"""The post-processing search on validation outputs, scored batch by batch.

Every candidate setting the search may pick (each box threshold, each shape setting, each
classifier gate) is scored as the batches come: per image the official metric's precision at
each IoU threshold is added into per-candidate sums, and the image's probability map is then
dropped. So validation holds an array the size of the search grid, never one map per image of
the split (about 5,300 on RSNA: 0.7 GB at 256 px, 11 GB at 1024 px). At the end the search
reads its choices from the sums, the same choices the whole-split search made.

Why sums suffice: the dataset score is the sum of the precisions of the images with ground truth
(a gated or box-less positive adds 0) over their count plus the count of images without ground
truth that got boxes (they score 0). Both are sums over images, per candidate and gate.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from pneumo.boxes import as_boxes, iou_matrix
from pneumo.metrics import THRESHOLDS, Score, true_positives_by_rank
from pneumo.models.postprocess import (
    GATE_GRID,
    SHAPE_GRID,
    THRESHOLD_GRID,
    PostProcess,
    candidates,
    merge_overlapping,
)

SHAPE_FIELDS = ("min_box_area", "merge", "max_boxes", "box_scale")


@dataclass
class SearchResult:
    settings: PostProcess
    score: Score
    tried: int  # candidate settings scored


def _plateau_best(values: np.ndarray) -> int:
    """The index of the best value smoothed over its neighbours: the middle of a plateau holds on
    new data, an isolated peak is noise of a small validation set."""
    smooth = np.convolve(np.pad(values, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
    best = np.flatnonzero(smooth >= smooth.max() - 1e-12)
    return int(best[len(best) // 2])  # the middle of equally good values


def _grid_shapes(grid: dict) -> list[tuple]:
    """The shape settings of a grid, in the search's order, as (min_box_area, merge, max_boxes, box_scale)."""
    names = list(grid)
    return [tuple(dict(zip(names, values))[f] for f in SHAPE_FIELDS)
            for values in itertools.product(*(grid[n] for n in names))]


def _shape(settings: PostProcess) -> tuple:
    return tuple(getattr(settings, f) for f in SHAPE_FIELDS)


class SearchScores:
    """Sums of per-image precision for every candidate of the search, fed batch by batch.

    mode as TrainConfig.postprocess: "fixed" scores start alone; "threshold" the box thresholds
    with start's shape; "gate" adds the classifier gates; "search" the shape grid (SHAPE_GRID)
    too. gated: the outputs come with opacity probabilities (a classifier).
    """

    def __init__(self, start: PostProcess | None = None, mode: str = "search", gated: bool = False):
        start = start or PostProcess()
        self.start, self.mode = dataclasses.replace(start, gate=0.0), mode
        self.thresholds = (float(start.threshold),) if mode == "fixed" else tuple(float(t) for t in THRESHOLD_GRID)
        grid = _grid_shapes(SHAPE_GRID) if mode == "search" else []
        self.shapes = list(dict.fromkeys([_shape(self.start), *grid]))  # start's first, no repeats
        self.gates = np.array(GATE_GRID if gated and mode in ("gate", "search") else (0.0,), dtype=np.float64)
        n_t, n_s, n_g = len(self.thresholds), len(self.shapes), len(self.gates)
        self._area = np.array([s[0] for s in self.shapes], dtype=np.float64)
        self.precision_sums = np.zeros((n_t, n_s, n_g, len(THRESHOLDS)))  # images with ground truth
        self.boxed_negatives = np.zeros((n_t, n_s, n_g), dtype=np.int64)  # without, but given boxes
        self.positives = 0
        self.images = 0
        self._iou_thresholds = np.asarray(THRESHOLDS, dtype=np.float64)

    def add(self, outputs, frames, ground_truth, opacity=None) -> None:
        """One batch: per image its model output (a probability map or Candidates), frame
        (rows, columns), ground-truth boxes in that frame and P(opacity) (None without a classifier)."""
        for i, (output, frame, truth) in enumerate(zip(outputs, frames, ground_truth)):
            open_ = (np.ones(len(self.gates), bool) if opacity is None
                     else float(opacity[i]) >= self.gates)  # gate 0 is always open
            self._add_image(output, frame, as_boxes(truth), open_)

    def _add_image(self, output, frame, truth: np.ndarray, open_: np.ndarray) -> None:
        self.images += 1
        self.positives += bool(len(truth))
        for ti, threshold in enumerate(self.thresholds):
            boxes, conf = candidates(output, threshold, *frame)
            if not len(boxes):
                continue  # no boxes under any shape: a positive adds 0, a negative is skipped
            if not len(truth):  # scores 0 wherever a box is left: min area alone decides that
                areas = boxes[:, 2] * boxes[:, 3]
                boxed = (areas[None, :] >= self._area[:, None]).any(axis=1)
                self.boxed_negatives[ti] += boxed[:, None] & open_[None, :]
                continue
            self.precision_sums[ti] += self._precisions(boxes, conf, truth)[:, None, :] * open_[None, :, None]

    def _precisions(self, boxes, conf, truth) -> np.ndarray:
        """(n_shapes, n_iou_thresholds) precision of one positive image's boxes under each shape.

        Shapes that keep the same boxes share one greedy matching: every box scale at once, and
        every max_boxes as a prefix of it (the matching takes the boxes in confidence order)."""
        out = np.zeros((len(self.shapes), len(THRESHOLDS)))
        areas = boxes[:, 2] * boxes[:, 3]
        ranked: dict[tuple, dict] = {}
        for si, (area, merge, max_boxes, scale) in enumerate(self.shapes):
            keep = areas >= area
            key = (keep.tobytes(), bool(merge and keep.sum() > 1))
            if key not in ranked:
                ranked[key] = self._ranked(boxes[keep], conf[keep], truth, key[1])
            tp_by_rank = ranked[key].get(scale)
            if tp_by_rank is None:
                continue  # no box left: 0
            n = len(tp_by_rank)
            k = n if not max_boxes else min(max_boxes, n)
            tp = tp_by_rank[k - 1]
            out[si] = tp / (k + len(truth) - tp)  # TP + FP + FN = predictions + truths - TP
        return out

    def _ranked(self, boxes, conf, truth, merge: bool) -> dict:
        """{box scale: true positives (n_boxes, n_iou_thresholds) among the k most confident boxes,
        for each k}; {} when no box is left. The steps of postprocess.shape_boxes but max_boxes."""
        if merge:
            boxes, conf = merge_overlapping(boxes, conf)
        if not len(boxes):
            return {}
        boxes = boxes[np.argsort(-conf, kind="stable")]
        scales = sorted({s[3] for s in self.shapes})
        stacked = []
        for scale in scales:
            if scale == 1.0:
                stacked.append(boxes)
                continue
            centre = boxes[:, :2] + boxes[:, 2:] / 2
            size = boxes[:, 2:] * scale
            stacked.append(np.concatenate([centre - size / 2, size], axis=1))
        tp = true_positives_by_rank(iou_matrix(np.stack(stacked), truth[None]), self._iou_thresholds)
        return dict(zip(scales, tp))

    # ------------------------------------------------------------------ reading the sums

    def score(self, settings: PostProcess) -> Score:
        """The dataset score of one scored candidate (KeyError/ValueError if it was not one)."""
        ti = self.thresholds.index(float(settings.threshold))
        si = self.shapes.index(_shape(settings))
        gi = int(np.flatnonzero(np.isclose(self.gates, settings.gate))[0])
        return self._score(ti, si, gi)

    def _score(self, ti: int, si: int, gi: int) -> Score:
        n = self.positives + int(self.boxed_negatives[ti, si, gi])
        if not n:
            return Score(0.0, 0, {f"{t:.2f}": 0.0 for t in THRESHOLDS}, {})
        per_t = self.precision_sums[ti, si, gi] / n
        return Score(float(per_t.mean()), n, {f"{t:.2f}": float(v) for t, v in zip(THRESHOLDS, per_t)}, {})

    def _maps(self, ti: int, si: int) -> np.ndarray:
        """The dataset score at every gate."""
        n = self.positives + self.boxed_negatives[ti, si]
        return np.where(n > 0, self.precision_sums[ti, si].mean(axis=-1) / np.maximum(n, 1), 0.0)

    def result(self) -> SearchResult:
        """The best candidate, chosen as the whole-split search did: the threshold alone first (the
        middle of the best plateau), then shape and gate around it."""
        if self.mode == "fixed":
            return SearchResult(self.start, self._score(0, 0, 0), 1)
        maps = np.array([self._maps(ti, 0)[0] for ti in range(len(self.thresholds))])
        best_t = _plateau_best(maps)
        best = dataclasses.replace(self.start, threshold=self.thresholds[best_t])
        tried = len(self.thresholds)
        if self.mode != "threshold":
            best, more = self._best_shape_and_gate(best, best_t)
            tried += more
        return SearchResult(best, self.score(best), tried + 1)

    def _best_shape_and_gate(self, best: PostProcess, best_t: int) -> tuple[PostProcess, int]:
        shapes = range(len(self.shapes)) if self.mode == "search" else [0]
        if self.mode == "search":  # the grid's own order (start's shape leads the list when not in the grid)
            grid = _grid_shapes(SHAPE_GRID)
            shapes = [self.shapes.index(s) for s in grid]
        best_value, tried = -1.0, 0
        for ti in range(max(0, best_t - 1), min(len(self.thresholds), best_t + 2)):
            for si in shapes:
                tried += 1
                maps = self._maps(ti, si)
                i = _plateau_best(maps) if len(maps) > 1 else 0
                if maps[i] > best_value + 1e-9:
                    values = dict(zip(SHAPE_FIELDS, self.shapes[si]))
                    best_value = float(maps[i])
                    best = dataclasses.replace(best, threshold=self.thresholds[ti], gate=float(self.gates[i]), **values)
        return best, tried


def search(outputs, frames, ground_truth, opacity=None, start: PostProcess | None = None,
           mode: str = "search") -> SearchResult:
    """The post-processing that scores best on these validation outputs, all given at once.

    outputs: {key: model-resolution probability map or Candidates}; frames: {key: (rows, columns)};
    ground_truth: {key: boxes in the image frame}, every image of the split; opacity: {key:
    P(opacity)} or None. Validation feeds SearchScores batch by batch instead; both choose alike.
    """
    keys = list(ground_truth)
    scores = SearchScores(start, mode, gated=opacity is not None)
    scores.add([outputs[k] for k in keys], [frames[k] for k in keys], [ground_truth[k] for k in keys],
               None if opacity is None else [opacity[k] for k in keys])
    return scores.result()
