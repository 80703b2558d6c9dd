"""Figures the notebooks show: learning curves of a run, data exploration, image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def learning_curves(metrics: dict):
    """Train/val loss and val mAP per epoch from a run's metrics (fit's return or RunDir(run).metrics())."""
    import matplotlib.pyplot as plt

    history = metrics.get("history", [])
    epochs = [h["epoch"] for h in history]
    from matplotlib.ticker import MaxNLocator

    # 10 inches: shown at its own size in JupyterLab, not shrunk (with its labels) to the notebook's width
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax_loss.plot(epochs, [h.get("train_loss") for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h.get("val_loss") for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_map.plot(epochs, [h["val_map"] for h in history], "o-", color="C2")
    ax_map.set(xlabel="epoch", ylabel="mAP", title="validation mAP (official RSNA)", ylim=(0, 1))
    for ax in (ax_loss, ax_map):
        # whole epochs: not 0.96 ... 1.04 after one epoch (min_n_ticks=1 lets one tick stand alone)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if metrics.get("best_epoch"):
        ax_map.axvline(metrics["best_epoch"], color="grey", ls="--", lw=1)
    fig.tight_layout()
    return fig


def image_grid(paths, columns: int = 4, tile: int = 256):
    """Image files side by side in one Pillow image (for notebooks: no figure per image), each
    fitted into its tile with its proportions (predict's images have a band above)."""
    from PIL import Image, ImageOps

    paths = [Path(p) for p in paths]
    if not paths:
        return None
    rows = -(-len(paths) // columns)
    grid = Image.new("RGB", (columns * tile, rows * tile), (20, 20, 20))
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            fitted = ImageOps.contain(im.convert("RGB"), (tile, tile))
            grid.paste(fitted, ((i % columns) * tile + (tile - fitted.width) // 2,
                                (i // columns) * tile + (tile - fitted.height) // 2))
    return grid


def box_heatmap(boxes, rows: np.ndarray | None = None, columns: np.ndarray | None = None, size: int = 128):
    """Fraction of boxes covering each point of a normalised image frame (where opacities are)."""
    heat = np.zeros((size, size))
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    rows = np.full(len(boxes), 1024.0) if rows is None else np.asarray(rows, float)
    columns = np.full(len(boxes), 1024.0) if columns is None else np.asarray(columns, float)
    for (x, y, w, h), r, c in zip(boxes, rows, columns):
        x0, x1 = int(x / c * size), int(np.ceil((x + w) / c * size))
        y0, y1 = int(y / r * size), int(np.ceil((y + h) / r * size))
        heat[y0:y1, x0:x1] += 1
    return heat / max(len(boxes), 1)
