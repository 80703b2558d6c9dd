"""TrainConfig: the single definition of a training run's parameters.

The notebook's parameters cell, `pneumo train -p key=value`, YAML params files and sweep
entries all go through it. Layering: defaults < YAML file < key=value overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from pneumo.errors import ConfigError, shown
from pneumo.limits import MAX_PARAMS_DEPTH, MAX_PARAMS_ITEMS
from pneumo.optimizers import OPTIMIZERS, SCHEDULERS

LOSSES = ("bce_dice", "bce", "dice")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed")
IMAGE_SIZE_RANGE = (32, 1024)  # model input side in pixels; `pneumo prepare` checks the same range
# search: threshold, shape settings and classifier gate searched on the validation split each
# epoch (pneumo.models.postprocess); gate: the threshold and the classifier gate; threshold: the
# threshold alone; fixed: the values given here.
POSTPROCESS = ("search", "gate", "threshold", "fixed")
# The model's parts (encoder, head) are names the parts' own registries check
# (pneumo.models.net.check_config), not this module: a new part needs no edit here.


# How a run executes, not what it trains: a run may resume (or a sweep count it done) with other values of these.
EXECUTION_FIELDS = frozenset({"threads", "num_workers", "max_time"})

@dataclass(frozen=True)
class TrainConfig:
    data_dir: str = "outputs/synth"  # an RSNA-layout directory, or a `pneumo prepare` output
    optimizer: str = "adamw"
    lr: float | None = None  # None: the optimizer's default (pneumo.optimizers.OPTIMIZERS)
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd and rmsprop only
    scheduler: str = "cosine"
    epochs: int = 20
    batch_size: int = 16
    image_size: int = 128
    encoder: str = "unet"  # unet (from scratch) or a timm model name, e.g. tf_efficientnet_lite0
    encoder_weights: str = "none"  # none | imagenet | PATH of a timm state dict (pneumo.models.timm_encoder)
    # keep a pretrained encoder's batch-norm statistics and affine weights as loaded, as detection
    # libraries do for small batches (norm_eval); on the real images at 128 px it lost on every
    # split (docs/benchmarks.md), so it is off
    freeze_bn: bool = False
    width: int = 8  # channels of the first UNet level; doubled at each level down
    depth: int = 4  # UNet levels (image_size must be divisible by 2**depth)
    loss: str = "bce_dice"
    augment: bool = True
    # the box head: mask (boxes are connected components of the opacity map), centre (an
    # anchor-free CenterNet-style head beside the same map) or fcos (torchvision's FCOS head on
    # the decoder's 1/8 and 1/16 levels); pneumo.models.heads
    head: str = "mask"
    # The real-data benchmark did not show the classifier or the searched post-processing beating
    # the plain mask model beyond the split-to-split spread (docs/architecture.md, "Real data"),
    # so they are opt-in.
    classifier: bool = False  # image-level opacity head on the deepest features; gates the boxes
    metadata: bool = True  # the classifier also sees view position, sex and age
    class_weight: float = 1.0  # weight of the classifier's cross-entropy beside the mask loss
    # decay of an exponential moving average of the weights (Lightning's EMAWeightAveraging): validation,
    # checkpoints and predictions use the average; 0: off
    ema: float = 0.0
    postprocess: str = "threshold"  # search | gate | threshold | fixed (see POSTPROCESS)
    threshold: float = 0.5  # probability threshold for boxes (the start value when searched)
    min_box_area: float = 1000.0  # in pixels of the original image frame (RSNA: 1024 x 1024)
    val_fraction: float = 0.2
    seed: int = 0
    max_images: int = 0  # 0: all; else a stratified subset for quick debugging
    save_images: bool = True
    n_val_images: int = 8  # annotated validation images per epoch (TensorBoard and PNGs)
    num_workers: int = -1  # -1: 0 on CPU (the cache is in memory), up to 4 on a GPU
    threads: int = 0  # torch CPU threads; 0: torch's default
    precision: str = "auto"  # auto: 16-mixed on a GPU, 32-true on the CPU
    max_time: float = 0.0  # minutes; 0: no limit

    def __post_init__(self):
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}"),
            (1 <= self.epochs <= 100_000, "epochs must be in 1..100000"),
            (1 <= self.batch_size <= 4096, "batch_size must be in 1..4096"),
            (1 <= self.depth <= 6, "depth must be in 1..6"),
            (2 <= self.width <= 256, "width must be in 2..256"),
            (IMAGE_SIZE_RANGE[0] <= self.image_size <= IMAGE_SIZE_RANGE[1],
             "image_size must be in {}..{}".format(*IMAGE_SIZE_RANGE)),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}"),
            (0 < self.threshold < 1, "threshold must be in (0, 1)"),
            (self.class_weight >= 0, "class_weight must be >= 0"),
            (0 <= self.ema < 1, "ema must be in [0, 1) (0: off)"),
            (self.postprocess in POSTPROCESS, f"postprocess must be one of {', '.join(POSTPROCESS)}"),
            (self.min_box_area >= 0, "min_box_area must be >= 0"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (self.max_images >= 0, "max_images must be >= 0"),
            (0 <= self.n_val_images <= 256, "n_val_images must be in 0..256"),
            (-1 <= self.num_workers <= 256, "num_workers must be in -1..256"),
            (0 <= self.threads <= 4096, "threads must be in 0..4096"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.max_time >= 0, "max_time must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else OPTIMIZERS[self.optimizer].default_lr

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, source: str = "parameters") -> TrainConfig:
        """Build from a mapping, refusing unknown keys and wrong types with the valid keys."""
        # YAML keys may be null or numbers too ("?" alone is {None: None}): name them all as text
        extra = set(values) - set(cls.names())
        unknown = sorted(k[:40] if isinstance(k, str) else shown(k, 40) for k in extra)
        if unknown:
            raise ConfigError(f"{source}: unknown parameter(s) {', '.join(unknown)}; "
                              f"valid: {', '.join(cls.names())}")
        hints = typing.get_type_hints(cls)
        coerced = {k: _coerce(k, v, hints[k], source) for k, v in values.items()}
        try:
            return cls(**coerced)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}" if source != "parameters" else str(exc)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _coerce(name, value, hint, source):
    """Check value against the field's type; ints are accepted for floats (YAML writes 1 for 1.0)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):  # inf passes `lr > 0`; nan passes no check but says nothing
                    raise ConfigError(f"{source}: {name} must be a finite number, not {value}")
                return float(value)
        elif kind is str and isinstance(value, str):
            if "\0" in value:  # no file system takes it: every path use would raise ValueError
                raise ConfigError(f"{source}: {name} holds a NUL character: {shown(value)}")
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise ConfigError(f"{source}: {name} must be {names}, not {shown(value)}")


def parse_value(text: str):
    """A command-line value as YAML reads it: 3 -> int, 1e-3 -> float, true -> bool, null -> None."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    check_document(value, f"-p value {shown(text, 40)}")
    if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
        try:
            return float(text)
        except ValueError:
            return value
    return value


def parse_overrides(items) -> dict:
    """['lr=0.01', 'optimizer=sgd'] -> {'lr': 0.01, 'optimizer': 'sgd'}."""
    out = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-p {shown(item)}: expected key=value")
        out[key.strip()] = parse_value(text.strip())
    return out


def read_params_file(path) -> dict:
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file") from None
    except (OSError, ValueError) as exc:  # a directory, no permission, a NUL in the name, not UTF-8
        raise ConfigError(f"{path}: not a readable params file ({getattr(exc, 'strerror', None) or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter: value")
    check_document(values, str(path))
    return values


def check_document(value, source: str) -> None:
    """Refuse a loaded YAML document larger or deeper than any real params file, counting what
    anchors stand for (each visit of a shared list counts again) and stopping at the limit, so
    nothing later formats or copies a "billion laughs"."""
    stack, items = [(value, 1)], 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > MAX_PARAMS_ITEMS or depth > MAX_PARAMS_DEPTH:
            raise ConfigError(f"{source}: more than {MAX_PARAMS_ITEMS} values or {MAX_PARAMS_DEPTH} levels of nesting "
                              "(counting what YAML anchors repeat); a params file holds a few hundred")
        if isinstance(node, dict):
            stack.extend((part, depth + 1) for pair in node.items() for part in pair)
        elif isinstance(node, (list, tuple, set)):
            stack.extend((part, depth + 1) for part in node)


def load_config(params_file=None, overrides=None, base: dict | None = None) -> TrainConfig:
    """Defaults < base < params file < key=value overrides."""
    values = dict(base or {})
    source = "parameters"
    if params_file:
        values.update(read_params_file(params_file))
        source = str(params_file)
    values.update(parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else (overrides or {}))
    return TrainConfig.from_dict(values, source)
