"""The contract every head meets, and the registry heads are built from by name.

A head owns its layers, its loss, the targets it learns from, the names of its outputs and how
they become what post-processing reads. The network (pneumo.models.net), the LightningModule,
the data layer's targets, predict, serve and the ONNX export read only what is declared here;
nothing outside a head's own module compares its name.

- `name`: its registered name; `TrainConfig.head` names the box head, `classifier: true` adds
  the image-level gate.
- `outputs`: the names of the tensors it adds to the network's outputs, in order (the ONNX
  output names).
- `companions`: heads it is trained beside (the centre head learns beside the mask head's map).
- `box_targets`: what its loss needs drawn from the boxes: "union" (one mask channel) or
  "per_box" (one channel per box, so augmentation moves each box on its own).
- `reads_metadata`: whether forward reads the metadata vector (pneumo.data.metadata).
- `__init__(config, features)`: features is a FeatureInfo (channels by decoder stride, and of
  the encoder's deepest level).
- `forward(features: Features) -> dict[str, Tensor]`.
- `loss(outputs, batch) -> Tensor`: its share of the training loss.
- `decode(outputs, map_dtype) -> list` (box heads only): per image, what
  pneumo.models.postprocess.apply reads (a probability map or Candidates).
- `opacity(outputs) -> Tensor (B,)` (the gate only): P(opacity) per image.
- `mirror(outputs) -> dict`: its outputs computed on the horizontally flipped image, expressed for
  the image itself (flip test-time augmentation averages the two). The default flips maps (4-d)
  and keeps image-level outputs; a head whose channels hold x positions or left/right distances
  says how they change.
- `check(config, strides) -> list[str]`: problems with a config, as sentences; strides are
  the decoded strides the config's encoder gives.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pneumo.models.registry import Registry

HEADS = Registry("head")


class FeatureInfo(NamedTuple):
    channels: dict[int, int]  # decoded features: stride -> channels
    deepest: int  # channels of the encoder's deepest level


class Features(NamedTuple):
    decoded: dict[int, torch.Tensor]  # stride -> (B, C, H/stride, W/stride)
    deepest: torch.Tensor  # the encoder's deepest features
    metadata: torch.Tensor | None  # (B, N_METADATA) or None
    size: tuple[int, int]  # the input's height and width


class Head(nn.Module):
    name: str
    outputs: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()
    box_targets: str = "union"
    reads_metadata: bool = False
    decodes_boxes: bool = False
    gates: bool = False

    @classmethod
    def check(cls, config, strides: list[int]) -> list[str]:
        return []

    def loss(self, outputs: dict, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, outputs: dict, map_dtype) -> list:
        raise NotImplementedError(f"the {self.name} head decodes no boxes")

    def opacity(self, outputs: dict) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} head is no gate")

    def mirror(self, outputs: dict) -> dict:
        return {name: outputs[name].flip(-1) if outputs[name].dim() == 4 else outputs[name] for name in self.outputs}
