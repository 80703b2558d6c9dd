"""The FCOS head: torchvision's anchor-free detector head (classification, box distances and
centre-ness on every location of two decoder levels), with torchvision's target assignment, loss
(sigmoid focal, GIoU, centre-ness BCE) and decoding with non-maximum suppression.

pneumo's decoder plays torchvision's FPN: its levels at 1/8 and 1/16 of the input are projected
to one width and fed to the shared towers. torchvision's own resizing and normalisation
(GeneralizedRCNNTransform, 800 px) are never used: the images arrive as pneumo's data layer made
them. A negative image is an empty target: every location of it learns "no opacity".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pneumo.models.heads.base import HEADS, FeatureInfo, Features, Head
from pneumo.models.heads.centre import box_extents
from pneumo.models.postprocess import Candidates

FCOS_STRIDES = (8, 16)  # decoder levels read; each level's anchor size is its stride (torchvision's rule)
WIDTH = 64  # channels of the shared towers (GroupNorm of 32 groups needs a multiple of 32)
TOWER_CONVS = 2  # torchvision's default is 4; two halve the head's cost on a CPU
TOP_K = 10  # boxes kept per image after NMS, as the centre head keeps its peaks
MIN_SCORE, NMS_IOU = 0.05, 0.5  # below the lowest threshold the search tries; the leaderboard's NMS IoU
# one output map per level, channels: class logit, box distances left, top, right, bottom (in
# anchor sizes), centre-ness logit
CHANNELS = ("logit", "left", "top", "right", "bottom", "centreness")


def _output(stride: int) -> str:
    return f"fcos_s{stride}"


class _Levels(nn.Module):
    """What torchvision's FCOS asks of a backbone: the width of its levels. The levels themselves
    come from pneumo's decoder."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = channels


@HEADS.register
class FcosHead(Head):
    name = "fcos"
    outputs = tuple(_output(s) for s in FCOS_STRIDES)  # (B, 6, H/stride, W/stride) each
    box_targets = "per_box"
    decodes_boxes = True

    def __init__(self, config, features: FeatureInfo):
        super().__init__()
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.fcos import FCOS, FCOSHead

        self.project = nn.ModuleList(nn.Conv2d(features.channels[s], WIDTH, 1) for s in FCOS_STRIDES)
        anchors = AnchorGenerator(tuple((s,) for s in FCOS_STRIDES), ((1.0,),) * len(FCOS_STRIDES))
        self.detector = FCOS(_Levels(WIDTH), num_classes=1, anchor_generator=anchors,
                             head=FCOSHead(WIDTH, 1, 1, num_convs=TOWER_CONVS),
                             min_size=config.image_size, max_size=config.image_size, image_mean=[0.0], image_std=[1.0],
                             score_thresh=MIN_SCORE, nms_thresh=NMS_IOU, detections_per_img=TOP_K)

    @classmethod
    def check(cls, config, strides: list[int]) -> list[str]:
        missing = [s for s in FCOS_STRIDES if s not in strides]
        if missing:
            return [f"head fcos reads the decoder at 1/{' and 1/'.join(map(str, FCOS_STRIDES))} size; this encoder "
                    f"decodes strides {strides} (the unet encoder needs depth >= 5; timm encoders have them)"]
        return []

    def forward(self, features: Features) -> dict:
        levels = [project(features.decoded[s]) for project, s in zip(self.project, FCOS_STRIDES)]
        out = self.detector.head(levels)  # (B, sum of H*W, k) each, levels in order, rows then columns
        flat = torch.cat([out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]], dim=-1)
        maps, start = {}, 0
        for s, level in zip(FCOS_STRIDES, levels):
            h, w = level.shape[-2:]
            maps[_output(s)] = flat[:, start:start + h * w].unflatten(1, (h, w)).permute(0, 3, 1, 2)
            start += h * w
        return maps

    def _flat(self, outputs: dict):
        """torchvision's layout from the maps: head outputs (B, N, k), anchors per image (N, 4),
        locations per level and the input's side."""
        from torchvision.models.detection.image_list import ImageList

        maps = [outputs[_output(s)].float() for s in FCOS_STRIDES]
        flat = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        side = maps[0].shape[-1] * FCOS_STRIDES[0]
        shape = (len(flat), 1, side, side)
        images = ImageList(flat.new_empty(1).expand(shape), [(side, side)] * len(flat))
        anchors = self.detector.anchor_generator(images, [m[:, :1] for m in maps])
        head = {"cls_logits": flat[..., :1], "bbox_regression": flat[..., 1:5], "bbox_ctrness": flat[..., 5:]}
        return head, anchors, [m.shape[-2] * m.shape[-1] for m in maps], side

    def loss(self, outputs: dict, batch: dict) -> torch.Tensor:
        head, anchors, per_level, _ = self._flat(outputs)
        x0, y0, x1, y1, present = box_extents(batch["masks"])  # the boxes after augmentation
        corners = torch.stack([x0, y0, x1, y1], dim=-1)
        targets = [{"boxes": c[p], "labels": torch.zeros(int(p.sum()), dtype=torch.int64, device=c.device)}
                   for c, p in zip(corners, present)]
        losses = self.detector.compute_loss(targets, head, anchors, per_level)
        return sum(losses.values())

    def mirror(self, outputs: dict) -> dict:
        # torchvision's locations sit at the cells' top-left corners (x * stride): location x of
        # the flipped image is location W - x of the image itself, one to the right of the plain
        # flip; left and right distances swap. The first column repeats its neighbour.
        mirrored = {}
        for name in self.outputs:
            m = outputs[name].flip(-1)
            m = torch.cat([m[..., :1], m[..., :-1]], dim=-1)
            mirrored[name] = m[:, [0, 3, 2, 1, 4, 5]]
        return mirrored

    def decode(self, outputs: dict, map_dtype=np.float32) -> list:
        with torch.no_grad():
            head, anchors, per_level, side = self._flat({k: v.detach() for k, v in outputs.items()})
            split = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
            detections = self.detector.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                                              [(side, side)] * len(anchors))
        found = []
        for d in detections:
            corners = d["boxes"].cpu().numpy().astype(np.float64)
            boxes = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
            found.append(Candidates(boxes, d["scores"].cpu().numpy().astype(np.float64), side))
        return found
