import json

import pytest

from pneumo.config import TrainConfig, load_config, parse_overrides
from pneumo.errors import ConfigError
from pneumo.optimizers import OPTIMIZERS


def test_defaults_are_valid_and_round_trip(tmp_path):
    c = TrainConfig()
    assert TrainConfig.from_dict(c.to_dict()) == c
    path = tmp_path / "c.yaml"
    path.write_text(c.to_yaml())
    assert load_config(path) == c
    assert TrainConfig.from_dict(json.loads(c.to_json())) == c
    assert c.learning_rate == OPTIMIZERS["adamw"].default_lr


def test_layering_defaults_file_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("optimizer: sgd\nlr: 0.05\nepochs: 3\n")
    c = load_config(path, ["lr=1e-2", "augment=false"])
    assert (c.optimizer, c.lr, c.epochs, c.augment) == ("sgd", 0.01, 3, False)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown parameter.*lrr.*valid: data_dir, optimizer, lr"):
        load_config(overrides=["lrr=0.1"])


@pytest.mark.parametrize("item,message", [
    ("epochs=1.5", "epochs must be int"),
    ("lr=-1", "lr must be > 0"),
    ("lr=fast", "lr must be float or null"),
    ("optimizer=lion", "optimizer must be one of"),
    ("augment=3", "augment must be bool"),
    ("epochs=0", "epochs must be >= 1"),
])
def test_wrong_types_and_ranges_are_refused(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[item])


def test_override_syntax():
    assert parse_overrides(["a=1", "b=1e-3", "c=null", "d=adam", "e=true"]) == {
        "a": 1, "b": 0.001, "c": None, "d": "adam", "e": True}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_params_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
