"""The one box convention of pneumo, and every conversion of it.

A box is ``(x, y, width, height)``: top-left corner, in pixels of the original image frame
(1024 x 1024 for RSNA). Arrays of boxes are float arrays of shape (N, 4). Model-resolution
boxes and corner form exist only inside the helpers below.
"""

from __future__ import annotations

import re

import numpy as np

_PATIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_patient_id(patient_id: str) -> str:
    """Return patient_id if it is safe as a file name stem, else raise ValueError.

    Real RSNA ids are UUIDs; anything with a path separator or starting with a dot is refused
    because ids become output file names (images/<patientId>.png).
    """
    if not isinstance(patient_id, str) or not _PATIENT_ID.match(patient_id) or ".." in patient_id:
        raise ValueError(f"invalid patientId {patient_id!r}")
    return patient_id


def as_boxes(boxes) -> np.ndarray:
    """Any sequence of (x, y, w, h) as a float64 (N, 4) array (empty input gives (0, 4))."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    return arr.reshape(-1, 4)


def to_corners(boxes) -> np.ndarray:
    """(x, y, w, h) -> (x0, y0, x1, y1)."""
    b = as_boxes(boxes)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def from_corners(corners) -> np.ndarray:
    """(x0, y0, x1, y1) -> (x, y, w, h)."""
    c = as_boxes(corners)
    return np.concatenate([c[:, :2], c[:, 2:] - c[:, :2]], axis=1)


def scale(boxes, sx: float, sy: float | None = None) -> np.ndarray:
    """Scale boxes between frames, e.g. original pixels -> model pixels with s = size / 1024."""
    sy = sx if sy is None else sy
    return as_boxes(boxes) * np.array([sx, sy, sx, sy])


def _box_stack(boxes) -> np.ndarray:
    """Boxes as a float64 array whose last axis is (x, y, w, h): (..., N, 4); flat input -> (N, 4)."""
    arr = np.asarray(boxes, dtype=np.float64)
    return arr if arr.ndim >= 2 and arr.shape[-1] == 4 else as_boxes(arr)


def iou_matrix(a, b) -> np.ndarray:
    """IoU of every box in a (..., N, 4) with every box in b (..., M, 4): (..., N, M), no masks.

    Leading axes broadcast, so a stack of images (n, N, 4) x (n, M, 4) is one array operation.
    """
    a, b = _box_stack(a), _box_stack(b)
    a0, b0 = a[..., :, None, :2], b[..., None, :, :2]
    lo = np.maximum(a0, b0)
    hi = np.minimum(a0 + a[..., :, None, 2:], b0 + b[..., None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(axis=-1)
    union = a[..., 2:].prod(axis=-1)[..., :, None] + b[..., 2:].prod(axis=-1)[..., None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def parse_boxes(probability_map: np.ndarray, threshold: float, min_area: float = 0.0):
    """Boxes from a probability map: connected components of ``probability_map > threshold``.

    Returns (boxes, confidences) in the map's own pixel frame; confidence is the mean
    probability inside the box. Components whose box area is below min_area are dropped.
    """
    from scipy import ndimage

    labels, n = ndimage.label(probability_map > threshold)
    if not n:
        return as_boxes([]), np.zeros(0)
    spans = np.array([(ys.start, ys.stop, xs.start, xs.stop) for ys, xs in ndimage.find_objects(labels)[:n]])
    y0, y1, x0, x1 = spans.T
    area = (x1 - x0) * (y1 - y0)
    keep = area >= min_area
    y0, y1, x0, x1, area = y0[keep], y1[keep], x0[keep], x1[keep], area[keep]
    # Box means from one summed-area table instead of one mean per box: validation parses every
    # map at 19 thresholds, and a half-trained map has hundreds of specks. For float16 maps (the
    # validation search's) the float64 sums are exact, so the means equal a per-box mean's.
    table = np.zeros((probability_map.shape[0] + 1, probability_map.shape[1] + 1))
    np.cumsum(probability_map, axis=0, dtype=np.float64, out=table[1:, 1:])
    np.cumsum(table[1:, 1:], axis=1, out=table[1:, 1:])
    sums = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    boxes = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
    return as_boxes(boxes), sums / area


def boxes_in_image(probability: np.ndarray, threshold: float, min_box_area: float, rows: int, columns: int):
    """Boxes (N, 4) in the image's own frame (rows x columns pixels) and their confidences, from
    one model-resolution probability map; min_box_area is in the image's own pixels.

    The map may be a square resize of a non-square image: x and y are scaled separately.
    """
    sx, sy = columns / probability.shape[1], rows / probability.shape[0]
    boxes, confidences = parse_boxes(probability, threshold, min_box_area / (sx * sy))
    return scale(boxes, sx, sy), confidences


def box_records(boxes, confidences) -> list[dict]:
    """Boxes and confidences as JSON records {x, y, width, height, confidence} (the API and
    annotations.json format); confidences rounded to 4 places."""
    return [{"x": float(x), "y": float(y), "width": float(w), "height": float(h), "confidence": round(float(c), 4)}
            for (x, y, w, h), c in zip(as_boxes(boxes), confidences)]


def boxes_to_mask(boxes, height: int, width: int) -> np.ndarray:
    """A (height, width) float32 mask with 1 inside every box (boxes already in that frame)."""
    mask = np.zeros((height, width), dtype=np.float32)
    for x0, y0, x1, y1 in np.round(to_corners(boxes)).astype(int):
        mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 1.0
    return mask


def format_prediction_string(boxes, confidences) -> str:
    """Kaggle's PredictionString: 'confidence x y width height' groups, highest confidence first."""
    b = as_boxes(boxes)
    order = np.argsort(-np.asarray(confidences, dtype=np.float64), kind="stable")
    parts = []
    for i in order:
        x, y, w, h = b[i]
        parts.append(f"{confidences[i]:.4f} {x:.0f} {y:.0f} {w:.0f} {h:.0f}")
    return " ".join(parts)


def parse_prediction_string(text) -> tuple[np.ndarray, np.ndarray]:
    """Kaggle's PredictionString back to (boxes, confidences); ValueError if malformed."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return as_boxes([]), np.zeros(0)
    tokens = str(text).split()
    if len(tokens) % 5:
        raise ValueError(f"{len(tokens)} numbers, not a multiple of 5 (confidence x y width height)")
    try:
        values = np.array([float(t) for t in tokens], dtype=np.float64).reshape(-1, 5)
    except ValueError as exc:
        raise ValueError(f"not a number: {exc}") from None
    if not np.isfinite(values).all():
        raise ValueError("non-finite number")
    if (values[:, 3:] < 0).any():
        raise ValueError("negative width or height")
    return values[:, 1:], values[:, 0]
