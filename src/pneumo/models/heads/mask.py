"""The mask head: a per-pixel opacity map at the input's resolution; its boxes are the connected
components above a threshold (pneumo.boxes.boxes_in_image, through post-processing)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumo.models.heads.base import HEADS, FeatureInfo, Features, Head


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    denom = prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    return (1 - (2 * inter + 1) / (denom + 1)).mean()


@HEADS.register
class MaskHead(Head):
    name = "mask"
    outputs = ("mask",)  # (B, 1, H, W) logits of "this pixel is inside an opacity box"
    decodes_boxes = True

    def __init__(self, config, features: FeatureInfo):
        super().__init__()
        self.stride = min(features.channels)  # the finest decoded level
        self.conv = nn.Conv2d(features.channels[self.stride], 1, 1)
        self.loss_kind = config.loss

    def forward(self, features: Features) -> dict:
        logits = self.conv(features.decoded[self.stride])
        if self.stride > 1:  # an encoder whose finest level is coarser than the input (timm's: 2)
            logits = F.interpolate(logits, size=features.size, mode="bilinear", align_corners=False)
        return {"mask": logits}

    def loss(self, outputs: dict, batch: dict) -> torch.Tensor:
        # masks has one channel per box for heads that need them: the map learns their union
        logits, masks = outputs["mask"], batch["masks"].amax(dim=1, keepdim=True)
        loss = F.binary_cross_entropy_with_logits(logits, masks)
        if self.loss_kind != "bce":
            dice = soft_dice_loss(logits, masks)
            loss = dice if self.loss_kind == "dice" else loss + dice
        return loss

    def decode(self, outputs: dict, map_dtype=np.float32) -> list:
        return list(torch.sigmoid(outputs["mask"].detach().float())[:, 0].cpu().numpy().astype(map_dtype, copy=False))
