"""Data exploration for notebooks/01-explore.ipynb: tables, figures and an ipywidgets viewer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pneumo.data.layout import layout


def summary_tables(features: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Class balance and demographics by class, from prepare's features.csv."""
    ages = pd.cut(features["PatientAge"], [0, 20, 40, 60, 80, 150], right=False)
    return {
        "class balance": features["class"].value_counts().to_frame("patients").assign(
            share=lambda d: (d["patients"] / d["patients"].sum()).round(3)),
        "sex by class": pd.crosstab(features["class"], features["PatientSex"], normalize="index").round(3),
        "view by class": pd.crosstab(features["class"], features["ViewPosition"], normalize="index").round(3),
        "age by class": pd.crosstab(features["class"], ages, normalize="index").round(3),
        "boxes per image": (features.loc[features["Target"] == 1, "n_boxes"].value_counts().sort_index()
                            .to_frame("patients")),
    }


def overview_figure(features: pd.DataFrame, boxes: pd.DataFrame):
    """Age by class, box sizes, and a heat map of where opacities are."""
    import matplotlib.pyplot as plt

    from pneumo.plots import box_heatmap

    # 10 inches: JupyterLab shows it at its own size beside the file browser (a wider figure is
    # shrunk to the notebook's width, and its labels with it)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.3))
    bins = np.linspace(0, max(100, features["PatientAge"].max()), 21)
    for klass, group in features.groupby("class"):  # outlines: three overlapping filled histograms are mud
        axes[0].hist(group["PatientAge"].dropna(), bins=bins, histtype="step", linewidth=1.5, label=klass)
    axes[0].set(title="age by class", xlabel="years", ylabel="patients")
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.45)  # head room: the legend above the bars, not on them
    axes[0].legend(fontsize="small", loc="upper left")
    axes[1].scatter(boxes["width"], boxes["height"], s=8, alpha=0.5)
    axes[1].set(title="box sizes (original pixels)", xlabel="width", ylabel="height")
    frame = features.set_index("patientId").loc[boxes["patientId"]]
    heat = box_heatmap(boxes[["x", "y", "width", "height"]].to_numpy(), frame["rows"].to_numpy(),
                       frame["columns"].to_numpy())
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
    from pneumo.data.dicom import read_dicom
    from pneumo.render import annotate

    image, _ = read_dicom(layout(data_dir).train_images / f"{patient_id}.dcm")
    shown = annotate(window(image, level, width), gt_boxes=boxes if show_boxes else ())
    return shown.convert("RGB").resize((size, size), resample=3)  # bicubic on RGB, not nearest on palette


def samples_per_class(data_dir, features: pd.DataFrame, boxes: pd.DataFrame, per_class: int = 3, seed: int = 0):
    """A grid image: one row per class, per_class annotated samples each."""
    from PIL import Image

    from pneumo.render import caption

    rng = np.random.default_rng(seed)
    classes = sorted(features["class"].unique())
    tile = 256
    grid = Image.new("RGB", (per_class * tile, len(classes) * tile))
    for r, klass in enumerate(classes):
        pids = features.loc[features["class"] == klass, "patientId"].to_numpy()
        for c, pid in enumerate(rng.choice(pids, size=min(per_class, len(pids)), replace=False)):
            b = boxes.loc[boxes["patientId"] == pid, ["x", "y", "width", "height"]].to_numpy()
            shown = show_patient(data_dir, pid, b, size=tile)
            grid.paste(caption(shown, klass) if c == 0 else shown, (c * tile, r * tile))  # each row says its class
    return grid, classes


class Viewer:
    """Browse patients by class, show/hide boxes, adjust window/level (ipywidgets).

    Displayed, it is one widget (controls, patient line, image); its output also carries the
    current image as a plain PNG, which frontends without widgets show instead (papermill,
    nbconvert, GitHub). A live JupyterLab shows the widget alone: no still copy beside it.
    """

    def __init__(self, data_dir, features: pd.DataFrame, boxes: pd.DataFrame, size: int = 512):
        import ipywidgets as widgets

        self.data_dir, self.features, self.boxes, self.size = data_dir, features, boxes, size
        self._rows = features.set_index("patientId")
        # a redraw reads and encodes a DICOM: sliders update on release, not for every pixel dragged
        common = {"continuous_update": False, "style": {"description_width": "4em"}}
        self.klass = widgets.Dropdown(options=sorted(features["class"].unique()), description="class",
                                      layout={"width": "22em"}, style=common["style"])
        self.index = widgets.IntSlider(min=0, max=0, description="patient", **common)
        self.level = widgets.IntSlider(value=128, min=0, max=255, description="level", **common)
        self.width = widgets.IntSlider(value=256, min=8, max=512, description="width", **common)
        self.show_boxes = widgets.Checkbox(value=True, description="boxes", indent=False)
        self.label = widgets.Label()
        self.picture = widgets.Image(format="png", width=size, height=size)
        self.widget = widgets.VBox([widgets.HBox([self.klass, self.index, self.show_boxes]),
                                    widgets.HBox([self.level, self.width]), self.label, self.picture])
        self.klass.observe(self._class_changed, names="value")
        for control in (self.index, self.level, self.width, self.show_boxes):
            control.observe(self.redraw, names="value")
        self._class_changed()

    def patients(self) -> list[str]:
        return self.features.loc[self.features["class"] == self.klass.value, "patientId"].tolist()

    def _class_changed(self, *_):
        """A new class starts at its first patient, with one redraw (not one per slider bound moved)."""
        self.index.unobserve(self.redraw, names="value")
        self.index.value = 0
        self.index.max = max(len(self.patients()) - 1, 0)
        self.index.observe(self.redraw, names="value")
        self.redraw()

    def redraw(self, *_):
        import io

        ids = self.patients()
        if not ids:
            return
        self.patient = ids[min(self.index.value, len(ids) - 1)]
        b = self.boxes.loc[self.boxes["patientId"] == self.patient, ["x", "y", "width", "height"]].to_numpy()
        row = self._rows.loc[self.patient]
        self.label.value = (f"{self.patient}  {row['PatientSex']} {row['PatientAge']:.0f}y {row['ViewPosition']}"
                            f"  boxes: {len(b)}")
        image = show_patient(self.data_dir, self.patient, b, self.level.value, self.width.value,
                             self.show_boxes.value, size=self.size)
        buffer = io.BytesIO()
        image.save(buffer, format="png")
        self.picture.value = buffer.getvalue()

    def _repr_mimebundle_(self, **kwargs):
        import base64

        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        return {**bundle, "image/png": base64.b64encode(self.picture.value).decode("ascii")}


def viewer(data_dir, features: pd.DataFrame, boxes: pd.DataFrame, size: int = 512) -> Viewer:
    """The interactive viewer of 01-explore (the last expression of a cell displays it)."""
    return Viewer(data_dir, features, boxes, size)
