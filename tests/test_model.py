import torch

from pneumo.model import UNet


def test_unet_shapes_and_gradients_without_lightning():
    net = UNet(width=4, depth=3)
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 1, 64, 64)
    y.mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())


def test_width_and_depth_change_capacity():
    small = sum(p.numel() for p in UNet(4, 2).parameters())
    big = sum(p.numel() for p in UNet(8, 4).parameters())
    assert big > 10 * small
