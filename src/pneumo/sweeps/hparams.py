"""TensorBoard's HParams for a sweep: the experiment summary in the sweep's runs root
(outputs/runs/<sweep>/), so that TensorBoard opened there (or on outputs/) lists the swept
parameters first, with their domains, then the val mAP metrics.

Each run logs its own HParams session, its values as pneumo.training.fit.hparam_values shows them
(pneumo.training.callbacks.RunLogger); this module says which of them the sweep varies. Without an
experiment TensorBoard builds one from the sessions, every parameter alike, sorted by name.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pneumo.config import TrainConfig
from pneumo.training.fit import hparam_values

log = logging.getLogger(__name__)

# tag -> display name; hp/val_map is the best epoch's (OpacityModule), epoch/ the last epoch's (RunRecorder)
METRICS = {"hp/val_map": "best val mAP", "epoch/val_map": "val mAP (last epoch)",
           "epoch/val_loss": "val loss (last epoch)"}
SUFFIX = ".pneumo-hparams"  # this module's event files: each write replaces the one before


def write_experiment(runs_root, swept: dict, constant: dict, metrics: dict | None = None) -> Path:
    """Write the HParams experiment into runs_root, replacing an earlier one; returns its event file.

    swept: name -> a list of values (a discrete domain) or a (low, high) tuple (an interval), marked
    as differing, which TensorBoard lists first. constant: name -> the value every run has, given
    without a domain (a run with another value, the marathon's epochs, is not filtered out).
    metrics: tag -> display name, METRICS by default.
    """
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    infos = [_swept_info(name, domain) for name, domain in swept.items()]
    infos += [_constant_info(name, value) for name, value in constant.items() if name not in swept]
    metric_infos = [hp.Metric(tag, display_name=shown).as_proto() for tag, shown in (metrics or METRICS).items()]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos, time_created_secs=time.time())
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=metadata.EXPERIMENT_TAG, tensor=metadata.NULL_TENSOR,
        metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(experiment=experiment)))])
    root = Path(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    # TensorBoard keeps the first experiment a run holds: the earlier one goes
    for earlier in root.glob(f"events.out.tfevents.*{SUFFIX}"):
        earlier.unlink(missing_ok=True)
    writer = EventFileWriter(str(root), filename_suffix=SUFFIX)
    writer.add_event(event_pb2.Event(wall_time=time.time(), summary=summary))
    writer.close()
    return max(root.glob(f"events.out.tfevents.*{SUFFIX}"))


def _shown(value):
    """A value as the runs' sessions hold it (hparam_values): booleans "true"/"false", None "default"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "default" if value is None else value


def _swept_info(name: str, domain):
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp

    info = api_pb2.HParamInfo(name=name, differs=True, description="swept")
    if isinstance(domain, tuple):
        hp.RealInterval(float(domain[0]), float(domain[1])).update_hparam_info(info)
        return info
    values = [_shown(v) for v in domain]
    if all(isinstance(v, (int, float)) for v in values):
        hp.Discrete(sorted({float(v) for v in values}), dtype=float).update_hparam_info(info)
    else:
        hp.Discrete(sorted({str(v) for v in values}), dtype=str).update_hparam_info(info)
    return info


def _constant_info(name: str, value):
    from tensorboard.plugins.hparams import api_pb2

    value = _shown(value)
    kind = api_pb2.DATA_TYPE_FLOAT64 if isinstance(value, (int, float)) else api_pb2.DATA_TYPE_STRING
    return api_pb2.HParamInfo(name=name, type=kind, description=f"the same in every run: {value}")


def _values(params: dict) -> dict:
    """hparam_values of a run's parameters (a sweep's run entries may also hold notebook-only keys)."""
    return hparam_values(TrainConfig.from_dict({k: v for k, v in params.items() if k in TrainConfig.names()}))


def sweep_experiment(spec) -> tuple[dict, dict]:
    """(swept, constant) of a sweep (pneumo.sweeps.sweep.Sweep), as write_experiment takes them.

    A search sweeps its space (choices: a discrete domain, ranges: an interval); a list or grid the
    parameters whose values differ between its runs (a one-run sweep: its own entry's).
    """
    if spec.search is not None:
        base = _values(spec.base)
        swept = {name: [_values({**spec.base, name: c})[name] for c in s["choices"]]
                 if s["kind"] == "categorical" else (s["low"], s["high"]) for name, s in spec.search.space.items()}
    else:
        runs = [_values(run.params) for run in spec.runs]
        base = runs[0]
        own = {k for k in spec.runs[0].params if k not in spec.base} if len(runs) == 1 else set()
        swept = {k: [r[k] for r in runs] for k in base if k in own or len({repr(r[k]) for r in runs}) > 1}
    for name, value in (spec.marathon or {}).items():  # the marathon's value is in the domain too
        if name in swept and value is not None:
            domain = swept[name]
            swept[name] = (min(domain[0], value), max(domain[1], value)) if isinstance(domain, tuple) \
                else [*domain, value]
    return swept, {k: v for k, v in base.items() if k not in swept}


def write_sweep_experiment(spec, runs_root) -> None:
    """write_experiment for a sweep; TensorBoard's view only: a failure is a warning, never the sweep's end."""
    try:
        if spec.search is None and not spec.runs:
            return
        write_experiment(runs_root, *sweep_experiment(spec))
    except Exception as exc:  # an unwritable folder, an odd value: the runs train all the same
        log.warning("%s: TensorBoard's HParams experiment not written (%s: %s)", runs_root, type(exc).__name__, exc)
