"""The official RSNA Pneumonia Detection metric (mean over IoU thresholds of TP / (TP + FP + FN)).

Per image, predictions in descending confidence order are matched one-to-one to the unmatched
ground-truth box of highest IoU; a hit needs IoU strictly greater than the threshold. Images
with neither ground truth nor predictions are skipped; predictions on an image without ground
truth score 0. The dataset score is the mean over the remaining images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumo.boxes import as_boxes, iou_matrix, parse_prediction_string
from pneumo.errors import SubmissionError

THRESHOLDS = tuple(np.round(np.arange(0.40, 0.751, 0.05), 2))


def image_precisions(gt_boxes, pred_boxes, confidences, thresholds=THRESHOLDS):
    """Precision TP / (TP + FP + FN) at each threshold for one image, or None if it is skipped."""
    gt, pred = as_boxes(gt_boxes), as_boxes(pred_boxes)
    n_gt, n_pred = len(gt), len(pred)
    if n_gt == 0 and n_pred == 0:
        return None
    if n_gt == 0 or n_pred == 0:
        return np.zeros(len(thresholds))
    order = np.argsort(-np.asarray(confidences, dtype=np.float64), kind="stable")
    ious = iou_matrix(pred[order], gt)  # (n_pred, n_gt), once for all thresholds
    result = np.empty(len(thresholds))
    for k, t in enumerate(thresholds):
        free = np.ones(n_gt, dtype=bool)
        tp = 0
        for row in ious:
            candidates = np.where(free, row, -1.0)
            j = int(np.argmax(candidates))
            if candidates[j] > t:
                free[j] = False
                tp += 1
        fp, fn = n_pred - tp, n_gt - tp
        result[k] = tp / (tp + fp + fn)
    return result


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
    ground truth must list negative patients too, with an empty box array.
    """
    rows, per_image = [], {}
    for pid, gt in ground_truth.items():
        boxes, conf = predictions.get(pid, (as_boxes([]), np.zeros(0)))
        prec = image_precisions(gt, boxes, conf, thresholds)
        if prec is not None:
            rows.append(prec)
            per_image[pid] = float(prec.mean())
    if not rows:
        per_t = {f"{t:.2f}": 0.0 for t in thresholds}
        return Score(0.0, 0, per_t, per_image)
    table = np.vstack(rows)
    per_t = {f"{t:.2f}": float(v) for t, v in zip(thresholds, table.mean(axis=0))}
    return Score(float(table.mean()), len(rows), per_t, per_image)


def read_labels(path) -> dict[str, np.ndarray]:
    """RSNA labels CSV (patientId,x,y,width,height,Target) -> {patientId: boxes}."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"patientId": str})
    except FileNotFoundError:
        raise SubmissionError(f"{path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{path}: not a readable CSV ({exc})") from None
    missing = {"patientId", "x", "y", "width", "height"} - set(df.columns)
    if missing:
        raise SubmissionError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    labels: dict[str, list] = {pid: [] for pid in df["patientId"]}
    boxed = df.dropna(subset=["x", "y", "width", "height"])
    for pid, x, y, w, h in boxed[["patientId", "x", "y", "width", "height"]].itertuples(index=False):
        labels[pid].append((x, y, w, h))
    return {pid: as_boxes(b) for pid, b in labels.items()}


def read_submission(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Kaggle submission CSV (patientId,PredictionString) -> {patientId: (boxes, confidences)}."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"patientId": str, "PredictionString": str})
    except FileNotFoundError:
        raise SubmissionError(f"{path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{path}: not a readable CSV ({exc})") from None
    missing = {"patientId", "PredictionString"} - set(df.columns)
    if missing:
        raise SubmissionError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    out = {}
    for pid, text in df[["patientId", "PredictionString"]].itertuples(index=False):
        if pid in out:
            raise SubmissionError(f"{path}: patientId {pid} appears more than once")
        try:
            out[pid] = parse_prediction_string(text)
        except ValueError as exc:
            raise SubmissionError(f"{path}: patientId {pid}: malformed PredictionString: {exc}") from None
    return out


def score_files(submission, labels) -> Score:
    """The official score of a submission CSV against a labels CSV."""
    return mean_average_precision(read_labels(labels), read_submission(submission))
