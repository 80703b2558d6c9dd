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
    ("epochs=0", "epochs must be in 1..100000"),
    ("lr=.inf", "lr must be a finite number, not inf"),
    ("weight_decay=.nan", "weight_decay must be a finite number"),
    ("width=100000", "width must be in 2..256"),
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


# ~600 bytes that stand for 10^9 strings: loading is cheap (anchors share one list), formatting is not
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("where", ["lr", "optimizer", "unknown_key"])
def test_billion_laughs_params_file_is_refused_before_it_is_formatted(tmp_path, where):
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS + f"{where}: *i\n")
    assert len(path.read_bytes()) < 700
    with pytest.raises(ConfigError, match="more than 20000 values .*anchors") as info:
        load_config(path)
    assert len(str(info.value)) < 300


def test_deep_nesting_and_anchored_overrides_are_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("lr: " + "[" * 40 + "]" * 40 + "\n")
    with pytest.raises(ConfigError, match="levels of nesting"):
        load_config(path)
    with pytest.raises(ConfigError, match="-p value.*more than 20000 values"):
        parse_overrides(["lr=" + BILLION_LAUGHS.replace("\n", ", ").join("{}")])


def test_a_long_value_is_quoted_short(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("lr: " + "x" * 1_000_000 + "\n")
    with pytest.raises(ConfigError, match=r"lr must be float or null, not 'x+\.\.\.") as info:
        load_config(path)
    assert len(str(info.value)) < 200
