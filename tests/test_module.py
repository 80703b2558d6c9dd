import numpy as np
import pytest
import torch

from pneumo.models.module import build_optimizer, rank_auc


@pytest.mark.parametrize("name", ["adam", "adamw", "adamax", "sgd", "adagrad", "rmsprop"])
def test_every_optimizer_builds(name):
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(name, params, 0.01, 1e-4, 0.9)
    assert opt.param_groups[0]["lr"] == 0.01


def test_rank_auc_against_counting_pairs():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # many ties
    positive = rng.random(60) < 0.3
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in scores[positive] for n in scores[~positive]]
    assert rank_auc(scores, positive) == pytest.approx(np.mean(pairs))
    assert rank_auc(scores, np.zeros(60, bool)) is None
