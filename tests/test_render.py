"""pneumo.render: boxes drawn on a palette image that keeps the grey levels."""

import numpy as np
from PIL import Image

from pneumo.data.layout import decode_file, dicom_files, layout
from pneumo.io import atomic_save_image
from pneumo.render import GT_COLOUR, PRED_COLOUR, annotate

GREY = 100


def _rgb(image):
    return np.asarray(image.convert("RGB"))


def test_boxes_are_drawn_in_their_colours_and_nothing_else_changes():
    image = np.full((128, 128), GREY, np.uint8)
    drawn = annotate(image, pred_boxes=[[70, 70, 40, 40]], confidences=[0.87], gt_boxes=[[10, 10, 30, 20]])
    assert drawn.mode == "P" and drawn.size == (128, 128)
    rgb = _rgb(drawn)
    assert tuple(rgb[20, 10]) == GT_COLOUR and tuple(rgb[10, 25]) == GT_COLOUR  # left and top edges
    assert tuple(rgb[29, 39]) == GT_COLOUR  # bottom-right corner pixel: x + w - 1, y + h - 1
    assert tuple(rgb[90, 70]) == PRED_COLOUR and tuple(rgb[109, 109]) == PRED_COLOUR
    assert tuple(rgb[20, 25]) == (GREY, GREY, GREY)  # inside the outline: the image, not a fill
    assert tuple(rgb[30, 40]) == (GREY, GREY, GREY)  # just outside the box
    label = rgb[50:70, 70:110]  # the confidence label sits above the prediction box
    assert (label == PRED_COLOUR).all(axis=-1).any() and (label == 255).all(axis=-1).any()
    untouched = np.ones((128, 128), bool)
    untouched[8:42, 8:42] = untouched[45:112, 68:112] = False
    assert (rgb[untouched] == GREY).all()


def test_without_boxes_the_grey_levels_survive_the_palette():
    gradient = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    back = _rgb(annotate(gradient))[..., 0].astype(int)
    assert np.abs(back - gradient).max() <= 1  # 250 palette greys: at most one level off


def test_line_width_scales_with_the_image():
    image = np.full((1024, 1024), GREY, np.uint8)
    rgb = _rgb(annotate(image, gt_boxes=[[100, 100, 300, 300]]))
    row = rgb[250, 95:110]
    assert (row == GT_COLOUR).all(axis=-1).sum() == 4  # 1024 / 256


def test_palette_png_round_trips(synth_dir, tmp_path):
    item = decode_file(dicom_files(layout(synth_dir).train_images)[0], keep_full=True)
    drawn = annotate(item.full, [[20, 30, 60, 50]], [0.5], [[100, 100, 40, 40]])
    atomic_save_image(tmp_path / "a.png", drawn, compress_level=1)
    with Image.open(tmp_path / "a.png") as back:
        assert back.mode == "P" and back.size == (item.full.shape[1], item.full.shape[0])
        assert np.array_equal(np.asarray(back), np.asarray(drawn))
        assert back.getpalette() == drawn.getpalette()


def test_caption_writes_on_a_dark_band_at_the_top_left():
    from pneumo.render import caption

    image = Image.new("RGB", (256, 256), (128, 128, 128))
    caption(image, "No Lung Opacity / Not Normal")
    pixels = np.asarray(image)
    band = pixels[:16, :200]
    assert (band == 0).any() and (band == 255).any()  # black band, white letters
    assert (pixels[40:, :] == 128).all()  # the image below the band untouched
