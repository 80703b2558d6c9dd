"""`pneumo sweep`: papermill executions of the training notebook, one process per run.

A params file names the notebook, the base parameters and the runs (a list and/or a grid).
Every run is validated against the notebook's parameters cell and TrainConfig before any
starts. This module holds that spec, the orchestration and the summary: the runs execute in
pneumo.sweeps.executors (one per visible GPU, the CPU cores split between them, or as tasks of a Dask
cluster). A failed or killed run is recorded and the others go on; --resume finishes what is
not done. The marathon trains the best run longer into a versioned model (pneumo.deploy.registry).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from pneumo.config import EXECUTION_FIELDS, TrainConfig, read_params_file
from pneumo.deploy.registry import export_model
from pneumo.errors import ConfigError, PneumoError, SweepError, shown
from pneumo.io import atomic_write_text
from pneumo.limits import MAX_SWEEP_RUNS
from pneumo.paths import Outputs, absolute
from pneumo.sweeps.executors import make_executor
from pneumo.training.rundir import RunDir

log = logging.getLogger(__name__)

NOTEBOOK_ONLY_PARAMETERS = {"run_dir"}  # set by the sweep, not a TrainConfig field
SPEC_KEYS = {"name", "notebook", "base", "runs", "grid", "search", "marathon"}


@dataclass
class Run:
    name: str
    params: dict  # TrainConfig values: base + this run's entry
    env: dict = field(default_factory=dict)  # for the run's process: a search trial's study

    def dir(self, runs_root: Path) -> RunDir:
        return RunDir(runs_root / self.name)


@dataclass
class Sweep:
    name: str
    notebook: Path
    base: dict
    runs: list[Run]
    marathon: dict = field(default_factory=dict)
    search: object = None  # a pneumo.sweeps.study.SearchSpec: the runs are the trials of an Optuna study


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return Path(value).name if isinstance(value, str) and "/" in value else shown(value, 40).strip("'")


def run_name(index: int, entry: dict) -> str:
    """Readable, file-safe names: 03-adamw-lr0.001, 04-sgd-lr0.03-momentum0.9."""
    parts = [f"{index:02d}"]
    if "optimizer" in entry:
        parts.append(str(entry["optimizer"]))
    parts += [f"{k}{_short(v)}" for k, v in entry.items() if k != "optimizer"]
    name = "-".join(parts)
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name)[:120]


def notebook_parameters(notebook: Path) -> set[str]:
    import papermill

    logging.getLogger("papermill").setLevel(logging.WARNING)  # it logs "Input Notebook: ..." at INFO
    if not notebook.is_file():
        raise SweepError(f"{notebook}: notebook not found")
    return set(papermill.inspect_notebook(str(notebook)))


def load_sweep(path, data_dir=None) -> Sweep:
    """Read and validate a sweep params file; SweepError names the run and key at fault."""
    path = Path(path)
    try:
        spec = read_params_file(path)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(sorted(SPEC_KEYS))}")
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,99}", name):
        raise SweepError(f"{path}: sweep name {name[:120]!r} must be 1 to 100 letters, digits, '.', '_' or '-' "
                         "(it names directories)")
    # relative to the working directory, else to the project (the params file's parent folder)
    notebook = Path(spec.get("notebook", "notebooks/02-train.ipynb"))
    if not notebook.is_absolute() and not notebook.exists():
        notebook = path.resolve().parent.parent / notebook
    base = dict(spec.get("base") or {})
    if data_dir:
        name = _name_for_data(name, base.get("data_dir", TrainConfig.data_dir), data_dir)
        base["data_dir"] = data_dir
    entries = _entries(spec, path)
    if not entries and spec.get("search") is None:
        raise SweepError(f"{path}: no runs (give runs: and/or grid:, or search:)")
    if entries and spec.get("search") is not None:
        raise SweepError(f"{path}: give runs: / grid: or search:, not both")
    allowed = notebook_parameters(notebook)
    search = _search_spec(spec, base, allowed, path)
    runs = []
    for i, entry in enumerate(entries, 1):
        run = run_name(i, entry)
        params = {**base, **entry}
        missing = sorted(set(params) - allowed)
        if missing:
            raise SweepError(f"{path}: run {run}: parameter(s) {', '.join(missing)} not in the parameters cell "
                             f"of {notebook.name}; valid: {', '.join(sorted(allowed - NOTEBOOK_ONLY_PARAMETERS))}")
        _check_run(params, run, path)
        if "data_dir" in params:  # runs execute in their own run directory: make the path absolute
            params["data_dir"] = absolute(params["data_dir"], f"{path}: run {run}: data_dir")
        runs.append(Run(run, params))
    marathon = spec.get("marathon") or {}
    if isinstance(marathon, str):  # a path to a marathon params file, relative to this one
        marathon = read_params_file(path.parent / marathon)
    bad = set(marathon) - set(TrainConfig.names())
    if bad:
        raise SweepError(f"{path}: marathon: unknown parameter(s) {', '.join(sorted(bad))}")
    return Sweep(name, notebook.resolve(), base, runs, dict(marathon), search)


def _entries(spec: dict, path: Path) -> list[dict]:
    """The runs: list, then the grid's product, sized before the product is built."""
    entries = list(spec.get("runs") or [])
    grid = spec.get("grid") or {}
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SweepError(f"{path}: runs must be a list of mappings")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{path}: grid must map parameter names to non-empty lists")
    size = len(entries) + math.prod(len(v) for v in grid.values()) * bool(grid)
    if size > MAX_SWEEP_RUNS:  # before the product is built: 7 keys x 10 values would be 10^7 runs
        raise SweepError(f"{path}: {size} runs (runs: plus the grid's product); at most {MAX_SWEEP_RUNS} "
                         "in one sweep: split it, or search the space (search:)")
    if grid:
        keys = list(grid)
        entries += [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return entries


def _name_for_data(name: str, file_data, data_dir) -> str:
    """The sweep's name for --data-dir: its own for the data the file names, else `<name>-<folder>`,
    so the demo's sweep and the same sweep on other data keep apart (runs, summary, model)."""
    def resolved(folder):
        return Path(str(folder)).expanduser().resolve()

    if resolved(data_dir) == resolved(file_data):
        return name
    folder = re.sub(r"[^\w.-]+", "-", resolved(data_dir).name).strip("-.") or "data"
    return f"{name}-{folder}"[:100]


def _check_run(params: dict, run: str, path: Path) -> None:
    """The config's own checks, then its parts' (an unknown encoder, a head the encoder cannot feed)."""
    from pneumo.models.net import check_config

    try:
        check_config(TrainConfig.from_dict(params, source=f"run {run}"))
    except ConfigError as exc:
        raise SweepError(f"{path}: {exc}") from None


def _search_spec(spec: dict, base: dict, allowed: set[str], path: Path):
    """The search: section checked like a run (pneumo.sweeps.study); its base data_dir made absolute."""
    if spec.get("search") is None:
        return None
    from pneumo.sweeps.study import parse_search

    if "data_dir" in base:  # trials execute in their own run directory
        base["data_dir"] = str(Path(str(base["data_dir"])).expanduser().resolve())
    missing = sorted(set(base) - allowed)
    if missing:
        raise SweepError(f"{path}: base: parameter(s) {', '.join(missing)} not in the parameters cell")
    return parse_search(spec["search"], base, allowed, f"{path}: search")


# ---------------------------------------------------------------- summary


def summarize(sweep: Sweep, runs_root: Path, sweeps_root: Path) -> list[dict]:
    """Write summary.csv and summary.md and return the runs' rows, ranked by best val mAP.

    Below the ranking, unranked, a row for each marathon (runs_root/marathon*, once it has metrics)
    with the test score of the model exported from it; still_improving marks a run whose best epoch
    was its last. The rows returned are the sweep's runs alone (the marathon is never the best run).
    """
    import pandas as pd

    keys = {k for r in sweep.runs for k in r.params}
    # the parameters that tell the runs apart (all of a one-run sweep's own entry)
    varying = sorted(k for k in keys if len({repr(r.params.get(k)) for r in sweep.runs}) > 1
                     or (len(sweep.runs) == 1 and k not in sweep.base))
    df = pd.DataFrame([_summary_row(run.dir(runs_root), run.name, run.params, varying) for run in sweep.runs])
    df["_rank_key"] = df["best_val_map"].fillna(-1.0).astype(float)
    df = df.sort_values("_rank_key", ascending=False, kind="stable").drop(columns="_rank_key")
    df.insert(0, "rank", range(1, len(df) + 1))
    records = df.to_dict("records")
    marathons = _marathon_rows(runs_root, varying, Outputs(sweeps_root.parent).model(sweep.name))
    if marathons:
        df = pd.concat([df, pd.DataFrame(marathons)], ignore_index=True)
    out = sweeps_root / sweep.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.csv", df.to_csv(index=False))
    header = (f"# Sweep `{sweep.name}`\n\nNotebook `{sweep.notebook.name}`, {len(records)} runs, ranked by best "
              f"validation mAP (official RSNA metric).\nCompare in TensorBoard: `tensorboard --logdir {runs_root}`\n\n")
    notes = ["", "", "`still_improving`: yes when the run's best epoch was its last (more epochs may help)."]
    if marathons:
        notes.append("Rank `marathon`: the best run's parameters trained longer (the params file's `marathon:`), "
                     "not ranked with the runs; `model` is the version exported from it, `test_map` its score "
                     "from `pneumo predict --labels` when it has one.")
    base = "\n".join(f"- `{k}`: {v}" for k, v in sweep.base.items())
    atomic_write_text(out / "summary.md", header + _markdown_table(df) + "\n".join(notes)
                      + f"\n\nBase parameters:\n{base}\n")
    return records


def _summary_row(run_dir: RunDir, name: str, params: dict, varying: list[str]) -> dict:
    """One run's line of the summary: how it ended, its figures, the parameters that differ."""
    metrics = run_dir.metrics()
    history = metrics.get("history") or []
    last = metrics.get("epochs_done") or (history[-1].get("epoch") if history else None)
    row = {"run": name, "status": run_dir.state(), "best_val_map": metrics.get("best_val_map"),
           "best_epoch": metrics.get("best_epoch"), "epochs_done": metrics.get("epochs_done"),
           "still_improving": "yes" if last is not None and metrics.get("best_epoch") == last else None,
           "threshold": metrics.get("threshold"), "wall_time_s": metrics.get("wall_time_s")}
    process_s = run_dir.process().get("seconds")
    if process_s is not None and row["wall_time_s"] is not None:
        # papermill, kernel start-up and imports: what a run costs beyond fit() itself
        row["overhead_s"] = round(process_s - row["wall_time_s"], 1)
    row.update({k: params.get(k) for k in varying})
    if row["status"] == "failed":
        row["error"] = run_dir.failure().get("error", "")
    return row


def _marathon_rows(runs_root: Path, varying: list[str], family: Path) -> list[dict]:
    """A row per marathon run that has metrics, with the model version exported from it (the latest)
    and that version's test score."""
    from pneumo.deploy.registry import MODEL_CARD, outputs_root_of, portable_path
    from pneumo.training.rundir import read_json

    versions = sorted((p for p in family.glob("v*") if p.name[1:].isdigit()), key=lambda p: -int(p.name[1:]))
    cards = [(p.name, read_json(p / MODEL_CARD)) for p in versions]
    rows = []
    for path in sorted(p for p in runs_root.glob("marathon*") if p.is_dir()):
        run_dir = RunDir(path)
        if not run_dir.metrics():
            continue
        row = {"rank": "marathon", **_summary_row(run_dir, path.name, run_dir.read_config(), varying)}
        names = {str(path.resolve()), portable_path(path, outputs_root_of(family.parent))}
        version, card = next(((v, c) for v, c in cards if c.get("source_run") in names), (None, {}))
        if version is not None:
            row["model"] = version
            row["test_map"] = (card.get("test") or {}).get("map")
        rows.append(row)
    return rows


def _markdown_table(df) -> str:
    cols = list(df.columns)

    def cell(v):
        if v is None or (isinstance(v, float) and v != v):
            return ""
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() and abs(v) < 1e6 else (f"{v:.4f}" if abs(v) < 1 else f"{v:g}")
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


# ---------------------------------------------------------------- orchestration


def sweep(params_file, out=None, data_dir=None, max_parallel: int | None = None, resume: bool = False,
          marathon: bool = False, cluster: str | None = None, cluster_file=None, storage: str | None = None) -> dict:
    """Run a sweep (and optionally its marathon); returns where everything is and which runs failed.

    cluster: None runs on this machine; 'local', 'slurm', 'htcondor', 'pbs' or a scheduler
    address run the same runs as Dask tasks (see pneumo.sweeps.executors). storage: a search's study
    (SQLAlchemy URL; default SQLite <out>/sweeps/<name>/study.db).
    """
    spec = load_sweep(params_file, data_dir=data_dir)
    # resolved: runs execute with their run directory as working directory
    layout = Outputs.at(Path(out).resolve() if out else Outputs.at().root.resolve())
    out = layout.root
    runs_root = layout.runs(spec.name)
    sweeps_root = layout.sweeps
    started = [r for r in spec.runs if r.dir(runs_root).path.exists()]
    if started and not resume:
        raise SweepError(f"{runs_root}: this sweep has runs already ({len(started)}); "
                         "pass --resume to finish it, or give the sweep another name")
    for run in started:  # a finished run counts as done only if it trained what the file now asks
        changed = _changed(run.dir(runs_root), run.params)
        if changed:
            raise SweepError(f"{run.dir(runs_root).path}: was started with other parameters ({', '.join(changed)}) "
                             f"than {params_file} (or --data-dir) now gives; give the sweep another name or --out")
    pending = [r for r in spec.runs if not r.dir(runs_root).finished()]
    from pneumo.sweeps.hparams import write_sweep_experiment  # TensorBoard's HParams: the swept parameters first
    write_sweep_experiment(spec, runs_root)
    executor = make_executor(cluster, max_parallel, cluster_file)
    try:
        if spec.search is not None:
            _run_search(spec, executor, out, storage, resume)
        else:
            print(f"sweep {spec.name}: {len(spec.runs)} runs ({len(spec.runs) - len(pending)} done), "
                  f"{executor.describe()}", flush=True)
        if pending:
            _prepare_once(spec, pending, out)
            start = time.perf_counter()
            results = executor.run(spec.notebook, pending, runs_root)
            if any(r["state"] == "done" for r in results) and isinstance(getattr(executor, "slots", None), list):
                ideal = sum(r["seconds"] for r in results) / len(executor.slots)
                print(f"sweep wall time {time.perf_counter() - start:.0f} s (ideal {ideal:.0f} s)", flush=True)
        rows = summarize(spec, runs_root, sweeps_root)
        failed = [r["run"] for r in rows if r["status"] not in ("done", "pruned")]
        result = {"sweep": spec.name, "runs_dir": str(runs_root),
                  "summary": str(sweeps_root / spec.name / "summary.md"),
                  "failed": failed, "best": rows[0] if rows and rows[0]["status"] == "done" else None,
                  "search": spec.search is not None}
        if marathon:
            result.update(run_marathon(spec, rows, out, executor.whole_machine()))
            summarize(spec, runs_root, sweeps_root)  # again: summary.md gains the marathon's row and model
    finally:
        executor.close()
    return result


def _run_search(spec: Sweep, executor, out: Path, storage: str | None, resume: bool) -> None:
    """Trials of the study as slots free up (pneumo.sweeps.study); spec.runs becomes the study's runs."""
    from pneumo.sweeps import study as search

    url = storage or search.default_storage(Outputs(out).sweeps, spec.name)
    study, store = search.open_study(spec.name, spec.search, url, resume)
    source = search.TrialSource(study, store, spec.search, spec.base, url, Run)
    print(f"search {spec.name}: {spec.search.trials} trials ({source.started()} started), sampler "
          f"{spec.search.sampler}, pruner {spec.search.pruner['type']}, study {search.shown_url(url)}; "
          f"{executor.describe()}", flush=True)
    _prepare_once(spec, [Run("base", params) for params in search.data_variants(spec.search, spec.base)], out)
    try:
        executor.stream(spec.notebook, source, Outputs(out).runs(spec.name))
    finally:
        source.close()
    spec.runs = search.study_runs(study, spec.base, Run)


def _prepare_once(spec: Sweep, runs: list[Run], out: Path) -> None:
    """Prepare each distinct data cache before the runs start, so parallel runs never race to build it."""
    from pneumo.data.prepare import prepared_for

    seen = set()
    for run in runs:
        config = TrainConfig.from_dict(run.params)
        key = (config.data_dir, config.image_size, config.val_fraction, config.seed)
        if key not in seen:
            seen.add(key)
            try:
                prepared_for(config, outputs=out)
            except PneumoError as exc:  # that run fails with this error; the others go on
                log.warning("run %s: %s", run.name, exc)


def _changed(run_dir: RunDir, params: dict) -> list[str]:
    """The parameters a started run saved that differ from params (what would train now)."""
    return run_dir.changed_parameters(TrainConfig.from_dict(params).to_dict(), EXECUTION_FIELDS)


def _marathon_run(runs_root: Path, params: dict) -> Run:
    """marathon, or marathon-2, -3, ... when the best run or the overrides changed since an earlier
    marathon: that one is kept, never returned for parameters it did not train."""
    for n in itertools.count(1):
        run = Run("marathon" if n == 1 else f"marathon-{n}", params)
        if not run.dir(runs_root).path.exists() or not _changed(run.dir(runs_root), params):
            return run
    raise AssertionError("unreachable")


def run_marathon(spec: Sweep, rows: list[dict], out: Path, executor) -> dict:
    """Train the best run's parameters with the marathon overrides, then export the model."""
    best = next((r for r in rows if r["status"] == "done"), None)
    if best is None:
        raise SweepError(f"sweep {spec.name}: no finished run to train longer")
    params = {**next(r.params for r in spec.runs if r.name == best["run"]), **spec.marathon}
    runs_root = Outputs(out).runs(spec.name)
    marathon = _marathon_run(runs_root, params)
    run_dir = marathon.dir(runs_root)
    if not run_dir.finished():
        print(f"marathon: {best['run']} trained longer ({', '.join(f'{k}={v}' for k, v in spec.marathon.items())})",
              flush=True)
        result = executor.run(spec.notebook, [marathon], runs_root)[0]
        if result["state"] != "done":
            raise SweepError(f"marathon failed: {result.get('error', result['state'])}; log: {run_dir.log}")
    from functools import partial

    from pneumo.deploy.modelcard import (  # model.md (subgroups), model.onnx
        complete_version,
        write_extras,
    )

    model_dir = export_model(run_dir, Outputs(out).models, spec.name, spec.name,
                             extras=partial(write_extras, outputs=out))
    complete_version(model_dir, outputs=out)  # a version exported before model.md and model.onnx existed
    return {"marathon_run": str(run_dir.path), "model": str(model_dir),
            "marathon_val_map": run_dir.metrics().get("best_val_map")}
