"""Shared fixtures: one tiny synthetic dataset per test session (real JPEG-Baseline DICOMs)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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


# ---- a real browser: Debian's Chromium driven by Playwright (tests/test_lab.py, the TensorBoard test)

CHROMIUM = Path(os.environ.get("PNEUMO_CHROMIUM", "/usr/bin/chromium"))
# a closed network: nothing may phone home, and no GPU or sandbox in a CI container
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _require(ok: bool, reason: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run this test (.ci/run installs it)")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    _require(sync_playwright is not None, "Playwright for Python is not installed (pip install -e '.[dev]')")
    _require(os.access(CHROMIUM, os.X_OK), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_playwright


@pytest.fixture(scope="session")
def browser(sync_playwright):
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()
