import pytest
import torch

from pneumo.models.unet import N_CLASSES, UNet, metadata_vector, opacity_probability


def test_unet_shapes_and_gradients_without_lightning():
    net = UNet(width=4, depth=3)
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    out = net(x)
    assert out.mask.shape == (2, 1, 64, 64) and out.classes is None
    out.mask.mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())


def test_classifier_head_uses_image_and_metadata():
    net = UNet(width=4, depth=3, classifier=True, metadata=True).eval()
    x = torch.rand(2, 1, 64, 64)
    meta = torch.tensor([metadata_vector("AP", "M", "51"), metadata_vector("PA", "F", 30)])
    out = net(x, meta)
    assert out.mask.shape == (2, 1, 64, 64) and out.classes.shape == (2, N_CLASSES)
    p = opacity_probability(out.classes)
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    assert not torch.equal(net(x, meta.flip(0)).classes, out.classes)  # the metadata reaches the head
    with pytest.raises(ValueError, match="metadata"):
        net(x)


def test_metadata_vector_reads_rsna_and_standard_values():
    assert metadata_vector("AP", "M", "51") == [1.0, 1.0, 0.51]
    assert metadata_vector("PA", "F", 7.0) == [0.0, 0.0, 0.07]
    assert metadata_vector("", None, "garbled") == [0.5, 0.5, 0.5]  # unknown is neutral, not an error
    assert metadata_vector("LL", "O", 400) == [0.5, 0.5, 0.5]


def test_width_and_depth_change_capacity():
    small = sum(p.numel() for p in UNet(4, 2).parameters())
    big = sum(p.numel() for p in UNet(8, 4).parameters())
    assert big > 10 * small


def test_channels_last_net_computes_what_the_plain_layout_computes():
    torch.manual_seed(0)
    net = UNet(width=4, depth=2, classifier=True, metadata=False).eval()
    assert net.inc[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = UNet(width=4, depth=2, classifier=True, metadata=False).eval()
    plain.load_state_dict(net.state_dict())  # a checkpoint loads into the channels-last net and back
    plain.to(memory_format=torch.contiguous_format)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        a, b = net(x), plain.forward(x)
    assert torch.allclose(a.mask, b.mask, atol=1e-5) and torch.allclose(a.classes, b.classes, atol=1e-5)
