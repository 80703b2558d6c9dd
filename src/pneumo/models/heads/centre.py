"""The centre head (CenterNet style): box centres as heat-map peaks and each box's size, read
from the decoder at 1/4 of the input side, trained beside the mask head's map. Its targets and
loss are computed on the training device from per-box masks after augmentation, so flips,
rotation and zoom move centres and sizes exactly."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pneumo.models.heads.base import HEADS, FeatureInfo, Features, Head
from pneumo.models.postprocess import decode_centres

CENTRE_STRIDE = 4  # the decoder level it reads, as CenterNet does


@HEADS.register
class CentreHead(Head):
    name = "centre"
    # (B, 5, H/4, W/4): heat logits, log width, log height, centre offset x, y in the cell
    outputs = ("centre",)
    companions = ("mask",)
    box_targets = "per_box"
    decodes_boxes = True

    def __init__(self, config, features: FeatureInfo):
        super().__init__()
        c = features.channels[CENTRE_STRIDE]
        self.layers = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c, 5, 1))
        # start at heat 0.1 (CenterNet's prior) and boxes a quarter of the side, not at zero
        with torch.no_grad():
            self.layers[-1].bias.copy_(torch.tensor([-2.19, -1.4, -1.4, 0.5, 0.5]))

    @classmethod
    def check(cls, config, strides: list[int]) -> list[str]:
        if CENTRE_STRIDE not in strides:
            return [f"head centre reads the decoder at 1/{CENTRE_STRIDE} size, which this encoder does not "
                    f"have (decoded strides {strides}; the unet encoder needs depth >= 3)"]
        return []

    def forward(self, features: Features) -> dict:
        return {"centre": self.layers(features.decoded[CENTRE_STRIDE])}

    def loss(self, outputs: dict, batch: dict) -> torch.Tensor:
        return centre_loss(outputs["centre"], batch["masks"])

    def mirror(self, outputs: dict) -> dict:
        # a centre at offset o in cell x of the flipped image is at offset 1 - o in cell W - 1 - x
        centre = outputs["centre"].flip(-1)
        return {"centre": torch.cat([centre[:, :3], 1 - centre[:, 3:4], centre[:, 4:]], dim=1)}

    def decode(self, outputs: dict, map_dtype=np.float32) -> list:
        centre = outputs["centre"].detach()
        heat = torch.sigmoid(centre[:, 0].float()).cpu().numpy()
        rest = centre[:, 1:].float().cpu().numpy()
        side = centre.shape[-1] * CENTRE_STRIDE
        return [decode_centres(h, r[:2], side, offsets=r[2:]) for h, r in zip(heat, rest)]


def box_extents(box_masks: torch.Tensor):
    """(B, K, H, W) per-box masks -> x0, y0, x1, y1 (B, K) in pixels (x1, y1 exclusive) and
    present (B, K): the bounding box of what is left of each box after augmentation."""
    m = box_masks > 0.5
    b, k, h, w = m.shape
    rows, cols = m.any(dim=-1), m.any(dim=-2)  # (B, K, H), (B, K, W)
    ys = torch.arange(h, device=m.device).expand(b, k, h)
    xs = torch.arange(w, device=m.device).expand(b, k, w)
    y0 = torch.where(rows, ys, h).amin(-1)
    y1 = torch.where(rows, ys, -1).amax(-1) + 1
    x0 = torch.where(cols, xs, w).amin(-1)
    x1 = torch.where(cols, xs, -1).amax(-1) + 1
    present = rows.any(-1) & (x1 - x0 >= 2) & (y1 - y0 >= 2)
    return x0.float(), y0.float(), x1.float(), y1.float(), present


def centre_targets(box_masks: torch.Tensor, stride: int = CENTRE_STRIDE):
    """On the head's grid (the masks' side / stride): a heat map (B, 1, h, w) with an elliptic
    Gaussian per box (sigma = size / 6, peak 1 at the centre cell), log-size targets (B, 2, h, w)
    of the box that owns each cell (fractions of the side), the positives (B, 1, h, w) and the offsets
    (B, 2, h, w) of each centre inside its cell, at the positives (the grid is coarser than the
    image: without them a centre would be off by up to half a cell)."""
    x0, y0, x1, y1, present = box_extents(box_masks)
    side_h, side_w = box_masks.shape[-2:]
    h, w = side_h // stride, side_w // stride
    cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
    bw, bh = ((x1 - x0) / stride).clamp(min=0.5), ((y1 - y0) / stride).clamp(min=0.5)
    xs = torch.arange(w, device=box_masks.device).float() + 0.5
    ys = torch.arange(h, device=box_masks.device).float() + 0.5
    gx = ((xs[None, None, :] - cx[..., None]) / (bw[..., None] / 6)) ** 2  # (B, K, W)
    gy = ((ys[None, None, :] - cy[..., None]) / (bh[..., None] / 6)) ** 2  # (B, K, H)
    gauss = torch.exp(-0.5 * (gy[..., :, None] + gx[..., None, :])) * present[..., None, None]
    centre_x = cx.floor().long().clamp(0, w - 1)
    centre_y = cy.floor().long().clamp(0, h - 1)
    positive = torch.zeros_like(gauss, dtype=torch.bool)
    bi, ki = torch.nonzero(present, as_tuple=True)
    positive[bi, ki, centre_y[bi, ki], centre_x[bi, ki]] = True
    heat, owner = torch.where(positive, 1.0, gauss).max(dim=1, keepdim=True)
    log_w = torch.log(bw / w).gather(1, owner.flatten(1)).view_as(heat)
    log_h = torch.log(bh / h).gather(1, owner.flatten(1)).view_as(heat)
    offsets = torch.zeros(heat.shape[0], 2, h, w, device=heat.device)
    offsets[bi, 0, centre_y[bi, ki], centre_x[bi, ki]] = (cx - cx.floor())[bi, ki]
    offsets[bi, 1, centre_y[bi, ki], centre_x[bi, ki]] = (cy - cy.floor())[bi, ki]
    return heat, torch.cat([log_w, log_h], dim=1), positive.any(dim=1, keepdim=True), offsets


def centre_loss(prediction: torch.Tensor, box_masks: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on the heat map, a heat-weighted L1 on log sizes and
    an L1 on the centre offsets at the positives."""
    heat, log_size, positive, offsets = centre_targets(box_masks)
    p = torch.sigmoid(prediction[:, :1].float()).clamp(1e-4, 1 - 1e-4)
    pos = positive.float()
    focal = -(torch.log(p) * (1 - p) ** 2 * pos + torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - pos)).sum()
    focal = focal / pos.sum().clamp(min=1)
    weight = heat * (heat > 0.1)  # sizes are learnt near the centres, where the heat is
    size = (torch.abs(prediction[:, 1:3].float() - log_size) * weight).sum() / weight.sum().clamp(min=1e-6)
    offset = (torch.abs(prediction[:, 3:5].float() - offsets) * pos).sum() / pos.sum().clamp(min=1)
    return focal + size + offset
