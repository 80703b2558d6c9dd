"""Annotated images with Pillow: ground truth in green, predictions in red with confidences.

Line width and label size scale with the image so the drawing stays legible at 1024 px.
"""

from __future__ import annotations

import numpy as np

GT_COLOUR = (40, 220, 90)
PRED_COLOUR = (255, 60, 40)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def annotate(image: np.ndarray, pred_boxes=(), confidences=(), gt_boxes=()) -> Image.Image:  # noqa: F821
    """An RGB Pillow image of a uint8 grey image with boxes in its own pixel frame."""
    from PIL import Image, ImageDraw

    from pneumo.boxes import as_boxes

    rgb = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(rgb)
    side = max(image.shape)
    line = max(1, round(side / 256))
    font = _font(max(10, round(side / 40)))
    for x, y, w, h in as_boxes(gt_boxes):
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=GT_COLOUR, width=line)
    for (x, y, w, h), c in zip(as_boxes(pred_boxes), confidences):
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=PRED_COLOUR, width=line)
        label = f"{c:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        ty = y - (bottom - top) - 2 * line if y - (bottom - top) - 2 * line >= 0 else y + line
        draw.rectangle([x, ty, x + right - left + 2 * line, ty + bottom - top + 2 * line], fill=PRED_COLOUR)
        draw.text((x + line - left, ty + line - top), label, fill=(255, 255, 255), font=font)
    return rgb
