import numpy as np
import pytest
import torch

from pneumo.boxes import boxes_to_mask
from pneumo.data.augment import augment
from pneumo.models.heads.centre import box_extents, centre_loss, centre_targets
from pneumo.models.postprocess import Candidates, PostProcess, apply, candidates, decode_centres


def _box_masks(boxes, side=64, channels=3):
    masks = torch.zeros(1, channels, side, side)
    for k, box in enumerate(boxes):
        masks[0, k] = torch.from_numpy(boxes_to_mask(np.array([box], float), side, side))
    return masks


def test_targets_peak_at_each_centre_with_the_box_size():
    masks = _box_masks([(8, 10, 16, 20), (40, 30, 12, 24)])
    x0, y0, x1, y1, present = box_extents(masks)
    assert present.tolist() == [[True, True, False]]
    assert x0[0, :2].tolist() == [8, 40] and (x1 - x0)[0, :2].tolist() == [16, 12]
    heat, log_size, positive, offsets = centre_targets(masks)  # a 16 x 16 grid (stride 4)
    assert heat.shape == (1, 1, 16, 16) and positive.sum() == 2 and heat.max() == 1.0
    # centres (16, 20) and (46, 42) pixels: cells (4, 5) and (11, 10), offsets inside the cell
    assert heat[0, 0, 5, 4] == 1.0 and heat[0, 0, 10, 11] == 1.0
    assert offsets[0, :, 5, 4].tolist() == [0.0, 0.0] and offsets[0, :, 10, 11].tolist() == [0.5, 0.5]
    assert torch.exp(log_size[0, :, 5, 4]).mul(64).tolist() == pytest.approx([16, 20])
    assert torch.exp(log_size[0, :, 10, 11]).mul(64).tolist() == pytest.approx([12, 24])
    empty_heat, _, empty_pos, _ = centre_targets(torch.zeros(2, 3, 64, 64))
    assert empty_heat.sum() == 0 and empty_pos.sum() == 0


def test_augmentation_moves_targets_with_the_image():
    masks = _box_masks([(8, 10, 16, 20)])
    images = masks[:, :1].clone()
    _, moved = augment(images.repeat(4, 1, 1, 1), masks.repeat(4, 1, 1, 1), torch.Generator().manual_seed(3))
    _, _, positive, offsets = centre_targets(moved)
    for b in range(4):  # the positive's centre lies inside the moved box, wherever it went
        ys, xs = torch.nonzero(positive[b, 0], as_tuple=True)
        x = int((xs[0] + offsets[b, 0, ys[0], xs[0]]) * 4)
        y = int((ys[0] + offsets[b, 1, ys[0], xs[0]]) * 4)
        assert len(ys) == 1 and moved[b, 0, y, x] == 1


def test_decoding_the_targets_gives_the_boxes_back():
    boxes = [(8, 10, 16, 20), (40, 30, 12, 24)]
    heat, log_size, _, offsets = centre_targets(_box_masks(boxes))
    found = decode_centres(heat[0, 0].numpy(), log_size[0].numpy(), 64, offsets[0].numpy())
    assert len(found.boxes) == 2 and np.allclose(found.scores, 1.0)
    assert sorted(map(tuple, np.round(found.boxes).tolist())) == sorted(boxes)
    # in the image's own frame (1024 x 512 image, 64 px model side) and through apply()
    frame_boxes, conf = candidates(found, 0.5, 512, 1024)
    assert sorted(frame_boxes[:, 2].round().tolist()) == [12 * 16, 16 * 16]
    kept, _ = apply(found, PostProcess(threshold=0.5, min_box_area=0, max_boxes=1), 512, 1024)
    assert len(kept) == 1


def test_loss_is_lower_for_the_right_answer():
    masks = _box_masks([(8, 10, 16, 20)])
    heat, log_size, _, offsets = centre_targets(masks)
    right = torch.cat([torch.logit(heat.clamp(1e-3, 1 - 1e-3)), log_size, offsets], dim=1)
    wrong = torch.cat([torch.full_like(heat, -2.0), torch.zeros_like(log_size), torch.zeros_like(offsets)], dim=1)
    assert centre_loss(right, masks) < 0.5 * centre_loss(wrong, masks)


def test_candidates_above_a_threshold():
    found = Candidates(np.array([[0, 0, 8, 8], [10, 10, 4, 4]], float), np.array([0.9, 0.3]), 64)
    boxes, scores = found.above(0.5, 1024, 1024)
    assert np.allclose(boxes, [[0, 0, 128, 128]]) and np.allclose(scores, [0.9])
