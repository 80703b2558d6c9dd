"""`search:` sweeps: an Optuna study whose trials are papermill runs of the training notebook.

The spec (distributions per parameter, sampler, pruner, trials) is validated against TrainConfig
and the notebook's parameters cell before anything starts. The study lives in Optuna's RDB
storage (SQLite outputs/sweeps/<name>/study.db by default, any SQLAlchemy URL by --storage): the
sweep asks for trials as slots free up and tells their outcome; each trial's own process reports
its epochs' val/map to the same database and stops when the pruner says so (the TrialReport
callback, given its trial by trial_from_environment). A trial of a killed sweep stops sending
heartbeats; on --resume Optuna fails it as stale and enqueues it again with the same parameters,
and its run continues in the same run directory from its last checkpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
import time
import typing
from dataclasses import dataclass, field

from pneumo.config import TrainConfig
from pneumo.errors import ConfigError, SweepError, shown
from pneumo.limits import MAX_SEARCH_STEPS, MAX_SWEEP_RUNS
from pneumo.paths import absolute
from pneumo.sweeps.storage import (  # noqa: F401 (default_storage, shown_url: the sweep's, through this module)
    GRACE_S,
    HEARTBEAT_S,
    default_storage,
    open_storage,
    original_number,
    shown_url,
)

log = logging.getLogger(__name__)

SEARCH_KEYS = {"params", "trials", "sampler", "pruner", "objective", "seed"}
SAMPLERS = ("tpe", "random")
PRUNERS = {"none": set(), "median": {"n_startup_trials", "n_warmup_steps"},
           "asha": {"min_resource", "reduction_factor", "min_early_stopping_rate"},
           "threshold": {"lower", "n_warmup_steps"}}  # stop any trial whose val/map is below lower
OBJECTIVES = ("val/map",)  # maximised: the official RSNA metric of the validation split
TRIAL_ENV = "PNEUMO_TRIAL"  # how a trial's process finds its study (JSON: storage, study, trial, pruner)


@dataclass(frozen=True)
class SearchSpec:
    space: dict  # parameter -> {"choices": [...]} or {"low", "high", "log", "step"}, with "kind"
    trials: int = 16
    sampler: str = "tpe"
    pruner: dict = field(default_factory=lambda: {"type": "none"})
    objective: str = "val/map"
    seed: int = 0

    def distributions(self) -> dict:
        import optuna.distributions as d

        out = {}
        for name, s in self.space.items():
            if s["kind"] == "categorical":
                out[name] = d.CategoricalDistribution(s["choices"])
            elif s["kind"] == "int":
                out[name] = d.IntDistribution(s["low"], s["high"], log=s.get("log", False), step=s.get("step", 1))
            else:
                out[name] = d.FloatDistribution(s["low"], s["high"], log=s.get("log", False), step=s.get("step"))
        return out


def parse_search(raw, base: dict, allowed: set[str], where: str) -> SearchSpec:
    """The `search:` section, checked before anything runs; SweepError names the key at fault."""
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: search must be a mapping with params:, trials:, sampler:, pruner:")
    unknown = set(raw) - SEARCH_KEYS
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(sorted(SEARCH_KEYS))}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{where}: params: maps each searched parameter to a range or a list of choices")
    trials, seed = raw.get("trials", 16), raw.get("seed", 0)
    if not isinstance(trials, int) or isinstance(trials, bool) or not 1 <= trials <= MAX_SWEEP_RUNS:
        raise SweepError(f"{where}: trials must be a whole number in 1..{MAX_SWEEP_RUNS}, not {shown(trials)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SweepError(f"{where}: seed must be a whole number, not {shown(seed)}")
    sampler = str(raw.get("sampler", "tpe"))
    if sampler not in SAMPLERS:
        raise SweepError(f"{where}: sampler {shown(sampler)}; valid: {', '.join(SAMPLERS)}")
    objective = str(raw.get("objective", "val/map"))
    if objective not in OBJECTIVES:
        raise SweepError(f"{where}: objective {shown(objective)}; valid: {', '.join(OBJECTIVES)} (maximised)")
    space = {name: _parse_distribution(name, spec, base, allowed, f"{where}: params.{name}")
             for name, spec in params.items()}
    return SearchSpec(space, trials, sampler, _parse_pruner(raw.get("pruner", "none"), where), objective, seed)


def _parse_pruner(raw, where: str) -> dict:
    pruner = {"type": raw} if isinstance(raw, str) or raw is None else dict(raw) if isinstance(raw, dict) else None
    if pruner is None or str(pruner.get("type")) not in PRUNERS:
        raise SweepError(f"{where}: pruner must be one of {', '.join(PRUNERS)} "
                         "(or a mapping with type: and its settings)")
    extra = set(pruner) - {"type"} - PRUNERS[pruner["type"]]
    if extra:
        valid = ", ".join(sorted(PRUNERS[pruner["type"]])) or "none"
        raise SweepError(f"{where}: pruner {pruner['type']}: unknown setting(s) {', '.join(sorted(extra))}; "
                         f"valid: {valid}")
    whole = {k: isinstance(v, int) and not isinstance(v, bool) or (k == "lower" and isinstance(v, float))
             for k, v in pruner.items() if k != "type"}
    bad = [k for k, ok in whole.items() if not ok or pruner[k] < 0]
    if bad:
        raise SweepError(f"{where}: pruner {pruner['type']}: {', '.join(bad)} must be whole numbers >= 0 "
                         "(lower: a val/map)")
    return pruner


def _parse_distribution(name: str, spec, base: dict, allowed: set[str], where: str) -> dict:
    """A list (or {choices: [...]}) is categorical; {low, high[, log][, step]} is int or float by
    TrainConfig's type of the parameter. Every end and choice must make a valid TrainConfig."""
    if name not in allowed or name not in TrainConfig.names():
        valid = ", ".join(sorted(allowed & set(TrainConfig.names())))
        raise SweepError(f"{where}: not a parameter of the notebook's parameters cell and TrainConfig; valid: {valid}")
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: give a list of choices or {{low:, high:, log:, step:}}")
    kind = _kind(name, spec, where)
    if kind == "categorical":
        if set(spec) != {"choices"} or not spec["choices"]:
            raise SweepError(f"{where}: choices: must be a non-empty list (and nothing else)")
        if any(not isinstance(c, (str, int, float, bool)) and c is not None for c in spec["choices"]):
            raise SweepError(f"{where}: choices must be plain values (numbers, strings, true/false)")
        if name == "data_dir":  # trials execute in their own run directory
            spec = {"choices": [absolute(c, f"{where}: data_dir") for c in spec["choices"]]}
        values = list(spec["choices"])
    else:
        unknown = set(spec) - {"low", "high", "log", "step"}
        if unknown or not {"low", "high"} <= set(spec):
            raise SweepError(f"{where}: a range is {{low:, high:}} with optional log: and step:")
        low, high, step = spec["low"], spec["high"], spec.get("step")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
        if not numbers or not low < high:
            raise SweepError(f"{where}: low and high must be finite numbers with low < high "
                             f"(got {shown(low)}, {shown(high)})")
        if spec.get("log") and (low <= 0 or step not in (None, 1)):
            raise SweepError(f"{where}: log: true needs low > 0 and no step")
        if step is not None and (not isinstance(step, (int, float)) or isinstance(step, bool) or not step > 0
                                 or (kind == "int" and step != int(step))):
            raise SweepError(f"{where}: step must be a number > 0 (whole for an int parameter)")
        if step is not None and (high - low) / step > MAX_SEARCH_STEPS:
            raise SweepError(f"{where}: step {shown(step)} makes more than {MAX_SEARCH_STEPS} values "
                             "between low and high; leave step out for a continuous range")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise SweepError(f"{where}: {name} is a whole number: low and high must be too")
        values = [int(low), int(high)] if kind == "int" else [float(low), float(high)]
        spec = {**spec, "low": values[0], "high": values[1]}
    for value in values:
        try:
            TrainConfig.from_dict({**base, name: value}, source=f"{where} = {shown(value)}")
        except ConfigError as exc:
            raise SweepError(str(exc)) from None
    return {**spec, "kind": kind}


def _kind(name: str, spec: dict, where: str) -> str:
    if "choices" in spec:
        return "categorical"
    hint = typing.get_type_hints(TrainConfig)[name]
    types_ = set(typing.get_args(hint)) - {type(None)} or {hint}
    if types_ == {int}:
        return "int"
    if types_ == {float}:
        return "float"
    raise SweepError(f"{where}: {name} is not a number: give a list of choices")


def data_variants(spec: SearchSpec, base: dict) -> list[dict]:
    """The base with each combination of the searched choices that pick a data cache, so each
    cache is prepared once before trials start (parallel trials never race to build one)."""
    keys = [k for k in ("data_dir", "image_size", "val_fraction", "seed")
            if spec.space.get(k, {}).get("kind") == "categorical"]
    return [{**base, **dict(zip(keys, combo))}
            for combo in itertools.product(*(spec.space[k]["choices"] for k in keys))]


# ---------------------------------------------------------------- study


def make_sampler(spec: SearchSpec, offset: int = 0):
    """offset: trials the study has already; a resumed sweep must not draw the same first points."""
    import optuna

    seed = spec.seed + offset
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(pruner: dict):
    """Epochs are the steps: asha (successive halving) and median compare trials at equal epochs."""
    import optuna

    settings = {k: v for k, v in pruner.items() if k != "type"}
    if pruner["type"] == "median":
        return optuna.pruners.MedianPruner(**settings)
    if pruner["type"] == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(**settings)
    if pruner["type"] == "threshold":
        return optuna.pruners.ThresholdPruner(**settings)
    return optuna.pruners.NopPruner()


def open_study(name: str, spec: SearchSpec, url: str, resume: bool):
    """(study, storage): the sweep's study: new, or (with --resume) the one it left, its stale trials enqueued again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url)
    exists = name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if exists and not resume:
        raise SweepError(f"{url}: study {name} exists; pass --resume to go on with it, or give the sweep another name")
    offset = len(optuna.load_study(study_name=name, storage=storage).trials) if exists else 0
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(spec, offset), pruner=make_pruner(spec.pruner))
    if exists:
        _fail_stale(study)
    return study, storage


def _fail_stale(study) -> None:
    """Trials left running by a sweep that is gone: wait out the grace period, then Optuna fails
    them and enqueues them again. Trials another live sweep keeps beating for stay running."""
    import optuna
    from optuna.trial import TrialState

    deadline = time.monotonic() + GRACE_S + 2 * HEARTBEAT_S
    while True:
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or time.monotonic() > deadline:
            return
        log.warning("waiting for %d trial(s) of an earlier sweep to go stale", len(running))
        time.sleep(2)


def trial_from_environment():
    """In a trial's process: its Optuna trial (reports go straight to the study), else None."""
    raw = os.environ.get(TRIAL_ENV)
    if not raw:
        return None
    import optuna

    info = json.loads(raw)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(info["storage"], heartbeat=False)
    study = optuna.load_study(study_name=info["study"], storage=storage, pruner=make_pruner(info["pruner"]))
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(info["study"]),
                                                               info["trial"])
    return optuna.trial.Trial(study, trial_id)


# ---------------------------------------------------------------- the ask / tell loop


def trial_run_name(number: int) -> str:
    return f"trial-{number:03d}"


class TrialSource:
    """What the executor's slots take runs from: asks the study for the next trial while fewer
    than `trials` have been started, tells each trial's outcome, beats for the running ones."""

    def __init__(self, study, storage, spec: SearchSpec, base: dict, url: str, make_run):
        self.study, self.storage, self.spec, self.base, self.url = study, storage, spec, base, url
        self.make_run = make_run
        self.study_id = self.storage.get_study_id_from_name(study.study_name)
        self.lock = threading.Lock()
        self.running: dict[str, object] = {}  # run name -> optuna Trial
        self.stopped = threading.Event()
        self.beat = threading.Thread(target=self._heartbeats, daemon=True)

    def started(self) -> int:
        """Run directories the study has begun (retries of one trial count once)."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        return len({original_number(t) for t in trials if t.state != TrialState.WAITING})

    def next(self):
        from optuna.trial import TrialState

        with self.lock:
            waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not waiting and self.started() >= self.spec.trials:
                return None
            trial = self.study.ask(self.spec.distributions())
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
            self.storage.record_heartbeat(trial_id)
            number = original_number(self.storage.get_trial(trial_id))
            info = {"storage": self.url, "study": self.study.study_name, "trial": trial.number,
                    "pruner": self.spec.pruner}
            run = self.make_run(trial_run_name(number), {**self.base, **trial.params}, {TRIAL_ENV: json.dumps(info)})
            self.running[run.name] = (trial, trial_id)
            if not self.beat.is_alive():
                self.beat.start()
            return run

    def done(self, run, record: dict, run_dir) -> None:
        """Tell the study; an interrupted run stays running (stale on resume, then run again)."""
        from optuna.trial import TrialState

        with self.lock:
            trial, _ = self.running.pop(run.name)
            if record["state"] == "interrupted":
                return
            metrics = run_dir.metrics()
            if record["state"] == "done":
                value = metrics.get("best_val_map")
                ok = isinstance(value, (int, float)) and math.isfinite(value)
                self.study.tell(trial, value if ok else None, state=TrialState.COMPLETE if ok else TrialState.FAIL)
            elif record["state"] == "pruned":
                self.study.tell(trial, state=TrialState.PRUNED)
            else:
                self.study.tell(trial, state=TrialState.FAIL)

    def _heartbeats(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            with self.lock:
                ids = [trial_id for _, trial_id in self.running.values()]
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # a busy database: the next beat is within the grace period
                    log.warning("heartbeat of trial %s: %s", trial_id, exc)

    def close(self) -> None:
        self.stopped.set()


def study_runs(study, base: dict, make_run) -> list:
    """One run per run directory of the study (the latest trial of each), by trial number."""
    latest = {}
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        latest[original_number(trial)] = trial
    return [make_run(trial_run_name(n), {**base, **t.params}, {}) for n, t in sorted(latest.items()) if t.params]
