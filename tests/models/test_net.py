"""pneumo.models.net: networks built from a config through the parts' registries, without Lightning."""

import pytest
import torch

from pneumo.config import TrainConfig
from pneumo.data.metadata import metadata_vector
from pneumo.errors import ConfigError
from pneumo.models.heads import HEADS
from pneumo.models.heads.classifier import N_CLASSES, opacity_probability
from pneumo.models.net import build_net, check_config, load_weights


def _config(**values):
    return TrainConfig(**{"width": 4, "depth": 3, "image_size": 64, **values})


def test_unet_shapes_and_gradients():
    net = build_net(_config())
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    out = net(x)
    assert list(out) == ["mask"] and out["mask"].shape == (2, 1, 64, 64)
    out["mask"].mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())


def test_classifier_head_uses_image_and_metadata():
    net = build_net(_config(classifier=True, metadata=True)).eval()
    x = torch.rand(2, 1, 64, 64)
    meta = torch.tensor([metadata_vector("AP", "M", "51"), metadata_vector("PA", "F", 30)])
    out = net(x, meta)
    assert out["mask"].shape == (2, 1, 64, 64) and out["classes"].shape == (2, N_CLASSES)
    p = net.opacity(out)
    assert torch.equal(p, opacity_probability(out["classes"])) and ((p > 0) & (p < 1)).all()
    assert not torch.equal(net(x, meta.flip(0))["classes"], out["classes"])  # the metadata reaches the head
    with pytest.raises(ValueError, match="metadata"):
        net(x)


@pytest.mark.parametrize(("values", "outputs", "inputs", "targets"), [
    ({}, ["mask"], ["image"], "union"),
    ({"head": "centre"}, ["mask", "centre"], ["image"], "per_box"),
    ({"head": "centre", "classifier": True}, ["mask", "centre", "classes"], ["image", "metadata"], "per_box"),
    ({"classifier": True, "metadata": False}, ["mask", "classes"], ["image"], "union"),
    ({"head": "fcos", "depth": 5}, ["fcos_s8", "fcos_s16"], ["image"], "per_box"),
])
def test_the_network_declares_what_its_heads_declare(values, outputs, inputs, targets):
    net = build_net(_config(**values))
    assert net.output_names == outputs and net.input_names == inputs and net.box_targets == targets
    out = net(torch.rand(1, 1, 64, 64), torch.full((1, 3), 0.5))
    assert list(out) == outputs
    decoded = net.decode(out)
    assert len(decoded) == 1


@pytest.mark.parametrize(("values", "message"), [
    ({"head": "centres"}, "unknown head 'centres'; one of: .*centre"),
    ({"head": "classifier"}, "head 'classifier' decodes no boxes"),
    ({"encoder": "resnet9000"}, "unknown encoder 'resnet9000'"),
    ({"head": "centre", "depth": 2, "image_size": 64}, "head centre reads the decoder at 1/4"),
    ({"depth": 4, "image_size": 72}, "image_size must be divisible by 16"),
])
def test_parts_refuse_configs_in_one_line(values, message):
    with pytest.raises(ConfigError, match=message):
        check_config(_config(**values))


def test_every_registered_box_head_builds_trains_and_decodes():
    """The contract, for every head: its outputs appear, its loss backpropagates, it decodes."""
    for name in HEADS.names():
        if not HEADS.get(name).decodes_boxes:
            continue
        net = build_net(_config(head=name, classifier=True, depth=5))  # deep enough for every head
        batch = {"masks": torch.zeros(2, 2, 64, 64), "classes": torch.tensor([0, 2])}
        batch["masks"][0, 0, 10:30, 10:40] = 1
        out = net(torch.rand(2, 1, 64, 64), torch.full((2, 3), 0.5))
        loss = net.loss(out, batch)
        loss.backward()
        assert torch.isfinite(loss) and len(net.decode(out)) == 2, name


def test_width_and_depth_change_capacity():
    small = sum(p.numel() for p in build_net(_config(width=4, depth=2)).parameters())
    big = sum(p.numel() for p in build_net(_config(width=8, depth=4)).parameters())
    assert big > 10 * small


def test_checkpoints_of_the_single_module_unet_load():
    """pneumo 0.x saved the UNet as one module (inc., down., up., dec., head., centre., classifier.)."""
    net = build_net(_config(head="centre", classifier=True))
    legacy = {}
    renames = {"encoder.inc.": "inc.", "encoder.down.": "down.", "decoder.up.": "up.", "decoder.dec.": "dec.",
               "heads.mask.conv.": "head.", "heads.centre.layers.": "centre.",
               "heads.classifier.layers.": "classifier."}
    for key, value in net.state_dict().items():
        new = next(old + key[len(prefix):] for prefix, old in renames.items() if key.startswith(prefix))
        legacy[new] = value + 1
    load_weights(net, legacy)
    assert torch.equal(net.heads.mask.conv.bias, legacy["head.bias"])


def test_channels_last_net_computes_what_the_plain_layout_computes():
    torch.manual_seed(0)
    net = build_net(_config(depth=2, image_size=32, classifier=True, metadata=False)).eval()
    assert net.encoder.inc[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = build_net(_config(depth=2, image_size=32, classifier=True, metadata=False)).eval()
    plain.load_state_dict(net.state_dict())  # a checkpoint loads into the channels-last net and back
    plain.to(memory_format=torch.contiguous_format)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        a, b = net(x), plain(x)
    assert torch.allclose(a["mask"], b["mask"], atol=1e-5) and torch.allclose(a["classes"], b["classes"], atol=1e-5)
