"""The image-level opacity classifier: the three classes of stage_2_detailed_class_info.csv from
the encoder's deepest features (and optionally view position, sex and age). About 77% of RSNA
images have no opacity and one box on such an image scores it 0, so its P(opacity) gates the
boxes (pneumo.models.postprocess)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pneumo.data.layout import CLASSES
from pneumo.data.metadata import N_METADATA
from pneumo.models.heads.base import HEADS, FeatureInfo, Features, Head

N_CLASSES = len(CLASSES)


def opacity_probability(class_logits: torch.Tensor) -> torch.Tensor:
    """P(Lung Opacity) from class logits: the first class of pneumo.data.layout.CLASSES."""
    return torch.softmax(class_logits.float(), dim=1)[:, 0]


@HEADS.register
class ClassifierHead(Head):
    name = "classifier"
    outputs = ("classes",)  # (B, N_CLASSES) logits
    gates = True

    def __init__(self, config, features: FeatureInfo):
        super().__init__()
        self.reads_metadata = config.metadata
        self.weight = config.class_weight
        width = features.deepest * 2 + (N_METADATA if self.reads_metadata else 0)  # mean and max pooled
        # no dropout: it would draw from the global RNG, which a resumed run does not restore
        self.layers = nn.Sequential(nn.Linear(width, 64), nn.ReLU(inplace=True), nn.Linear(64, N_CLASSES))

    def forward(self, features: Features) -> dict:
        deepest = features.deepest
        pooled = [deepest.mean(dim=(2, 3)), deepest.amax(dim=(2, 3))]
        if self.reads_metadata:
            if features.metadata is None:
                raise ValueError("this network was built with metadata=True: pass the metadata vector")
            pooled.append(features.metadata.to(deepest.dtype))
        return {"classes": self.layers(torch.cat(pooled, dim=1))}

    def loss(self, outputs: dict, batch: dict) -> torch.Tensor:
        if not self.weight:
            return outputs["classes"].sum() * 0.0
        return self.weight * F.cross_entropy(outputs["classes"].float(), batch["classes"])

    def opacity(self, outputs: dict) -> torch.Tensor:
        return opacity_probability(outputs["classes"])
