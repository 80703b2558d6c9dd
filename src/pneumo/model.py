"""The network: a plain UNet that maps a grey image to opacity logits, usable without Lightning."""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """UNet of `depth` levels, `width` channels at the top, doubling per level.

    Input (B, 1, H, W) with H and W divisible by 2**depth, values in [0, 1];
    output (B, 1, H, W) logits of "this pixel is inside an opacity box".
    """

    def __init__(self, width: int = 16, depth: int = 4):
        super().__init__()
        channels = [width * 2**i for i in range(depth + 1)]
        self.inc = _block(1, channels[0])
        self.down = nn.ModuleList(_block(channels[i], channels[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2)
                                for i in reversed(range(depth)))
        self.dec = nn.ModuleList(_block(channels[i] * 2, channels[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(channels[0], 1, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25  # fixed normalisation: grey levels are already 0..1
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(self.pool(skips[-1])))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
        return self.head(y)
