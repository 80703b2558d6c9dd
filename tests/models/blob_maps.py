"""Probability maps with known blobs, for the post-processing and scoring tests."""

import numpy as np


def blob_map(boxes_px, size=64, frame=1024, level=0.9, noise=0.05, seed=0):
    """A probability map with a bright blob on each box (boxes in the frame's pixels)."""
    rng = np.random.default_rng(seed)
    prob = rng.random((size, size)) * noise
    f = size / frame
    for x, y, w, h in boxes_px:
        prob[int(y * f):int((y + h) * f), int(x * f):int((x + w) * f)] = level
    return prob.astype(np.float32)
