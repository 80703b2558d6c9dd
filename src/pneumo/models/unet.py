"""The from-scratch UNet's parts: its encoder (registered as `unet`) and the UNet decoder that
every encoder shares (transposed-convolution upsampling, skip connections, two 3x3 convolutions
a level)."""

from __future__ import annotations

import torch
from torch import nn

from pneumo.models.encoders import ENCODERS, Encoder


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


@ENCODERS.register
class UNetEncoder(Encoder):
    """`depth` levels of `width` channels at full resolution, doubling per level down: quick to
    train from scratch on synthetic data, no weights to fetch."""

    name = "unet"

    def __init__(self, config, pretrained: bool = False):  # no weights to load: trained from scratch
        super().__init__()
        self.channels = [config.width * 2**i for i in range(config.depth + 1)]
        self.strides = self.feature_strides(config)
        self.inc = conv_block(1, self.channels[0])
        self.down = nn.ModuleList(conv_block(self.channels[i], self.channels[i + 1]) for i in range(config.depth))
        self.pool = nn.MaxPool2d(2)

    @classmethod
    def feature_strides(cls, config) -> list[int]:
        return [2**i for i in range(config.depth + 1)]

    @classmethod
    def check(cls, config) -> list[str]:
        if config.encoder_weights != "none":
            return ["the unet encoder trains from scratch: encoder_weights must be none"]
        if config.freeze_bn:
            return ["the unet encoder trains from scratch: freeze_bn (pretrained statistics) must be false"]
        return []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - 0.5) / 0.25  # grey levels are already 0..1
        features = [self.inc(x)]
        for down in self.down:
            features.append(down(self.pool(features[-1])))
        return features


class UNetDecoder(nn.Module):
    """From the deepest features up to the encoder's finest level, one skip connection a level.
    Returns the decoded features by stride ({16: ..., 8: ..., ..., finest: ...})."""

    def __init__(self, channels: list[int], strides: list[int]):
        super().__init__()
        self.strides = strides
        levels = list(reversed(range(len(channels) - 1)))
        self.up = nn.ModuleList(nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in levels)
        self.dec = nn.ModuleList(conv_block(channels[i] * 2, channels[i]) for i in levels)
        self.channels = {strides[i]: channels[i] for i in levels}  # what the heads can read

    def forward(self, features: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        skips, decoded = list(features), {}
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            skip = skips.pop()
            y = dec(torch.cat([up(y), skip], dim=1))
            decoded[self.strides[len(skips)]] = y
        return decoded
