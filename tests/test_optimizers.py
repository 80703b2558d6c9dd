"""pneumo.optimizers: every table entry builds, with the settings the table says it takes."""

import pytest
import torch

from pneumo.config import TrainConfig
from pneumo.errors import ConfigError
from pneumo.optimizers import OPTIMIZERS, SCHEDULERS, build_optimizer


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_builds_with_its_settings(name):
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(name, params, 0.01, weight_decay=1e-4, momentum=0.9)
    group = opt.param_groups[0]
    assert type(opt).__name__ == OPTIMIZERS[name].cls.rpartition(".")[2]
    assert group["lr"] == 0.01 and group["weight_decay"] == 1e-4
    if "momentum" in OPTIMIZERS[name].settings:
        assert group["momentum"] == 0.9
    assert TrainConfig(optimizer=name).learning_rate == OPTIMIZERS[name].default_lr


def test_the_config_accepts_exactly_the_table():
    for name in OPTIMIZERS:
        TrainConfig(optimizer=name)
    with pytest.raises(ConfigError, match="optimizer must be one of adam, adamw"):
        TrainConfig(optimizer="lion")
    for name in SCHEDULERS:
        TrainConfig(scheduler=name)


@pytest.mark.parametrize("name", [n for n, make in SCHEDULERS.items() if make is not None])
def test_every_scheduler_steps_to_its_end(name):
    opt = build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], 0.1, weight_decay=0.0, momentum=0.0)
    scheduler = SCHEDULERS[name](opt, 10, 0.1)
    for _ in range(10):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] < 0.1
