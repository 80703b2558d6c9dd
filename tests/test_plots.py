"""pneumo.plots on real inputs: a run's metrics layout, annotated PNGs and the synthetic labels."""

import matplotlib
import numpy as np
import pytest

from pneumo.data.layout import decode_file, dicom_files, layout, read_labels
from pneumo.io import atomic_save_image
from pneumo.plots import box_heatmap, image_grid, learning_curves
from pneumo.render import annotate

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_learning_curves_plot_each_epoch():
    # the layout of metrics.json / fit()'s return value
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_map": 0.1 * e} for e in (1, 2, 3)]
    fig = learning_curves({"history": history, "best_epoch": 3})
    ax_loss, ax_map = fig.axes
    train, val = ax_loss.get_lines()
    assert list(train.get_xdata()) == [1, 2, 3] and np.allclose(val.get_ydata(), [1.2, 0.6, 0.4])
    assert np.allclose(ax_map.get_lines()[0].get_ydata(), [0.1, 0.2, 0.3])
    assert len(ax_map.get_lines()) == 2  # the best epoch is marked
    assert len(learning_curves({"history": history[:1]}).axes[1].get_lines()) == 1


def test_image_grid_tiles_pngs(synth_dir, tmp_path):
    paths = []
    for path in dicom_files(layout(synth_dir).train_images)[:5]:
        item = decode_file(path, keep_full=True)
        paths.append(tmp_path / f"{item.patientId}.png")
        atomic_save_image(paths[-1], annotate(item.full, [[10, 10, 50, 50]], [0.9]))
    grid = image_grid(paths, columns=2, tile=64)
    assert grid.mode == "RGB" and grid.size == (2 * 64, 3 * 64)
    pixels = np.asarray(grid)
    assert pixels[:64, :64].std() > 1 and (pixels[128:, 64:] == 20).all()  # the empty sixth tile
    assert image_grid([]) is None


def test_box_heatmap_of_the_synthetic_labels(synth_dir):
    boxes = np.concatenate([b for b in read_labels(layout(synth_dir).labels).values() if len(b)])
    sides = np.full(len(boxes), 256.0)
    heat = box_heatmap(boxes, sides, sides, size=32)
    assert heat.shape == (32, 32) and heat.min() >= 0 and heat.max() <= 1
    # opacities are in the lungs, left and right of the spine, never in the corners
    assert heat[:, :16].sum() > 0 and heat[:, 16:].sum() > 0 and heat[0, 0] == 0
    one = box_heatmap([[0, 0, 512, 1024]], size=8)  # default frame: 1024 x 1024
    assert (one[:, :4] == 1).all() and (one[:, 4:] == 0).all()
    assert box_heatmap(np.zeros((0, 4))).sum() == 0


def test_learning_curves_tick_whole_epochs_even_after_one():
    import matplotlib.pyplot as plt

    fig = learning_curves({"history": [{"epoch": 1, "train_loss": 1.9, "val_loss": 1.8, "val_map": 0.1}],
                           "best_epoch": 1})
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [1.0]
    plt.close(fig)
