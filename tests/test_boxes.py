import numpy as np
import pytest

from pneumo.boxes import (
    box_records,
    boxes_in_image,
    boxes_to_mask,
    check_patient_id,
    format_prediction_string,
    from_corners,
    iou_matrix,
    parse_boxes,
    parse_prediction_string,
    scale,
    to_corners,
)


def test_corner_round_trip_and_scale():
    b = np.array([[10, 20, 30, 40], [0, 0, 1, 1]], float)
    assert np.allclose(to_corners(b), [[10, 20, 40, 60], [0, 0, 1, 1]])
    assert np.allclose(from_corners(to_corners(b)), b)
    assert np.allclose(scale(b, 0.5), b / 2)


def test_iou_matrix_known_values():
    a = [[0, 0, 10, 10]]
    b = [[0, 0, 10, 10], [5, 0, 10, 10], [20, 20, 5, 5], [0, 0, 10, 5]]
    iou = iou_matrix(a, b)
    assert iou.shape == (1, 4)
    assert np.allclose(iou[0], [1.0, 50 / 150, 0.0, 0.5])
    assert iou_matrix([], b).shape == (0, 4)


def test_iou_matrix_batched_equals_one_image_at_a_time():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.uniform(0, 80, (5, 3, 2)), rng.uniform(1, 40, (5, 3, 2))], axis=-1)
    b = np.concatenate([rng.uniform(0, 80, (5, 2, 2)), rng.uniform(1, 40, (5, 2, 2))], axis=-1)
    batched = iou_matrix(a, b)
    assert batched.shape == (5, 3, 2)
    for i in range(5):
        assert np.allclose(batched[i], iou_matrix(a[i], b[i]))


def test_boxes_in_image_scales_each_axis_and_min_area_in_image_pixels():
    prob = np.zeros((32, 32))
    prob[4:8, 2:10] = 0.9  # 8 x 4 model pixels
    prob[20:22, 20:22] = 0.7  # 2 x 2 model pixels
    # a 640-row x 1280-column image: x scales by 40, y by 20; one model pixel is 800 image pixels
    boxes, conf = boxes_in_image(prob, 0.5, min_box_area=4 * 800, rows=640, columns=1280)
    order = np.argsort(boxes[:, 0])
    assert np.allclose(boxes[order], [[80, 80, 320, 80], [800, 400, 80, 40]])
    assert np.allclose(conf[order], [0.9, 0.7])
    boxes, _ = boxes_in_image(prob, 0.5, min_box_area=4 * 800 + 1, rows=640, columns=1280)
    assert np.allclose(boxes, [[80, 80, 320, 80]])
    boxes, conf = boxes_in_image(np.zeros((16, 16)), 0.5, 0.0, 1024, 1024)
    assert boxes.shape == (0, 4) and conf.shape == (0,)


def test_box_records():
    records = box_records([[1, 2, 3, 4]], [0.123456])
    assert records == [{"x": 1.0, "y": 2.0, "width": 3.0, "height": 4.0, "confidence": 0.1235}]
    assert box_records(np.zeros((0, 4)), []) == []


def test_parse_boxes_components_and_confidence():
    prob = np.zeros((32, 32))
    prob[2:6, 3:10] = 0.8
    prob[20:30, 20:25] = 0.6
    prob[0, 31] = 0.9  # a one-pixel speck, dropped by min_area
    boxes, conf = parse_boxes(prob, 0.5, min_area=2)
    order = np.argsort(boxes[:, 0])
    assert np.allclose(boxes[order], [[3, 2, 7, 4], [20, 20, 5, 10]])
    assert np.allclose(conf[order], [0.8, 0.6])


def test_parse_boxes_confidence_is_the_mean_inside_each_box_of_a_speckled_map():
    # a half-trained map: many components, boxes that hold pixels of other components
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for dtype in (np.float16, np.float32):
        prob = ndimage.gaussian_filter(rng.random((96, 80)), 1.5)
        prob = ((prob - prob.min()) / (prob.max() - prob.min())).astype(dtype)
        for threshold, min_area in ((0.5, 0), (0.6, 6), (0.95, 0)):
            boxes, conf = parse_boxes(prob, threshold, min_area)
            labels, n = ndimage.label(prob > threshold)
            spans = [(xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start)
                     for ys, xs in ndimage.find_objects(labels)]
            expected = [b for b in spans if b[2] * b[3] >= min_area]
            assert n > (20 if threshold < 0.9 else 0)
            assert np.array_equal(boxes, np.array(expected, dtype=np.float64).reshape(-1, 4))
            means = [prob[y:y + h, x:x + w].mean(dtype=np.float64) for x, y, w, h in expected]
            if dtype == np.float16:  # the validation search's maps: exactly the per-box mean
                assert np.array_equal(conf, means)
            else:
                assert np.allclose(conf, means, rtol=0, atol=1e-9)
    empty, none = parse_boxes(np.zeros((8, 8), np.float16), 0.5)
    assert empty.shape == (0, 4) and none.shape == (0,)


def test_boxes_to_mask_matches_parse_boxes():
    mask = boxes_to_mask([[4, 5, 6, 7]], 20, 20)
    assert mask.sum() == 42
    boxes, _ = parse_boxes(mask, 0.5)
    assert np.allclose(boxes, [[4, 5, 6, 7]])


def test_prediction_string_round_trip_sorted_by_confidence():
    text = format_prediction_string([[1, 2, 3, 4], [10, 20, 30, 40]], [0.2, 0.9])
    assert text == "0.9000 10 20 30 40 0.2000 1 2 3 4"
    boxes, conf = parse_prediction_string(text)
    assert np.allclose(conf, [0.9, 0.2]) and np.allclose(boxes[1], [1, 2, 3, 4])
    assert parse_prediction_string("")[0].shape == (0, 4)
    assert parse_prediction_string(float("nan"))[0].shape == (0, 4)


@pytest.mark.parametrize("bad", ["0.5 1 2 3", "0.5 a 2 3 4", "0.5 1 2 -3 4", "0.5 1 2 inf 4"])
def test_malformed_prediction_string(bad):
    with pytest.raises(ValueError):
        parse_prediction_string(bad)


@pytest.mark.parametrize("pid", ["../etc/passwd", "a/b", ".hidden", "", "x" * 200, "a\\b"])
def test_patient_id_refuses_path_tricks(pid):
    with pytest.raises(ValueError):
        check_patient_id(pid)


def test_patient_id_accepts_rsna_uuid():
    assert check_patient_id("0004cfab-14fd-4e49-80ba-63a80b6bddd6")
