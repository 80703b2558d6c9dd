"""Optimizers and learning-rate schedules in one table each: the config's checks, the
LightningModule and the tests read the same entries (timm's OptimInfo table does the same).

Nothing here imports torch until an optimizer is built: the config imports this module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: str  # import path of the torch optimizer class
    default_lr: float  # trains the from-scratch UNet well; used when lr is not given
    settings: tuple[str, ...] = ("weight_decay",)  # which TrainConfig fields it takes

    def build(self, params, lr: float, **config_values):
        module, _, name = self.cls.rpartition(".")
        kwargs = {k: config_values[k] for k in self.settings}
        if self.name == "sgd":  # Nesterov only with momentum, or torch refuses it
            kwargs["nesterov"] = kwargs["momentum"] > 0
        return getattr(importlib.import_module(module), name)(params, lr=lr, **kwargs)


OPTIMIZERS = {info.name: info for info in (
    OptimizerInfo("adam", "torch.optim.Adam", 1e-3),
    OptimizerInfo("adamw", "torch.optim.AdamW", 1e-3),
    OptimizerInfo("adamax", "torch.optim.Adamax", 2e-3),
    OptimizerInfo("sgd", "torch.optim.SGD", 3e-2, ("weight_decay", "momentum")),
    OptimizerInfo("adagrad", "torch.optim.Adagrad", 1e-2),
    OptimizerInfo("rmsprop", "torch.optim.RMSprop", 5e-4, ("weight_decay", "momentum")),
)}


def _cosine(optimizer, steps: int, lr: float):
    import torch

    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * 0.01)


def _onecycle(optimizer, steps: int, lr: float):
    import torch

    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)


# name -> (optimizer, total steps, peak lr) -> a per-step scheduler; None: a constant lr
SCHEDULERS = {"cosine": _cosine, "onecycle": _onecycle, "none": None}


def build_optimizer(name: str, params, lr: float, **config_values):
    """The optimizer of the table entry `name` (KeyError for a name the config let through: a bug)."""
    return OPTIMIZERS[name].build(params, lr, **config_values)
