import numpy as np
import pytest

from pneumo.boxes import (
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


def test_parse_boxes_components_and_confidence():
    prob = np.zeros((32, 32))
    prob[2:6, 3:10] = 0.8
    prob[20:30, 20:25] = 0.6
    prob[0, 31] = 0.9  # a one-pixel speck, dropped by min_area
    boxes, conf = parse_boxes(prob, 0.5, min_area=2)
    order = np.argsort(boxes[:, 0])
    assert np.allclose(boxes[order], [[3, 2, 7, 4], [20, 20, 5, 10]])
    assert np.allclose(conf[order], [0.8, 0.6])


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
