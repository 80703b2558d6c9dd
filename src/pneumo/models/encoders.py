"""Encoders: the contract every encoder meets, and the registry that builds one by name.

An encoder is built as `cls(config, pretrained=False)` (pretrained: load the weights that
config.encoder_weights names) and takes (B, 1, H, W) grey levels in [0, 1] (H and W divisible by its largest stride)
and returns a list of feature maps, finest first, with `channels[i]` channels at `strides[i]`
(each stride twice the one before). It normalises its own input: a pretrained encoder knows its
statistics. The decoder (pneumo.models.unet.UNetDecoder) and the heads read only that.
"""

from __future__ import annotations

from torch import nn

from pneumo.models.registry import Registry

ENCODERS = Registry("encoder")


class Encoder(nn.Module):
    name: str
    channels: list[int]
    strides: list[int]

    @classmethod
    def check(cls, config) -> list[str]:
        """Problems with a config for this encoder, as sentences (none: fine)."""
        return []

    @classmethod
    def feature_strides(cls, config) -> list[int]:
        """The strides of its feature maps for config, finest first, without building it."""
        raise NotImplementedError


