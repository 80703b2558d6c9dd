"""pneumo.data.explore on a prepared synthetic dataset: the tables, figures and viewer of 01-explore."""

import matplotlib
import numpy as np
import pytest

from pneumo.data.explore import (
    overview_figure,
    samples_per_class,
    show_patient,
    summary_tables,
    viewer,
    window,
)
from pneumo.data.prepare import prepare

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def prepared(synth_dir, tmp_path_factory):
    return prepare(synth_dir, out=tmp_path_factory.mktemp("explore") / "p", image_size=32, workers=1)


def test_summary_tables(prepared):
    features = prepared.features
    tables = summary_tables(features)
    assert set(tables) == {"class balance", "sex by class", "view by class", "age by class", "boxes per image"}
    balance = tables["class balance"]
    assert balance["patients"].sum() == len(features) and balance["share"].sum() == pytest.approx(1, abs=0.01)
    assert np.allclose(tables["sex by class"].sum(axis=1), 1, atol=0.01)
    per_image = tables["boxes per image"]["patients"]
    assert per_image.sum() == (features["Target"] == 1).sum() and per_image.index.min() >= 1


def test_overview_figure(prepared):
    import matplotlib.pyplot as plt

    fig = overview_figure(prepared.features, prepared.boxes)
    assert len(fig.axes) == 3
    heat = fig.axes[2].get_images()[0].get_array()
    assert heat.shape == (128, 128) and heat.max() > 0
    plt.close(fig)


def test_window_maps_level_and_width_like_a_viewer():
    image = np.arange(256, dtype=np.uint8)
    assert np.abs(window(image, 128, 256).astype(int) - image).max() <= 1  # the full range: unchanged
    narrow = window(image, 100, 20)
    assert (narrow[:90] == 0).all() and (narrow[110:] == 255).all() and narrow[100] == 127


def test_show_patient_and_samples(prepared, synth_dir):
    pid = prepared.features.loc[prepared.features["n_boxes"] > 0, "patientId"].iloc[0]
    boxes = prepared.boxes.loc[prepared.boxes["patientId"] == pid, ["x", "y", "width", "height"]].to_numpy()
    with_boxes = show_patient(synth_dir, pid, boxes, size=128)
    without = show_patient(synth_dir, pid, boxes, show_boxes=False, size=128)
    assert with_boxes.mode == "RGB" and with_boxes.size == (128, 128)
    assert not np.array_equal(np.asarray(with_boxes), np.asarray(without))
    grid, classes = samples_per_class(synth_dir, prepared.features, prepared.boxes, per_class=2)
    assert classes == sorted(prepared.features["class"].unique())
    assert grid.size == (2 * 256, len(classes) * 256)


def test_viewer_follows_its_controls(prepared, synth_dir):
    import ipywidgets

    shown = viewer(synth_dir, prepared.features, prepared.boxes, size=128)
    assert isinstance(shown.widget, ipywidgets.VBox)
    klass, index, show = shown.widget.children[0].children
    label, picture = shown.widget.children[2:]
    first, first_png = label.value, picture.value
    assert first.split()[0] in set(prepared.features["patientId"]) and bytes(first_png).startswith(b"\x89PNG")
    index.value = 1
    assert label.value != first and picture.value != first_png
    klass.value = klass.options[-1]
    assert index.value == 0  # a new class starts at its first patient
    pid = label.value.split()[0]
    assert prepared.features.set_index("patientId").loc[pid, "class"] == klass.options[-1]
    before = picture.value
    shown.level.value = 40
    assert picture.value != before


def test_viewer_output_carries_a_still_image(prepared, synth_dir):
    """Frontends without widgets (papermill, nbconvert) show the PNG; JupyterLab shows the widget."""
    import base64

    shown = viewer(synth_dir, prepared.features, prepared.boxes, size=128)
    bundle = shown._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == bytes(shown.picture.value)
