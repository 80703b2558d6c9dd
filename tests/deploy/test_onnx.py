"""The ONNX network gives the checkpoint's boxes (onnxruntime on the CPU)."""

import dataclasses

import numpy as np
import pytest
import torch

from pneumo.config import TrainConfig
from pneumo.data.layout import decode_file
from pneumo.deploy.onnx import OnnxNet, export_onnx
from pneumo.deploy.predict import Predictor, load_predictor
from pneumo.models.net import build_net
from pneumo.models.postprocess import PostProcess


def _decoded(synth_dir, size):
    items = [decode_file(p, size) for p in sorted((synth_dir / "stage_2_test_images").glob("*.dcm"))]
    return np.stack([i.image for i in items]), [i.meta for i in items], [i.shape for i in items]


def _same_boxes(predictor, path, synth_dir):
    portable = dataclasses.replace(predictor, net=OnnxNet(path))
    images, metas, shapes = _decoded(synth_dir, predictor.image_size)
    n_boxes = 0
    for batch in (slice(0, 1), slice(1, None)):  # the batch axis is dynamic
        ref, ref_opacity = predictor.outputs(images[batch], metas[batch])
        got, got_opacity = portable.outputs(images[batch], metas[batch])
        if ref_opacity is not None:
            np.testing.assert_allclose(got_opacity, ref_opacity, atol=1e-5)
        for i, shape in enumerate(shapes[batch]):
            a = predictor.boxes(ref[i], *shape, None if ref_opacity is None else float(ref_opacity[i]))
            b = predictor.boxes(got[i], *shape, None if got_opacity is None else float(got_opacity[i]))
            np.testing.assert_allclose(b[0], a[0], atol=0.5)
            np.testing.assert_allclose(b[1], a[1], atol=1e-4)
            n_boxes += len(a[0])
    return n_boxes


@pytest.mark.parametrize("head,classifier,metadata", [("mask", False, False), ("centre", True, True)])
def test_untrained_networks_of_each_kind(synth_dir, tmp_path, head, classifier, metadata):
    torch.manual_seed(0)
    config = TrainConfig(image_size=64, depth=3, width=4, head=head, classifier=classifier, metadata=metadata)
    net = build_net(config).eval()
    predictor = Predictor(net, config, PostProcess(threshold=0.05, min_box_area=0.0), "untrained", torch.device("cpu"))
    path = export_onnx(predictor, tmp_path / "model.onnx")
    assert OnnxNet(path).metadata()["pneumo.image_size"] == "64"
    assert _same_boxes(predictor, path, synth_dir) > 0


@pytest.mark.slow
def test_trained_checkpoint(tiny_run, synth_dir, tmp_path):
    predictor = load_predictor(tiny_run)
    predictor = dataclasses.replace(predictor, settings=dataclasses.replace(predictor.settings, threshold=0.05,
                                                                            min_box_area=0.0, gate=0.0))
    path = export_onnx(predictor, tmp_path / "model.onnx")
    assert _same_boxes(predictor, path, synth_dir) > 0
