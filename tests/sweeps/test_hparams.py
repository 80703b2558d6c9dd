"""pneumo.sweeps.hparams: a sweep's HParams experiment, read back as TensorBoard reads it."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from pneumo.config import TrainConfig
from pneumo.sweeps.hparams import SUFFIX, sweep_experiment, write_experiment, write_sweep_experiment
from pneumo.sweeps.study import SearchSpec
from pneumo.sweeps.sweep import Run, Sweep


def _sweep(entries: list[dict], base: dict | None = None, marathon: dict | None = None, search=None) -> Sweep:
    base = dict(base or {"epochs": 2})
    runs = [Run(f"{i:02d}", {**base, **entry}) for i, entry in enumerate(entries, 1)]
    return Sweep("t", Path("nb.ipynb"), base, runs, dict(marathon or {}), search)


def _experiment(runs_root) -> api_pb2.Experiment:
    acc = EventAccumulator(str(runs_root))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    return plugin_data_pb2.HParamsPluginData.FromString(content).experiment


def test_swept_are_the_parameters_that_differ_between_runs_as_the_runs_log_them():
    swept, constant = sweep_experiment(_sweep([{"optimizer": "adam", "augment": False},
                                               {"optimizer": "sgd", "augment": True}], marathon={"epochs": 20}))
    # lr unset: each optimizer's default, the learning rate the runs trained with
    assert swept == {"optimizer": ["adam", "sgd"], "lr": [1e-3, 3e-2], "augment": ["false", "true"]}
    assert set(swept) | set(constant) == set(TrainConfig.names()) and not set(swept) & set(constant)
    assert constant["epochs"] == 2 and constant["classifier"] == "false"  # booleans as the runs log them


def test_a_one_run_sweep_sweeps_its_own_entry_and_the_marathon_value_joins_the_domain():
    swept, _ = sweep_experiment(_sweep([{"lr": 0.01}], marathon={"lr": 0.002}))
    assert swept == {"lr": [0.01, 0.002]}


def test_a_search_sweeps_its_space():
    space = {"optimizer": {"choices": ["adam", "sgd"], "kind": "categorical"},
             "lr": {"low": 1e-4, "high": 1e-2, "log": True, "kind": "float"},
             "classifier": {"choices": [True, False], "kind": "categorical"}}
    swept, constant = sweep_experiment(_sweep([], search=SearchSpec(space)))
    assert swept == {"optimizer": ["adam", "sgd"], "lr": (1e-4, 1e-2), "classifier": ["true", "false"]}
    assert "optimizer" not in constant and constant["epochs"] == 2


def test_the_experiment_lists_the_swept_parameters_first_with_their_domains(tmp_path):
    first = write_experiment(tmp_path, {"optimizer": ["sgd", "adam"], "lr": (1e-4, 0.1)}, {"optimizer": "x"})
    path = write_experiment(tmp_path, {"optimizer": ["sgd", "adam"], "lr": (1e-4, 0.1), "batch_size": [8, 16.0]},
                            {"epochs": 2, "augment": "true", "optimizer": "ignored: swept"})
    assert not first.exists() and list(tmp_path.iterdir()) == [path] and path.name.endswith(SUFFIX)
    infos = {i.name: i for i in _experiment(tmp_path).hparam_infos}
    assert list(infos) == ["optimizer", "lr", "batch_size", "epochs", "augment"]
    assert [i.differs for i in infos.values()] == [True, True, True, False, False]
    assert [v.string_value for v in infos["optimizer"].domain_discrete.values] == ["adam", "sgd"]
    assert (infos["lr"].domain_interval.min_value, infos["lr"].domain_interval.max_value) == (1e-4, 0.1)
    assert [v.number_value for v in infos["batch_size"].domain_discrete.values] == [8.0, 16.0]
    # constants: a type and no domain, so the marathon's other epochs is never filtered out
    assert infos["epochs"].type == api_pb2.DATA_TYPE_FLOAT64 and infos["epochs"].WhichOneof("domain") is None
    assert infos["augment"].type == api_pb2.DATA_TYPE_STRING
    metrics = [(m.name.tag, m.display_name) for m in _experiment(tmp_path).metric_infos]
    assert metrics[0] == ("hp/val_map", "best val mAP") and ("epoch/val_map", "val mAP (last epoch)") in metrics


def test_a_failure_to_write_is_a_warning(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("")
    write_sweep_experiment(_sweep([{"optimizer": "adam"}, {"optimizer": "sgd"}]), blocked)
    assert "HParams experiment not written" in caplog.text


# ---------------------------------------------------------------- TensorBoard's own HTTP API


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()  # a POST, as TensorBoard's page sends it
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_for_runs(url: str, names: set, server, log: Path) -> list:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            runs = _get(f"{url}/data/runs")
            if names <= set(runs):
                return runs
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"TensorBoard did not list {names}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def swept_runs(synth_dir, tmp_path_factory):
    """Two tiny runs that differ by optimizer, and the sweep's experiment, in one runs root."""
    from pneumo.training.fit import fit

    root = tmp_path_factory.mktemp("runs") / "optimizers"
    tiny = dict(data_dir=str(synth_dir), epochs=2, image_size=64, depth=3, width=4, batch_size=8, n_val_images=2)
    spec = _sweep([{"optimizer": "adam"}, {"optimizer": "sgd"}], base=tiny)
    for run in spec.runs:
        fit(TrainConfig.from_dict(run.params), root / run.name)
    write_sweep_experiment(spec, root)
    return root, spec


@pytest.fixture(scope="module")
def tensorboard(swept_runs, tmp_path_factory):
    """TensorBoard (the installed one, in a process of its own) on the swept runs: its base URL."""
    root, _ = swept_runs
    port, log = _free_port(), tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--port", str(port),
                                   "--host", "127.0.0.1", "--load_fast=false", "--reload_interval", "1"],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_runs(url, {"01", "02"}, server, log)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow  # trains two real runs and starts TensorBoard
def test_tensorboard_opens_on_what_was_swept(tensorboard):
    url = tensorboard
    runs = _get(f"{url}/data/runs")
    assert not [r for r in runs if r.endswith("tensorboard")], runs  # a run is named after its directory
    experiment = _get(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
    infos = experiment["hparamInfos"]
    assert [i["name"] for i in infos[:2]] == ["lr", "optimizer"] and all(i.get("differs") for i in infos[:2])
    assert not any(i.get("differs") for i in infos[2:])
    assert infos[1]["domainDiscrete"] == ["adam", "sgd"] and infos[0]["domainDiscrete"] == [0.001, 0.03]
    assert experiment["metricInfos"][0]["name"]["tag"] == "hp/val_map"
    groups = _get(f"{url}/data/plugin/hparams/session_groups",
                  {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
                   "colParams": [{"hparam": "optimizer"}, {"hparam": "augment"}], "startIndex": 0,
                   "sliceSize": 10})
    shown = {g["name"]: {k: g["hparams"][k] for k in ("optimizer", "lr", "augment")}
             for g in groups["sessionGroups"]}
    assert shown == {"01": {"optimizer": "adam", "lr": 0.001, "augment": "true"},
                     "02": {"optimizer": "sgd", "lr": 0.03, "augment": "true"}}  # a boolean reads "true"
    scalars = _get(f"{url}/data/plugin/scalars/scalars?run=01&tag=epoch/val_map")
    assert [step for _, step, _ in scalars] == [1, 2]  # against epochs, not batches
    print(json.dumps({"runs": runs, "experiment": experiment, "session_groups": groups}, indent=1))


SCREENS = Path(__file__).resolve().parents[2] / "outputs" / "tensorboard-screens"


@pytest.mark.slow
def test_tensorboard_in_a_browser_shows_the_comparison(tensorboard, browser):
    """What a person sees on opening TensorBoard on a sweep: HParams' table with the swept
    parameters (optimizer, lr) as its first columns beside best val mAP, and the headline scalars.
    Screenshots in outputs/tensorboard-screens/."""
    SCREENS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1800, "height": 900})  # wide enough for the metric columns
    try:
        page.goto(f"{tensorboard}/#hparams")
        page.get_by_text("adam", exact=True).first.wait_for(timeout=60_000)  # a row of the table view
        columns = [h.strip() for h in page.locator(".table-header").all_inner_texts()]
        assert columns[:4] == ["Trial ID", "Show Metrics", "lr", "optimizer"], columns
        assert "best val mAP" in columns, columns
        assert page.get_by_text("sgd", exact=True).first.is_visible()  # both runs are rows
        page.screenshot(path=SCREENS / "hparams.png", full_page=True)
        page.goto(f"{tensorboard}/#scalars")
        page.get_by_text("epoch/val_map").first.wait_for(timeout=60_000)
        page.wait_for_timeout(2000)  # let the charts draw their lines
        page.screenshot(path=SCREENS / "scalars.png", full_page=True)
    finally:
        page.close()
