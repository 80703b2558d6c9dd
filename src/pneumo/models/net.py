"""The network: an encoder, the UNet decoder and heads, built by one function from a TrainConfig.
A plain torch module (no Lightning): training, predict, serve and the ONNX export build it here.

Its outputs are a dict of named tensors, the heads' declared outputs in order; what they mean
and how they become boxes is the heads' business (pneumo.models.heads.base).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import pneumo.models.unet  # noqa: F401  (registers the unet encoder)
from pneumo.errors import ConfigError, ModelError
from pneumo.models.encoders import ENCODERS, Encoder
from pneumo.models.heads import HEADS, FeatureInfo, Features, Head
from pneumo.models.unet import UNetDecoder


class Net(nn.Module):
    def __init__(self, encoder: Encoder, heads: list[type[Head]], box_head: str, config):
        super().__init__()
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.channels, encoder.strides)
        info = FeatureInfo(self.decoder.channels, encoder.channels[-1])
        self.heads = nn.ModuleDict({cls.name: cls(config, info) for cls in heads})
        self.box_head = box_head
        # Channels-last (NHWC) convolutions, the layout oneDNN's CPU kernels and tensor cores (mixed
        # precision) prefer: whole training runs on one CPU thread ~17% faster (none on two).
        self.to(memory_format=torch.channels_last)

    @property
    def input_names(self) -> list[str]:
        return ["image"] + (["metadata"] if self.reads_metadata else [])

    @property
    def output_names(self) -> list[str]:
        return [name for head in self.heads.values() for name in head.outputs]

    @property
    def reads_metadata(self) -> bool:
        return any(head.reads_metadata for head in self.heads.values())

    @property
    def box_targets(self) -> str:
        """What the data layer draws from the boxes for the losses: "per_box" if any head needs it."""
        return "per_box" if any(h.box_targets == "per_box" for h in self.heads.values()) else "union"

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = images.contiguous(memory_format=torch.channels_last)
        levels = self.encoder(x)
        features = Features(self.decoder(levels), levels[-1], metadata, tuple(images.shape[-2:]))
        outputs = {}
        for head in self.heads.values():
            outputs.update(head(features))
        return outputs

    def loss(self, outputs: dict, batch: dict) -> torch.Tensor:
        return sum(head.loss(outputs, batch) for head in self.heads.values())

    def decode(self, outputs: dict, map_dtype=np.float32) -> list:
        """Per image, what post-processing reads (pneumo.models.postprocess.apply)."""
        return self.heads[self.box_head].decode(outputs, map_dtype)

    def mirror(self, outputs: dict) -> dict:
        """The outputs of the horizontally flipped image, expressed for the image itself."""
        mirrored = {}
        for head in self.heads.values():
            mirrored.update(head.mirror(outputs))
        return mirrored

    def opacity(self, outputs: dict) -> torch.Tensor | None:
        """(B,) P(opacity) from the gate head, None without one."""
        gates = [head for head in self.heads.values() if head.gates]
        return gates[0].opacity(outputs) if gates else None


def _head_classes(config) -> list[type[Head]]:
    box = HEADS.get(config.head)
    if not box.decodes_boxes:
        raise ConfigError(f"head {config.head!r} decodes no boxes; choose one of "
                          f"{', '.join(n for n in HEADS.names() if HEADS.get(n).decodes_boxes)}")
    names = [*box.companions, box.name] + (["classifier"] if config.classifier else [])
    return [HEADS.get(name) for name in dict.fromkeys(names)]


def encoder_class(name: str) -> type[Encoder]:
    """A registered encoder, else a timm model name (pneumo.models.timm_encoder)."""
    if name in ENCODERS:
        return ENCODERS.get(name)
    from pneumo.models.timm_encoder import TimmEncoder, is_timm_model

    if is_timm_model(name):
        return TimmEncoder
    raise ConfigError(f"unknown encoder {name!r}; one of: {', '.join(ENCODERS.names())}, "
                      "or a timm model name (python -c 'import timm; print(timm.list_models())')")


def check_config(config) -> None:
    """ConfigError naming what the config's parts refuse (an unknown encoder or head, a head the
    encoder cannot feed), without building anything."""
    encoder = encoder_class(config.encoder)
    problems = list(encoder.check(config))
    all_strides = encoder.feature_strides(config)  # a timm encoder builds a meta-device model for it: once
    for head in _head_classes(config):
        problems += head.check(config, all_strides[:-1])  # the decoded levels
    if config.image_size % all_strides[-1]:
        problems.append(f"image_size must be divisible by {all_strides[-1]}, the encoder's deepest stride")
    if problems:
        raise ConfigError("; ".join(problems))


def build_net(config, pretrained: bool = False) -> Net:
    """The network of config. pretrained: load the encoder's weights (config.encoder_weights), for
    a new training run; a checkpoint's network is built without them and given its own."""
    check_config(config)
    cls = encoder_class(config.encoder)
    return Net(cls(config, pretrained=pretrained), _head_classes(config), config.head, config)


# State-dict names of the single-module UNet (pneumo 0.x before the parts): its checkpoints load.
_LEGACY_PREFIXES = (("inc.", "encoder.inc."), ("down.", "encoder.down."), ("up.", "decoder.up."),
                    ("dec.", "decoder.dec."), ("head.", "heads.mask.conv."), ("centre.", "heads.centre.layers."),
                    ("classifier.", "heads.classifier.layers."))


def _current_names(state: dict) -> dict:
    """state with the names of checkpoints written before the parts existed renamed."""
    if not state or any(k.startswith(("encoder.", "decoder.", "heads.")) for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in _LEGACY_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


def load_weights(net: Net, state: dict) -> None:
    """load_state_dict, accepting the names of checkpoints written before the parts existed."""
    net.load_state_dict(_current_names(state))


def net_for_weights(config, state: dict) -> Net:
    """The network of config holding state's weights. The config's network is first built on the
    meta device (no memory) and its tensors compared with state's, so a small file whose config
    describes a huge network fails in one line before anything is allocated."""
    state = _current_names(state)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_net(config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        missing = [k for k in expected if k not in found]
        unexpected = [k for k in found if k not in expected]
        wrong = [k for k in expected if k in found and found[k] != expected[k]]
        example = (missing or unexpected or wrong)[0]
        raise ModelError(f"weights that do not fit the config's network: {len(missing)} of {len(expected)} tensors "
                         f"missing, {len(unexpected)} unexpected, {len(wrong)} of another shape (e.g. {example})")
    net = build_net(config)
    net.load_state_dict(state)
    return net
