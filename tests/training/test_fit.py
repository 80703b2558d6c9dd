"""Real training runs on tiny synthetic data: run directory, TensorBoard read back, resume."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pneumo.config import TrainConfig
from pneumo.errors import RunError
from pneumo.training.fit import fit, hparam_values
from pneumo.training.rundir import RunDir

TINY = dict(image_size=64, depth=3, width=4, batch_size=8, n_val_images=4)


@pytest.fixture(scope="module")
def finished_run(synth_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    config = TrainConfig(data_dir=str(synth_dir), epochs=2, **TINY)
    return config, fit(config, run_dir), run_dir


@pytest.mark.slow  # trains a real model
def test_run_directory_layout(finished_run):
    config, metrics, run_dir = finished_run
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == config.to_dict()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["status"] == "finished" and saved["epochs_done"] == 2
    assert {"best_val_map", "best_epoch", "threshold", "per_threshold", "wall_time_s",
            "train_images_per_s"} <= set(saved)
    assert len(saved["per_threshold"]) == 8 and len(saved["history"]) == 2
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "val_images").glob("*.png"))) == 4


@pytest.mark.slow  # trains a real model
def test_checkpoint_alone_rebuilds_the_predictor(finished_run):
    config, metrics, run_dir = finished_run
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["config"] == config.to_dict()
    assert ckpt["pneumo"]["threshold"] == metrics["threshold"]
    assert ckpt["pneumo"]["image_size"] == 64 and ckpt["pneumo"]["data_fingerprint"] == metrics["data_fingerprint"]


@pytest.mark.slow  # trains a real model
def test_tensorboard_reader_sees_scalars_hparams_and_images(finished_run):
    _, _, run_dir = finished_run
    # the events in the run directory itself: TensorBoard names the run after it
    assert RunDir(run_dir).events_dir == run_dir and not (run_dir / "tensorboard").exists()
    assert not (run_dir / "hparams.yaml").exists()  # config.yaml holds the parameters
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in ("train/loss", "val/loss", "val/map", "val/map@0.50", "val/map@0.75", "lr", "hp/val_map"):
        assert name in tags["scalars"], name
    assert len(acc.Scalars("val/map")) == 2
    assert "epoch" not in tags["scalars"]  # Lightning's epoch-against-batches card
    # the epoch's figures against the epoch, 1-based as the logs count
    for name in ("epoch/val_map", "epoch/val_loss", "epoch/train_loss", "epoch/lr"):
        assert [e.step for e in acc.Scalars(name)] == [1, 2], name
    assert [e.value for e in acc.Scalars("epoch/val_map")] == \
        pytest.approx([h["val_map"] for h in _history(run_dir)], abs=1e-5)
    assert "val/predictions" in tags["images"] and {e.step for e in acc.Images("val/predictions")} <= {1, 2}
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert set(hparams) == set(TrainConfig.names())
    assert hparams["augment"].string_value == "true" and hparams["classifier"].string_value == "false"
    assert hparams["lr"].number_value == pytest.approx(1e-3)  # lr unset: adamw's default, as trained
    # no experiment per run: the sweep writes one for all its runs (pneumo.sweeps.hparams)
    assert "_hparams_/experiment" not in content


def _history(run_dir) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["history"]


def test_hparams_keep_every_key_with_one_type_per_key():
    adam, sgd = hparam_values(TrainConfig(optimizer="adam")), hparam_values(TrainConfig(optimizer="sgd", lr=0.1))
    assert list(adam) == list(sgd) == TrainConfig.names()
    assert (adam["lr"], sgd["lr"]) == (1e-3, 0.1)
    assert {k: type(v) for k, v in adam.items()} == {k: type(v) for k, v in sgd.items()}
    assert adam["augment"] == "true" and adam["classifier"] == "false"
    assert not [k for k, v in adam.items() if isinstance(v, bool) or v is None]


def test_a_run_started_with_a_tensorboard_folder_keeps_it(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.events_dir == run.path
    (run.path / "tensorboard").mkdir(parents=True)
    assert run.events_dir == run.path / "tensorboard"


def test_the_run_logger_writes_a_session_and_no_experiment(tmp_path):
    from pneumo.training.callbacks import RunLogger

    logger = RunLogger(tmp_path)
    logger.log_session({"optimizer": "adam", "augment": "true"}, {"hp/val_map": 0.0})
    logger.log_metrics({"epoch": 0, "val/map": 0.5}, step=3)
    logger.finalize("success")
    assert logger.log_dir.rstrip("/") == str(tmp_path) and not (tmp_path / "hparams.yaml").exists()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"hp/val_map", "val/map"}
    assert set(acc.PluginTagToContent("hparams")) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}


@pytest.mark.slow  # trains a real model
def test_finished_run_is_never_overwritten(finished_run):
    config, _, run_dir = finished_run
    with pytest.raises(RunError, match="finished run"):
        fit(config, run_dir)


def test_other_parameters_in_an_existing_run_dir_are_refused(synth_dir, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(TrainConfig(epochs=5, **TINY).to_yaml())
    with pytest.raises(RunError, match="other parameters"):
        fit(TrainConfig(data_dir=str(synth_dir), epochs=2, **TINY), tmp_path / "r")


def _train_cmd(synth_dir, run_dir, epochs):
    params = [f"{k}={v}" for k, v in {**TINY, "epochs": epochs}.items()]
    return [sys.executable, "-m", "pneumo", "train", "--data-dir", str(synth_dir), "--out", str(run_dir),
            *[a for p in params for a in ("-p", p)]]


@pytest.mark.slow  # trains a real model
def test_killed_run_resumes_to_the_same_result(synth_dir, tmp_path):
    env = {"PNEUMO_NO_PROGRESS": "1", "PNEUMO_OUTPUTS": str(tmp_path / "outputs"), "PATH": "/usr/bin:/bin"}
    reference = subprocess.run(_train_cmd(synth_dir, tmp_path / "ref", 4), capture_output=True, text=True, env=env)
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert "best val mAP" in reference.stdout and "tensorboard --logdir" in reference.stdout
    # a line per epoch and the device, for a notebook's or a sweep run's output
    assert "training on cpu (" in reference.stdout and "epoch 4/4  train loss " in reference.stdout

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(synth_dir, run_dir, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        status = run_dir / "status.json"
        if (run_dir / "checkpoints" / "last.ckpt").is_file() and status.is_file() and \
                json.loads(status.read_text()).get("epoch", 0) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(_train_cmd(synth_dir, run_dir, 4), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in got["history"]] == [1, 2, 3, 4]
    assert [h["val_map"] for h in got["history"]] == [h["val_map"] for h in ref["history"]]
    assert [h["val_loss"] for h in got["history"]] == pytest.approx([h["val_loss"] for h in ref["history"]], rel=1e-5)


def test_cli_rejects_bad_parameter_in_one_line(synth_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "pneumo", "train", "--data-dir", str(synth_dir), "-p", "lr=-1"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip() == "pneumo: error: lr must be > 0"


@pytest.mark.slow  # trains a real model
def test_diverging_run_raises_a_clear_error(synth_dir, tmp_path):
    from pneumo.errors import TrainingDiverged

    config = TrainConfig(data_dir=str(synth_dir), epochs=2, optimizer="sgd", lr=1e12, scheduler="none", **TINY)
    with pytest.raises(TrainingDiverged, match="lower lr"):
        fit(config, tmp_path / "div")
    assert json.loads((tmp_path / "div" / "status.json").read_text())["state"] == "failed"
    # on the command line a diverging run is one line naming the fix, not a traceback
    cmd = [*_train_cmd(synth_dir, tmp_path / "div-cli", 2), "-p", "optimizer=sgd", "-p", "lr=1e12",
           "-p", "scheduler=none"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pneumo: error: training diverged") and "lower lr" in last


@pytest.mark.slow  # trains a real model
def test_truncated_last_checkpoint_falls_back_to_best(finished_run, tmp_path):
    import shutil

    from pneumo.training.fit import _resumable_checkpoint

    _, _, run_dir = finished_run
    copy = RunDir(tmp_path / "run")
    folder = copy.checkpoints
    shutil.copytree(run_dir / "checkpoints", folder)
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # killed while Lightning was writing it
    assert _resumable_checkpoint(copy) == folder / "best.ckpt"
    assert (folder / "last.ckpt.unreadable").is_file() and not last.exists()
    (folder / "best.ckpt").write_bytes(b"")
    assert _resumable_checkpoint(copy) is None
