"""TrainConfig.ema: Lightning's EMA of the weights in a real run; the checkpoint predict loads holds the average."""

import pytest
import torch

from pneumo.config import TrainConfig


@pytest.mark.slow
def test_an_ema_run_checkpoints_the_average_and_predict_uses_it(synth_dir, tmp_path):
    from pneumo.deploy.predict import load_predictor
    from pneumo.training.fit import fit

    config = TrainConfig(data_dir=str(synth_dir), epochs=2, image_size=64, depth=3, width=4, batch_size=8,
                         n_val_images=0, ema=0.9)
    metrics = fit(config, tmp_path / "run")
    assert metrics["status"] == "finished" and metrics["epochs_done"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    average, raw = ckpt["state_dict"], ckpt["current_model_state"]
    key = "net.heads.mask.conv.weight"
    assert not torch.equal(average[key], raw[key])  # the average is not the last step's weights
    predictor = load_predictor(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert torch.equal(predictor.net.heads.mask.conv.weight, average[key])


def test_ema_is_a_decay():
    from pneumo.errors import ConfigError

    with pytest.raises(ConfigError, match="ema must be in"):
        TrainConfig(ema=1.0)
