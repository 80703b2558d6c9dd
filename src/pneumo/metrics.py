"""The official RSNA Pneumonia Detection metric (mean over IoU thresholds of TP / (TP + FP + FN)).

Per image, predictions in descending confidence order are matched one-to-one to the unmatched
ground-truth box of highest IoU; a hit needs IoU strictly greater than the threshold. Images
with neither ground truth nor predictions are skipped; predictions on an image without ground
truth score 0. The dataset score is the mean over the remaining images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pneumo.boxes import as_boxes, iou_matrix

THRESHOLDS = tuple(np.round(np.arange(0.40, 0.751, 0.05), 2))


def _greedy_true_positives(ious: np.ndarray, thresholds: np.ndarray, by_rank: bool = False) -> np.ndarray:
    """True positives per image and threshold: ious is (n_images, n_pred, n_gt), predictions
    in descending confidence order; the result is (n_images, n_thresholds), or with by_rank
    (n_images, n_pred, n_thresholds): the true positives among the first k + 1 predictions,
    which are those of the k + 1 most confident alone (the matching is greedy in that order).

    Each prediction in turn takes the still-unmatched ground-truth box of highest IoU; a hit
    needs IoU strictly greater than the threshold. All images and thresholds advance together,
    so the Python loop runs n_pred times, not once per image and threshold.
    """
    n_img, n_pred, n_gt = ious.shape
    n_t = len(thresholds)
    free = np.ones((n_img, n_t, n_gt), dtype=bool)
    tp = np.zeros((n_img, n_t), dtype=np.int64)
    ranks = np.zeros((n_img, n_pred, n_t), dtype=np.int64) if by_rank else None
    img_idx, t_idx = np.meshgrid(np.arange(n_img), np.arange(n_t), indexing="ij")
    for k in range(n_pred):
        candidates = np.where(free, ious[:, None, k, :], -1.0)
        best = candidates.argmax(axis=2)
        hit = np.take_along_axis(candidates, best[..., None], axis=2)[..., 0] > thresholds
        free[img_idx[hit], t_idx[hit], best[hit]] = False
        tp += hit
        if by_rank:
            ranks[:, k] = tp
    return ranks if by_rank else tp


def true_positives_by_rank(ious: np.ndarray, thresholds) -> np.ndarray:
    """(n_images, n_pred, n_thresholds): the true positives among each image's k + 1 most
    confident predictions, for every k (ious as _greedy_true_positives takes them)."""
    return _greedy_true_positives(ious, np.asarray(thresholds, dtype=np.float64), by_rank=True)


def image_precisions(gt_boxes, pred_boxes, confidences, thresholds=THRESHOLDS):
    """Precision TP / (TP + FP + FN) at each threshold for one image, or None if it is skipped."""
    gt, pred = as_boxes(gt_boxes), as_boxes(pred_boxes)
    n_gt, n_pred = len(gt), len(pred)
    if n_gt == 0 and n_pred == 0:
        return None
    if n_gt == 0 or n_pred == 0:
        return np.zeros(len(thresholds))
    order = np.argsort(-np.asarray(confidences, dtype=np.float64), kind="stable")
    tp = _greedy_true_positives(iou_matrix(pred[order], gt)[None], np.asarray(thresholds, dtype=np.float64))[0]
    return tp / (n_pred + n_gt - tp)  # TP + FP + FN = n_pred + n_gt - TP


@dataclass
class Score:
    """The dataset score with what explains it."""

    map: float
    n_images: int
    per_threshold: dict[str, float]
    per_image: dict[str, float] = field(default_factory=dict)

    def to_dict(self, per_image: bool = False) -> dict:
        out = {"map": self.map, "n_images": self.n_images, "per_threshold": self.per_threshold}
        if per_image:
            out["per_image"] = self.per_image
        return out


def mean_average_precision(ground_truth: dict, predictions: dict, thresholds=THRESHOLDS) -> Score:
    """Score predictions {patientId: (boxes, confidences)} against {patientId: boxes}.

    Every patient of ground_truth is scored (a missing prediction means no boxes), so the
    ground truth must list negative patients too, with an empty box array. Images with the
    same numbers of predictions and ground-truth boxes are scored together as one array.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    empty = (np.zeros((0, 4)), np.zeros(0))
    zero_ids = []  # ground truth without predictions, or predictions without ground truth: 0
    groups: dict[tuple[int, int], list] = {}
    for pid, gt in ground_truth.items():
        boxes, conf = predictions.get(pid, empty)
        gt, boxes = as_boxes(gt), as_boxes(boxes)
        if len(gt) == 0 and len(boxes) == 0:
            continue  # skipped, as the official metric does
        if len(gt) == 0 or len(boxes) == 0:
            zero_ids.append(pid)
            continue
        order = np.argsort(-np.asarray(conf, dtype=np.float64), kind="stable")
        groups.setdefault((len(boxes), len(gt)), []).append((pid, boxes[order], gt))
    ids = list(zero_ids)
    tables = [np.zeros((len(zero_ids), len(thresholds)))]
    for (n_pred, n_gt), items in groups.items():
        preds = np.stack([p for _, p, _ in items])  # (n, n_pred, 4)
        gts = np.stack([g for _, _, g in items])  # (n, n_gt, 4)
        tp = _greedy_true_positives(iou_matrix(preds, gts), thresholds)
        ids += [pid for pid, _, _ in items]
        tables.append(tp / (n_pred + n_gt - tp))
    table = np.vstack(tables)
    if not len(table):
        return Score(0.0, 0, {f"{t:.2f}": 0.0 for t in thresholds}, {})
    per_t = {f"{t:.2f}": float(v) for t, v in zip(thresholds, table.mean(axis=0))}
    per_image = dict(zip(ids, (float(v) for v in table.mean(axis=1))))
    return Score(float(table.mean()), len(table), per_t, per_image)
