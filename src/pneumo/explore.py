"""Data exploration for notebooks/01-explore.ipynb: tables, figures and an ipywidgets viewer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pneumo.data import layout


def summary_tables(features: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Class balance and demographics by class, from prepare's features.csv."""
    ages = pd.cut(features["PatientAge"], [0, 20, 40, 60, 80, 150], right=False)
    return {
        "class balance": features["class"].value_counts().to_frame("patients").assign(
            share=lambda d: (d["patients"] / d["patients"].sum()).round(3)),
        "sex by class": pd.crosstab(features["class"], features["PatientSex"], normalize="index").round(3),
        "view by class": pd.crosstab(features["class"], features["ViewPosition"], normalize="index").round(3),
        "age by class": pd.crosstab(features["class"], ages, normalize="index").round(3),
        "boxes per image": features.loc[features["Target"] == 1, "n_boxes"].value_counts().sort_index().to_frame("patients"),
    }


def overview_figure(features: pd.DataFrame, boxes: pd.DataFrame):
    """Age by class, box sizes, and a heat map of where opacities are."""
    import matplotlib.pyplot as plt

    from pneumo.plots import box_heatmap

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for klass, group in features.groupby("class"):
        axes[0].hist(group["PatientAge"].dropna(), bins=20, alpha=0.5, label=klass)
    axes[0].set(title="age by class", xlabel="years")
    axes[0].legend(fontsize=7)
    axes[1].scatter(boxes["width"], boxes["height"], s=4, alpha=0.5)
    axes[1].set(title="box sizes (original pixels)", xlabel="width", ylabel="height")
    frame = features.set_index("patientId").loc[boxes["patientId"]]
    heat = box_heatmap(boxes[["x", "y", "width", "height"]].to_numpy(), frame["rows"].to_numpy(), frame["columns"].to_numpy())
    axes[2].imshow(heat, cmap="magma")
    axes[2].set(title="where opacities are", xticks=[], yticks=[])
    fig.tight_layout()
    return fig


def window(image: np.ndarray, level: float, width: float) -> np.ndarray:
    """Display window on a uint8 image: level/width in grey levels, like a PACS viewer."""
    lo = level - width / 2
    return (np.clip((image.astype(np.float64) - lo) / max(width, 1e-6), 0, 1) * 255).astype(np.uint8)


def show_patient(data_dir, patient_id: str, boxes=(), level: float = 128, width: float = 256, show_boxes=True,
                 size: int = 512):
    """The annotated, windowed X-ray of one patient as a Pillow image."""
    from pneumo.dicom import read_dicom
    from pneumo.render import annotate

    image, _ = read_dicom(layout(data_dir).train_images / f"{patient_id}.dcm")
    shown = annotate(window(image, level, width), gt_boxes=boxes if show_boxes else ())
    return shown.convert("RGB").resize((size, size), resample=3)  # bicubic on RGB, not nearest on palette


def samples_per_class(data_dir, features: pd.DataFrame, boxes: pd.DataFrame, per_class: int = 3, seed: int = 0):
    """A grid image: one row per class, per_class annotated samples each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = sorted(features["class"].unique())
    tile = 256
    grid = Image.new("RGB", (per_class * tile, len(classes) * tile))
    for r, klass in enumerate(classes):
        pids = features.loc[features["class"] == klass, "patientId"].to_numpy()
        for c, pid in enumerate(rng.choice(pids, size=min(per_class, len(pids)), replace=False)):
            b = boxes.loc[boxes["patientId"] == pid, ["x", "y", "width", "height"]].to_numpy()
            grid.paste(show_patient(data_dir, pid, b, size=tile), (c * tile, r * tile))
    return grid, classes


def viewer(data_dir, features: pd.DataFrame, boxes: pd.DataFrame):
    """ipywidgets viewer: browse patients by class, show/hide boxes, adjust window/level.

    Returns the widget box; where no widget frontend runs (papermill, a terminal) it also
    works: the first image is displayed statically by the caller.
    """
    import ipywidgets as widgets

    klass = widgets.Dropdown(options=sorted(features["class"].unique()), description="class")
    index = widgets.IntSlider(min=0, max=0, description="patient")
    level = widgets.IntSlider(value=128, min=0, max=255, description="level")
    width_ = widgets.IntSlider(value=256, min=8, max=512, description="width")
    show = widgets.Checkbox(value=True, description="boxes")
    label = widgets.Label()
    out = widgets.Output()

    def pids():
        return features.loc[features["class"] == klass.value, "patientId"].tolist()

    def redraw(*_):
        ids = pids()
        index.max = max(len(ids) - 1, 0)
        if not ids:
            return
        pid = ids[min(index.value, len(ids) - 1)]
        b = boxes.loc[boxes["patientId"] == pid, ["x", "y", "width", "height"]].to_numpy()
        row = features.set_index("patientId").loc[pid]
        label.value = f"{pid}  {row['PatientSex']} {row['PatientAge']:.0f}y {row['ViewPosition']}  boxes: {len(b)}"
        with out:
            from IPython.display import clear_output, display

            clear_output(wait=True)
            display(show_patient(data_dir, pid, b, level.value, width_.value, show.value))

    for w in (klass, index, level, width_, show):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([klass, index, show]), widgets.HBox([level, width_]), label, out])
