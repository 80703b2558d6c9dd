"""Shared fixtures: one tiny synthetic dataset per test session (real JPEG-Baseline DICOMs)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("PNEUMO_NO_PROGRESS", "1")
# Whatever a test writes by default (prepared caches, runs) goes to a temporary tree, never ./outputs
os.environ["PNEUMO_OUTPUTS"] = tempfile.mkdtemp(prefix="pneumo-test-outputs-")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small RSNA-layout dataset at 256 px; treat as read-only (copy it to change it)."""
    from pneumo.data.synth import make_dataset

    root = tmp_path_factory.mktemp("synth")
    make_dataset(root, n_train=48, n_test=8, seed=7, size=256, workers=2)
    return root


@pytest.fixture
def data_copy(synth_dir, tmp_path):
    """A private, writable copy of the synthetic dataset."""
    dst = tmp_path / "data"
    shutil.copytree(synth_dir, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_run(synth_dir, tmp_path_factory):
    """A run directory trained for two epochs on the synthetic data (64 px, tiny UNet)."""
    from pneumo.config import TrainConfig
    from pneumo.training.fit import fit

    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    # with the opacity classifier and the full search, so predict and serve exercise both
    fit(TrainConfig(data_dir=str(synth_dir), epochs=2, image_size=64, depth=3, width=4, batch_size=8,
                    n_val_images=2, classifier=True, postprocess="search"), run_dir)
    return run_dir
