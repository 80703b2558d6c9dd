import numpy as np
from blob_maps import blob_map

from pneumo.models.postprocess import PostProcess, apply, merge_overlapping, shape_boxes


def test_apply_scales_shrinks_limits_and_gates():
    prob = blob_map([(160, 160, 320, 320), (640, 640, 160, 160)])
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


def _merge_one_pair_at_a_time(boxes, conf):
    """The plain statement of merging: the first overlapping pair (row-major) becomes its
    enclosing box, until no two boxes overlap (the earlier implementation)."""
    from pneumo.boxes import from_corners, iou_matrix, to_corners

    boxes, conf = boxes.copy(), conf.copy()
    while len(boxes) > 1:
        touching = np.triu(iou_matrix(boxes, boxes) > 0, k=1)
        if not touching.any():
            break
        i, j = np.argwhere(touching)[0]
        corners = to_corners(boxes[[i, j]])
        boxes[i] = from_corners(np.concatenate([corners[:, :2].min(0), corners[:, 2:].max(0)]))[0]
        conf[i] = max(conf[i], conf[j])
        boxes, conf = np.delete(boxes, j, axis=0), np.delete(conf, j)
    return boxes, conf


def test_merge_overlapping_equals_merging_one_pair_at_a_time():
    rng = np.random.default_rng(0)
    for n in (2, 5, 30, 120):
        boxes = np.column_stack([rng.uniform(0, 900, (n, 2)), rng.uniform(5, 120, (n, 2))])
        conf = np.round(rng.random(n), 1)  # ties too
        got, expected = merge_overlapping(boxes, conf), _merge_one_pair_at_a_time(boxes, conf)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_merge_overlapping_gives_enclosing_boxes():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 10, 10], [12, 12, 5, 5], [50, 50, 5, 5]], float)
    merged, conf = merge_overlapping(boxes, np.array([0.5, 0.9, 0.3, 0.2]))
    # a chain of overlaps merges into one box; the separate box stays
    assert np.allclose(merged, [[0, 0, 17, 17], [50, 50, 5, 5]]) and np.allclose(conf, [0.9, 0.2])


def test_settings_round_trip_as_plain_dicts():
    settings = PostProcess(threshold=0.35, max_boxes=3, merge=True, gate=0.55)
    assert PostProcess.from_dict({**settings.to_dict(), "unknown": 1}) == settings
