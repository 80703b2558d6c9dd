"""The per-batch search (pneumo.models.scoring) against the whole-split search it replaced, kept here
verbatim as the reference: same outputs in, same choice and score out, however they are batched."""

import dataclasses

import numpy as np
import pytest
from blob_maps import blob_map

from pneumo.boxes import as_boxes
from pneumo.metrics import THRESHOLDS, Score, mean_average_precision
from pneumo.models.postprocess import (
    GATE_GRID,
    SHAPE_GRID,
    THRESHOLD_GRID,
    Candidates,
    PostProcess,
    apply,
    candidates,
    shape_boxes,
)
from pneumo.models.scoring import SearchResult, SearchScores, _plateau_best, search


def _validation_set(n=48, seed=0):
    """Positives with a true blob; negatives with a weaker false blob that a gate should remove."""
    rng = np.random.default_rng(seed)
    probs, frames, truth, opacity = {}, {}, {}, {}
    for i in range(n):
        if i % 3 == 0:
            box = (int(rng.integers(100, 400)), int(rng.integers(100, 400)), 300, 400)
            probs[i] = blob_map([box], seed=i)
            truth[i], opacity[i] = np.array([box], float), 0.6 + 0.3 * rng.random()
        else:
            probs[i] = blob_map([(600, 600, 200, 200)], seed=i)  # as bright as a true one
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




def _mixed_set(n=60, seed=1, centre=False):
    """Harder outputs than _validation_set: several blobs of varied strength and size per image,
    overlapping ones, misses and false positives, so thresholds, areas, merging, max boxes,
    scales and gates all change the score; centre=True gives Candidates instead of maps."""
    rng = np.random.default_rng(seed)
    outputs, frames, truth, opacity = {}, {}, {}, {}
    for i in range(n):
        frame = (1024, 1024) if i % 5 else (900, 1100)
        k = int(rng.integers(0, 4)) if i % 3 == 0 else 0
        gt = [(float(rng.integers(50, 600)), float(rng.integers(50, 500)), float(rng.integers(80, 350)),
               float(rng.integers(80, 400))) for _ in range(k)]
        found = [(x + rng.normal(0, 30), y + rng.normal(0, 30), w * rng.uniform(0.7, 1.4), h * rng.uniform(0.7, 1.4))
                 for x, y, w, h in gt if rng.random() < 0.8]
        found += [(float(rng.integers(0, 800)), float(rng.integers(0, 800)), float(rng.integers(20, 300)),
                   float(rng.integers(20, 300))) for _ in range(int(rng.integers(0, 3)))]
        levels = rng.uniform(0.1, 0.95, len(found))
        if centre:
            side = 64
            sx, sy = side / frame[1], side / frame[0]
            boxes = np.array([[x * sx, y * sy, w * sx, h * sy] for x, y, w, h in found]).reshape(-1, 4)
            outputs[i] = Candidates(boxes, levels.astype(np.float64), side)
        else:
            prob = rng.random((64, 64)) * 0.045  # under the lowest threshold: boxes are the blobs
            for (x, y, w, h), level in zip(found, levels):
                fx, fy = 64 / frame[1], 64 / frame[0]
                x0, y0 = max(int(x * fx), 0), max(int(y * fy), 0)
                prob[y0:int((y + h) * fy) + 1, x0:int((x + w) * fx) + 1] = level
            outputs[i] = prob.astype(np.float16)
        frames[i], truth[i] = frame, as_boxes(gt)
        opacity[i] = float(np.clip((0.65 if k else 0.35) + rng.normal(0, 0.2), 0, 1))
    return outputs, frames, truth, opacity


def _batched(outputs, frames, truth, opacity, start, mode, batch):
    scores = SearchScores(start, mode, gated=opacity is not None)
    keys = list(truth)
    for i in range(0, len(keys), batch):
        part = keys[i:i + batch]
        scores.add([outputs[k] for k in part], [frames[k] for k in part], [truth[k] for k in part],
                   None if opacity is None else [opacity[k] for k in part])
    return scores.result()


@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("mode", ["search", "gate", "threshold", "fixed"])
@pytest.mark.parametrize("gated", [True, False])
def test_per_batch_scoring_chooses_and_scores_as_the_whole_split_search(centre, mode, gated):
    outputs, frames, truth, opacity = _mixed_set(centre=centre)
    opacity = opacity if gated else None
    start = PostProcess(threshold=0.3, min_box_area=1000.0)
    if mode == "fixed":
        keys = list(truth)
        preds = {k: apply(outputs[k], start, *frames[k]) for k in keys}
        reference = (start, mean_average_precision(truth, preds), 1)
    else:
        old = whole_split_search(outputs, frames, truth, opacity, start, mode=mode)
        reference = (old.settings, old.score, old.tried)
    for batch in (1, 7, len(truth)) if mode == "search" else (7, len(truth)):
        new = _batched(outputs, frames, truth, opacity, start, mode, batch)
        assert new.settings == reference[0]
        assert new.tried == reference[2]
        assert new.score.map == pytest.approx(reference[1].map, abs=1e-12)
        assert new.score.n_images == reference[1].n_images
        assert new.score.per_threshold == pytest.approx(reference[1].per_threshold, abs=1e-12)
    assert reference[1].map > 0  # the comparison is not between two zeros


def test_every_candidate_scores_as_the_metric_does():
    """Not only the pick: each threshold x shape x gate sum gives the official metric's score."""
    outputs, frames, truth, opacity = _mixed_set(n=40, seed=3)
    scores = SearchScores(PostProcess(), "search", gated=True)
    keys = list(truth)
    scores.add([outputs[k] for k in keys], [frames[k] for k in keys], [truth[k] for k in keys],
               [opacity[k] for k in keys])
    rng = np.random.default_rng(0)
    for _ in range(25):
        values = {name: grid[rng.integers(len(grid))] for name, grid in SHAPE_GRID.items()}
        settings = PostProcess(threshold=float(rng.choice(THRESHOLD_GRID)), gate=float(rng.choice(GATE_GRID)), **values)
        preds = {k: apply(outputs[k], settings, *frames[k], opacity=opacity[k]) for k in keys}
        expected = mean_average_precision(truth, preds)
        got = scores.score(settings)
        assert got.map == pytest.approx(expected.map, abs=1e-12) and got.n_images == expected.n_images


def test_scoring_holds_the_grid_not_the_outputs():
    outputs, frames, truth, opacity = _mixed_set(n=30)
    scores = SearchScores(PostProcess(), "search", gated=True)
    before = {k: v.nbytes for k, v in vars(scores).items() if isinstance(v, np.ndarray)}
    keys = list(truth)
    scores.add([outputs[k] for k in keys], [frames[k] for k in keys], [truth[k] for k in keys],
               [opacity[k] for k in keys])
    after = {k: v.nbytes for k, v in vars(scores).items() if isinstance(v, np.ndarray)}
    assert before == after  # the same arrays, whatever the number of images added


# ------------------------------------------- the whole-split search, as it was (its plateau rule is the shared one)




def _gated_maps(per_image: dict, has_gt: dict, has_boxes: dict, opacity: dict, gates) -> np.ndarray:
    """The dataset score at each gate from one ungated scoring: a gated positive image scores 0,
    a gated negative image is skipped (it has neither truth nor boxes)."""
    ids = list(has_gt)
    positive = np.array([has_gt[i] for i in ids])
    boxed = np.array([has_boxes[i] for i in ids])
    score = np.array([per_image.get(i, 0.0) for i in ids])
    prob = np.array([opacity[i] for i in ids])
    maps = []
    for gate in gates:
        open_ = prob >= gate
        n = positive.sum() + (~positive & boxed & open_).sum()
        maps.append(float((score * (positive & open_)).sum() / n) if n else 0.0)
    return np.array(maps)


def whole_split_search(outputs, frames, ground_truth, opacity=None, start: PostProcess | None = None,
                       mode: str = "search") -> SearchResult:
    """The post-processing that scores best on these validation outputs.

    outputs: {key: model-resolution probability map or Candidates}; frames: {key: (rows, columns)}; ground_truth:
    {key: boxes in the image frame}; opacity: {key: P(opacity)} or None. mode "threshold"
    searches the threshold alone (start's other settings); "gate" then, given opacities, the
    gate around the best thresholds; "search" the shape settings (SHAPE_GRID) with the gate.
    """
    start = start or PostProcess()
    keys = list(ground_truth)
    by_threshold = {t: {k: candidates(outputs[k], t, *frames[k]) for k in keys} for t in THRESHOLD_GRID}
    tried = 0

    def score(settings: PostProcess) -> tuple[Score, dict]:
        nonlocal tried
        tried += 1
        # a gated image has no predictions, as apply() leaves it
        open_ = keys if not settings.gate else [k for k in keys if opacity[k] >= settings.gate]
        preds = {k: shape_boxes(*by_threshold[settings.threshold][k], settings) for k in open_}
        return mean_average_precision(ground_truth, preds, THRESHOLDS), preds

    base = dataclasses.replace(start, gate=0.0)
    maps = [score(dataclasses.replace(base, threshold=float(t)))[0].map for t in THRESHOLD_GRID]
    best_t = _plateau_best(np.array(maps))
    best = dataclasses.replace(base, threshold=float(THRESHOLD_GRID[best_t]))
    if mode != "threshold":
        grid = SHAPE_GRID if mode == "search" else {}
        best = _search_shape_and_gate(best, best_t, score, ground_truth, opacity, grid)
    return SearchResult(best, score(best)[0], tried)


def _search_shape_and_gate(best: PostProcess, best_t: int, score, ground_truth, opacity, grid: dict) -> PostProcess:
    has_gt = {k: len(as_boxes(g)) > 0 for k, g in ground_truth.items()}
    gates = GATE_GRID if opacity is not None else (0.0,)
    best_value = -1.0
    neighbours = THRESHOLD_GRID[max(0, best_t - 1): best_t + 2]
    for t in neighbours:
        for values in _product(grid):
            # scored ungated: one scoring gives every gate's score (_gated_maps)
            settings = dataclasses.replace(best, threshold=float(t), gate=0.0, **values)
            result, preds = score(settings)
            if opacity is None:
                maps = np.array([result.map])
            else:
                has_boxes = {k: len(preds[k][0]) > 0 for k in ground_truth}
                maps = _gated_maps(result.per_image, has_gt, has_boxes, opacity, gates)
            i = _plateau_best(maps) if len(maps) > 1 else 0
            if maps[i] > best_value + 1e-9:
                best_value, best = float(maps[i]), dataclasses.replace(settings, gate=float(gates[i]))
    return best


def _product(grid: dict):
    import itertools

    names = list(grid)
    for values in itertools.product(*(grid[n] for n in names)):
        yield dict(zip(names, values))


