import numpy as np
import pytest

from pneumo.models.module import rank_auc


def test_rank_auc_against_counting_pairs():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # many ties
    positive = rng.random(60) < 0.3
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in scores[positive] for n in scores[~positive]]
    assert rank_auc(scores, positive) == pytest.approx(np.mean(pairs))
    assert rank_auc(scores, np.zeros(60, bool)) is None
