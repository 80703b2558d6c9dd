"""The network: a plain UNet that maps a grey image to opacity logits, usable without Lightning.

Besides the per-pixel map it can carry an image-level classifier on the encoder's deepest
features (optionally joined by sex, age and view position): about 77% of RSNA images have no
opacity, and one box on such an image scores it 0, so an image-level "is there any opacity"
probability is what gates the boxes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

N_CLASSES = 3  # the classes of stage_2_detailed_class_info.csv, in pneumo.data.layout.CLASSES order
N_METADATA = 3  # view position AP, sex male, age / 100: see metadata_vector
CENTRE_STRIDE = 4  # the centre head reads the decoder at 1/4 of the input side, as CenterNet does


class NetOutput(NamedTuple):
    mask: torch.Tensor  # (B, 1, H, W) logits of "this pixel is inside an opacity box"
    classes: torch.Tensor | None  # (B, N_CLASSES) logits, None without a classifier head
    # (B, 5, H/s, W/s), s = CENTRE_STRIDE: heat logits, log width, log height, centre offset x, y in the cell
    centre: torch.Tensor | None = None


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """UNet of `depth` levels, `width` channels at the top, doubling per level.

    Input (B, 1, H, W) with H and W divisible by 2**depth, values in [0, 1]; metadata (B,
    N_METADATA) when built with metadata=True. Output: NetOutput(mask logits, class logits).
    """

    def __init__(self, width: int = 16, depth: int = 4, classifier: bool = False, metadata: bool = False,
                 centre: bool = False):
        super().__init__()
        channels = [width * 2**i for i in range(depth + 1)]
        self.inc = _block(1, channels[0])
        self.down = nn.ModuleList(_block(channels[i], channels[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2)
                                for i in reversed(range(depth)))
        self.dec = nn.ModuleList(_block(channels[i] * 2, channels[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(channels[0], 1, 1)
        self.centre = None
        if centre:
            # box centres as heat-map peaks, and each box's log width and height (fractions of the
            # image side): an anchor-free head in the CenterNet / FCOS style on the same decoder
            level = CENTRE_STRIDE.bit_length() - 1  # the UNet level at that stride
            if depth <= level:
                raise ValueError(f"the centre head needs depth > {level}")
            self.centre_level = depth - 1 - level  # the decoder step that outputs that level
            c = channels[level]
            self.centre = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c, 5, 1))
            # start at heat 0.1 (CenterNet's prior) and boxes a quarter of the side, not at zero
            with torch.no_grad():
                self.centre[-1].bias.copy_(torch.tensor([-2.19, -1.4, -1.4, 0.5, 0.5]))
        self.pool = nn.MaxPool2d(2)
        self.metadata = metadata and classifier
        self.classifier = None
        if classifier:
            features = channels[-1] * 2 + (N_METADATA if self.metadata else 0)  # mean and max pooled
            # no dropout: it would draw from the global RNG, which a resumed run does not restore
            self.classifier = nn.Sequential(nn.Linear(features, 64), nn.ReLU(inplace=True), nn.Linear(64, N_CLASSES))
        # Channels-last (NHWC) convolutions, the layout oneDNN's CPU kernels and tensor cores (mixed
        # precision) prefer: whole training runs on one CPU thread ~17% faster (none on two).
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> NetOutput:
        x = ((x - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)  # grey levels are already 0..1
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(self.pool(skips[-1])))
        y = skips.pop()
        classes = self._classify(y, metadata) if self.classifier is not None else None
        centre = None
        for level, (up, dec) in enumerate(zip(self.up, self.dec)):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
            if self.centre is not None and level == self.centre_level:
                centre = self.centre(y)
        return NetOutput(self.head(y), classes, centre)

    def _classify(self, deepest: torch.Tensor, metadata: torch.Tensor | None) -> torch.Tensor:
        pooled = [deepest.mean(dim=(2, 3)), deepest.amax(dim=(2, 3))]
        if self.metadata:
            if metadata is None:
                raise ValueError("this network was built with metadata=True: pass the metadata vector")
            pooled.append(metadata.to(deepest.dtype))
        return self.classifier(torch.cat(pooled, dim=1))


def opacity_probability(class_logits: torch.Tensor) -> torch.Tensor:
    """P(Lung Opacity) from class logits: the first class of pneumo.data.layout.CLASSES."""
    return torch.softmax(class_logits.float(), dim=1)[:, 0]


def metadata_vector(view_position, sex, age) -> list[float]:
    """The classifier's metadata input: [view is AP, sex is M, age / 100]; unknown values are neutral."""
    try:
        age = float(age)
    except (TypeError, ValueError):
        age = float("nan")
    age = age / 100 if age == age and 0 <= age <= 120 else 0.5
    view = str(view_position).strip().upper()
    sex = str(sex).strip().upper()
    return [1.0 if view == "AP" else 0.0 if view == "PA" else 0.5, 1.0 if sex == "M" else 0.0 if sex == "F" else 0.5, age]
