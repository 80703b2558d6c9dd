import dataclasses

import numpy as np
import pytest

from pneumo.metrics import mean_average_precision
from pneumo.postprocess import (
    THRESHOLD_GRID,
    PostProcess,
    apply,
    merge_overlapping,
    search,
    shape_boxes,
)


def _blob_map(boxes_px, size=64, frame=1024, level=0.9, noise=0.05, seed=0):
    """A probability map with a bright blob on each box (boxes in the frame's pixels)."""
    rng = np.random.default_rng(seed)
    prob = rng.random((size, size)) * noise
    f = size / frame
    for x, y, w, h in boxes_px:
        prob[int(y * f):int((y + h) * f), int(x * f):int((x + w) * f)] = level
    return prob.astype(np.float32)


def test_apply_scales_shrinks_limits_and_gates():
    prob = _blob_map([(160, 160, 320, 320), (640, 640, 160, 160)])
    boxes, conf = apply(prob, PostProcess(threshold=0.5, min_box_area=0), 1024, 1024)
    assert len(boxes) == 2 and np.allclose(sorted(boxes[:, 2]), [160, 320])
    boxes, conf = apply(prob, PostProcess(threshold=0.5, min_box_area=50_000), 1024, 1024)
    assert np.allclose(boxes, [[160, 160, 320, 320]])  # the small one is below the area
    shrunk, _ = apply(prob, PostProcess(threshold=0.5, min_box_area=50_000, box_scale=0.75), 1024, 1024)
    assert np.allclose(shrunk, [[200, 200, 240, 240]])  # same centre, 75% of the size
    one, _ = apply(prob, PostProcess(threshold=0.5, min_box_area=0, max_boxes=1), 1024, 1024, opacity=0.9)
    assert len(one) == 1
    gated, _ = apply(prob, PostProcess(threshold=0.5, min_box_area=0, gate=0.5), 1024, 1024, opacity=0.4)
    assert len(gated) == 0
    _, scaled = apply(prob, PostProcess(threshold=0.5, min_box_area=0), 1024, 1024, opacity=0.5)
    assert np.allclose(scaled, conf * 0.5)  # the opacity probability scales the confidences


def test_shape_boxes_keeps_the_most_confident():
    boxes = np.array([[0, 0, 100, 100], [200, 0, 100, 100], [400, 0, 100, 100]], float)
    kept, conf = shape_boxes(boxes, np.array([0.2, 0.9, 0.5]), PostProcess(min_box_area=0, max_boxes=2))
    assert np.allclose(conf, [0.9, 0.5]) and np.allclose(kept[:, 0], [200, 400])


def test_merge_overlapping_gives_enclosing_boxes():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 10, 10], [12, 12, 5, 5], [50, 50, 5, 5]], float)
    merged, conf = merge_overlapping(boxes, np.array([0.5, 0.9, 0.3, 0.2]))
    # a chain of overlaps merges into one box; the separate box stays
    assert np.allclose(merged, [[0, 0, 17, 17], [50, 50, 5, 5]]) and np.allclose(conf, [0.9, 0.2])


def _validation_set(n=48, seed=0):
    """Positives with a true blob; negatives with a weaker false blob that a gate should remove."""
    rng = np.random.default_rng(seed)
    probs, frames, truth, opacity = {}, {}, {}, {}
    for i in range(n):
        if i % 3 == 0:
            box = (int(rng.integers(100, 400)), int(rng.integers(100, 400)), 300, 400)
            probs[i] = _blob_map([box], seed=i)
            truth[i], opacity[i] = np.array([box], float), 0.6 + 0.3 * rng.random()
        else:
            probs[i] = _blob_map([(600, 600, 200, 200)], seed=i)  # as bright as a true one
            truth[i], opacity[i] = np.zeros((0, 4)), 0.4 * rng.random()
        frames[i] = (1024, 1024)
    return probs, frames, truth, opacity


def test_search_finds_the_gate_and_beats_the_threshold_alone():
    probs, frames, truth, opacity = _validation_set()
    alone = search(probs, frames, truth, None, mode="threshold")
    full = search(probs, frames, truth, opacity)
    assert 0.4 <= full.settings.gate <= 0.6  # between the negatives' and the positives' opacity
    assert full.score.map > alone.score.map + 0.3
    # the reported score is what apply() gives with the chosen settings: one implementation
    preds = {k: apply(probs[k], full.settings, *frames[k], opacity=opacity[k]) for k in truth}
    assert mean_average_precision(truth, preds).map == pytest.approx(full.score.map)
    # the gate alone (shape settings as given) separates these images as well, with far fewer tries
    gate = search(probs, frames, truth, opacity, mode="gate")
    assert 0.4 <= gate.settings.gate <= 0.6 and gate.settings.max_boxes == 0 and gate.score.map > alone.score.map + 0.3
    assert gate.tried < full.tried / 10


def test_threshold_search_prefers_a_plateau_and_keeps_the_start_settings():
    probs, frames, truth, _ = _validation_set()
    start = PostProcess(min_box_area=123.0, box_scale=0.9)
    result = search(probs, frames, truth, None, start, mode="threshold")
    assert dataclasses.replace(result.settings, threshold=start.threshold) == start
    # every threshold scores alike between the noise and the blobs: the middle of that plateau
    assert 0.3 <= result.settings.threshold <= 0.6
    assert result.tried == len(THRESHOLD_GRID) + 1  # the thresholds, then the pick


def test_settings_round_trip_as_plain_dicts():
    settings = PostProcess(threshold=0.35, max_boxes=3, merge=True, gate=0.55)
    assert PostProcess.from_dict({**settings.to_dict(), "unknown": 1}) == settings
