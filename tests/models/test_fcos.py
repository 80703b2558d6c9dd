"""pneumo.models.heads.fcos: torchvision's FCOS head on pneumo's decoder levels, and how each box
head mirrors its outputs for flip test-time augmentation."""

import numpy as np
import pytest
import torch

from pneumo.boxes import boxes_to_mask, iou_matrix
from pneumo.config import TrainConfig
from pneumo.errors import ConfigError
from pneumo.models.net import build_net, check_config


def _config(**values):
    return TrainConfig(**{"encoder": "tf_efficientnet_lite0", "encoder_weights": "none", "image_size": 64,
                          "head": "fcos", "metadata": False, **values})


def _data(n=8, side=64, seed=0):
    """Images with one bright rectangle each (every fourth image empty) and its per-box mask."""
    rng = np.random.default_rng(seed)
    images, masks, boxes = torch.zeros(n, 1, side, side), torch.zeros(n, 1, side, side), []
    for i in range(n):
        images[i] += torch.from_numpy(rng.normal(0.3, 0.05, (side, side))).float()
        if i % 4 == 3:
            boxes.append(None)
            continue
        w, h = rng.integers(14, 30, 2)
        x, y = rng.integers(2, side - w - 2), rng.integers(2, side - h - 2)
        box = np.array([[x, y, w, h]], float)
        mask = torch.from_numpy(boxes_to_mask(box, side, side)).float()
        images[i, 0] += 0.5 * mask
        masks[i, 0] = mask
        boxes.append(box)
    return images, masks, boxes


def test_fcos_learns_where_the_boxes_are():
    torch.manual_seed(0)
    net = build_net(_config())
    images, masks, boxes = _data()
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    first = None
    for _ in range(120):
        loss = net.loss(net(images), {"masks": masks})
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < first / 3
    net.eval()
    with torch.no_grad():
        found = net.decode(net(images))
    for candidates, truth in zip(found, boxes):
        if truth is None:  # an empty image: what is left scores below any box on a positive
            continue
        best = candidates.boxes[np.argmax(candidates.scores)]
        assert iou_matrix(best[None], truth)[0, 0] > 0.5, (best, truth)
    positives = [c.scores.max() for c, t in zip(found, boxes) if t is not None]
    negatives = [c.scores.max(initial=0.0) for c, t in zip(found, boxes) if t is None]
    assert min(positives) > max(negatives)


@pytest.mark.parametrize("head", ["fcos", "centre"])
def test_mirroring_a_flipped_images_outputs_mirrors_its_boxes(head):
    """Outputs of the flipped image, mirrored by the head, decode to the mirror images of the boxes
    those outputs decode to: the geometry of each head's channels is undone exactly."""
    torch.manual_seed(1)
    net = build_net(_config(head=head)).eval()
    side = 64
    with torch.no_grad():
        out = net(torch.rand(1, 1, side, side))
        name = net.heads[head].outputs[0]
        lowest = out[name].clone()
        # one confident box, away from the first column (which mirroring cannot fill in)
        lowest[:, 0] = -10
        lowest[:, 0, 2, 3] = 10
        if head == "fcos":
            lowest[:, 5, 2, 3] = 10
            lowest[:, 1:5, 2, 3] = torch.tensor([0.9, 0.6, 0.4, 1.2])
        out[name] = lowest
        if head == "fcos":
            out["fcos_s16"][:, 0] = -10
        flipped = net.decode(out)[0]
        mirrored = net.decode({**out, **net.mirror(out)})[0]
    top, top_mirrored = flipped.boxes[np.argmax(flipped.scores)], mirrored.boxes[np.argmax(mirrored.scores)]
    x, y, w, h = top
    assert top_mirrored == pytest.approx([side - x - w, y, w, h], abs=1e-4)


def test_fcos_needs_the_decoder_levels_it_reads():
    with pytest.raises(ConfigError, match=r"head fcos reads the decoder at 1/8 and 1/16 size"):
        check_config(TrainConfig(head="fcos", depth=4, image_size=64))
    check_config(TrainConfig(head="fcos", depth=5, image_size=64))  # a UNet that deep has them


def test_fcos_trains_under_bf16_autocast():
    """The GPU profile's precision: the towers run in bf16, the loss and decoding in float32."""
    net = build_net(_config())
    images, masks, _ = _data(n=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(images)
        loss = net.loss(out, {"masks": masks})
    loss.backward()
    assert out["fcos_s8"].dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.heads["fcos"].parameters() if p.grad is not None)
    assert len(net.decode(out)) == 4
