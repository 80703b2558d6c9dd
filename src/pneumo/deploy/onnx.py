"""The network as ONNX (model.onnx beside model.ckpt), to run without pneumo or torch.

Inputs: `image` (batch, 1, S, S) float32 grey levels in [0, 1] at the model's image size S, and,
for a classifier with metadata, `metadata` (batch, 3): [view is AP, sex is M, age / 100], unknown
values 0.5 (pneumo.data.metadata). Outputs (the heads' declared names, pneumo.models.heads):
`mask` (batch, 1, S, S) opacity logits, then `classes` (batch, 3) class logits with a classifier,
then `centre` (batch, 5, S/4, S/4) with the centre head. The batch axis is dynamic. The model's
post-processing (pneumo.models.postprocess) and image size are stored in the file's metadata
(`pneumo.postprocess`, `pneumo.image_size`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from pneumo.io import atomic_write_bytes

ONNX_FILE = "model.onnx"
OPSET = 18


def _tuple_module(net):
    """The network with plain tuple outputs in its declared order (ONNX has no dict outputs)."""
    import torch

    class TupleOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, image, metadata=None):
            outputs = self.net(image, metadata)
            return tuple(outputs[name] for name in self.net.output_names)

    return TupleOutputs().eval()


def export_onnx(predictor, path) -> Path:
    """Write predictor's network to path as ONNX (atomically: a temporary sibling, then rename)."""
    import onnx
    import torch

    config, path = predictor.config, Path(path)
    inputs, outputs = predictor.heads.input_names, predictor.heads.output_names
    size = config.image_size
    example = (torch.zeros(2, 1, size, size),) + ((torch.full((2, 3), 0.5),) if len(inputs) == 2 else ())
    module = _tuple_module(predictor.net).to("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        # the TorchScript-based exporter: the dynamo one needs onnxscript, one more dependency for
        # a plain convolutional network that this exporter handles
        torch.onnx.export(module, example, f"{tmp}/net.onnx", input_names=inputs, output_names=outputs,
                          opset_version=OPSET, dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
                          dynamo=False)
        model = onnx.load(f"{tmp}/net.onnx")
    for key, value in (("pneumo.postprocess", json.dumps(predictor.settings.to_dict())),
                       ("pneumo.image_size", str(size)), ("pneumo.model", predictor.name)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())
    predictor.net.to(predictor.device)
    return path


class OnnxNet:
    """An onnxruntime session that answers like the network: (images, metadata) -> named outputs.

    `dataclasses.replace(predictor, net=OnnxNet(path))` predicts through the ONNX file with the
    same pre- and post-processing as the checkpoint, which is how the tests compare the two.
    """

    def __init__(self, path, providers=("CPUExecutionProvider",)):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=list(providers))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def metadata(self) -> dict:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, images, metadata=None):
        import torch

        feed = {"image": images.detach().cpu().numpy().astype(np.float32)}
        if "metadata" in self.inputs:
            feed["metadata"] = metadata.detach().cpu().numpy().astype(np.float32)
        result = dict(zip(self.outputs, self.session.run(self.outputs, feed)))
        return {k: torch.from_numpy(v).to(images.device) for k, v in result.items()}
