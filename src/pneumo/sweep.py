"""`pneumo sweep`: papermill executions of the training notebook, one process per run.

A params file names the notebook, the base parameters and the runs (a list and/or a grid).
Every run is validated against the notebook's parameters cell and TrainConfig before any
starts. Runs execute in parallel (pneumo.executors): one per visible GPU with
CUDA_VISIBLE_DEVICES set, or on the CPU with the cores split between them, or as tasks of a
Dask cluster. A failed or killed run is recorded and the others
go on; --resume finishes what is not done. The marathon trains the best run longer into a
versioned model under outputs/models/ (pneumo.registry).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pneumo.config import TrainConfig, read_params_file
from pneumo.errors import ConfigError, PneumoError, SweepError
from pneumo.io import atomic_write_json, atomic_write_text
from pneumo.registry import export_model

log = logging.getLogger(__name__)

NOTEBOOK_ONLY_PARAMETERS = {"run_dir"}  # set by the sweep, not a TrainConfig field
SPEC_KEYS = {"name", "notebook", "base", "runs", "grid", "marathon"}


@dataclass
class Run:
    name: str
    params: dict  # TrainConfig values: base + this run's entry

    def dir(self, runs_root: Path) -> Path:
        return runs_root / self.name


@dataclass
class Sweep:
    name: str
    notebook: Path
    base: dict
    runs: list[Run]
    marathon: dict = field(default_factory=dict)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return Path(value).name if isinstance(value, str) and "/" in value else str(value)


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
        raise SweepError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(SPEC_KEYS))}")
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise SweepError(f"{path}: sweep name {name!r} must be letters, digits, '.', '_' or '-' (it names directories)")
    # relative to the working directory, else to the project (the params file's parent folder)
    notebook = Path(spec.get("notebook", "notebooks/02-train.ipynb"))
    if not notebook.is_absolute() and not notebook.exists():
        notebook = path.resolve().parent.parent / notebook
    base = dict(spec.get("base") or {})
    if data_dir:
        base["data_dir"] = data_dir
    entries = list(spec.get("runs") or [])
    grid = spec.get("grid") or {}
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SweepError(f"{path}: runs must be a list of mappings")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{path}: grid must map parameter names to non-empty lists")
    if grid:
        keys = list(grid)
        entries += [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if not entries:
        raise SweepError(f"{path}: no runs (give runs: and/or grid:)")
    allowed = notebook_parameters(notebook)
    runs = []
    for i, entry in enumerate(entries, 1):
        run = run_name(i, entry)
        params = {**base, **entry}
        if "data_dir" in params:  # runs execute in their own run directory: make the path absolute
            params["data_dir"] = str(Path(str(params["data_dir"])).expanduser().resolve())
        missing = sorted(set(params) - allowed)
        if missing:
            raise SweepError(f"{path}: run {run}: parameter(s) {', '.join(missing)} not in the parameters cell "
                             f"of {notebook.name}; valid: {', '.join(sorted(allowed - NOTEBOOK_ONLY_PARAMETERS))}")
        try:
            TrainConfig.from_dict(params, source=f"run {run}")
        except ConfigError as exc:
            raise SweepError(f"{path}: {exc}") from None
        runs.append(Run(run, params))
    marathon = spec.get("marathon") or {}
    if isinstance(marathon, str):  # a path to a marathon params file, relative to this one
        marathon = read_params_file(path.parent / marathon)
    bad = set(marathon) - set(TrainConfig.names())
    if bad:
        raise SweepError(f"{path}: marathon: unknown parameter(s) {', '.join(sorted(bad))}")
    return Sweep(name, notebook.resolve(), base, runs, dict(marathon))


# ---------------------------------------------------------------- devices


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every CUDA device."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def slot_environments(gpus: list[str], max_parallel: int | None = None, cores: int | None = None) -> list[dict]:
    """One environment per parallel slot: a GPU each, or an equal share of the CPU cores.

    A run takes a free slot, so no two runs ever share a GPU.
    """
    cores = cores or os.cpu_count() or 1
    if gpus:
        n = min(len(gpus), max_parallel or len(gpus))
        threads = max(1, cores // n)
        return [{"CUDA_VISIBLE_DEVICES": g, "PNEUMO_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
                for g in gpus[:n]]
    n = max(1, min(max_parallel or cores, cores))
    threads = max(1, cores // n)
    return [{"CUDA_VISIBLE_DEVICES": "", "PNEUMO_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
             "MKL_NUM_THREADS": str(threads)} for _ in range(n)]


# ---------------------------------------------------------------- execution


def run_state(run_dir: Path) -> str:
    """done, failed, interrupted, running, or pending; from what the run left on disk."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        try:
            if json.loads(metrics.read_text()).get("status") == "finished":
                return "done"
        except json.JSONDecodeError:
            pass
    if (run_dir / "failed.json").is_file():
        return "failed"
    status = run_dir / "status.json"
    if status.is_file():
        try:
            return json.loads(status.read_text()).get("state", "pending")
        except json.JSONDecodeError:
            return "running"
    return "pending"


def papermill_command(notebook: Path, run_dir: Path, params_file: Path, start_timeout: int = 300) -> list[str]:
    return [sys.executable, "-m", "papermill", str(notebook), str(run_dir / "notebook.ipynb"),
            "-f", str(params_file), "-k", "python3", "--cwd", str(run_dir), "--no-progress-bar",
            "--log-output", "--start-timeout", str(start_timeout)]


def execute_run(notebook: Path, run: Run, run_dir: Path, env_extra: dict, stop: threading.Event) -> dict:
    """One papermill execution in its own process; returns its record (never raises for the run's errors)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "failed.json").unlink(missing_ok=True)
    (run_dir / "threads").unlink(missing_ok=True)  # a thread share of an earlier execution
    params = dict(run.params)
    if env_extra.get("PNEUMO_THREADS") and not params.get("threads"):
        params["threads"] = int(env_extra["PNEUMO_THREADS"])
    params["run_dir"] = str(run_dir)
    params_file = run_dir / "papermill-params.yaml"
    import yaml

    atomic_write_text(params_file, yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, **env_extra, "PNEUMO_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    env["PNEUMO_OUTPUTS"] = str(run_dir.parents[2].resolve())  # <out>/runs/<sweep>/<run>: caches in <out>/data
    start = time.perf_counter()
    with open(run_dir / "log.txt", "ab") as logfile:
        logfile.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} papermill {run.name} "
                      f"(CUDA_VISIBLE_DEVICES={env_extra.get('CUDA_VISIBLE_DEVICES', '')!r})\n".encode())
        logfile.flush()
        # own session: Ctrl-C in the terminal reaches the sweep, which stops the runs itself
        proc = subprocess.Popen(papermill_command(notebook, run_dir, params_file), stdout=logfile,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        while proc.poll() is None:
            if stop.wait(0.5):
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                return {"run": run.name, "state": "interrupted", "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    atomic_write_json(run_dir / "process.json", {"seconds": round(seconds, 2), "returncode": proc.returncode})
    if proc.returncode == 0 and run_state(run_dir) == "done":
        return {"run": run.name, "state": "done", "seconds": seconds}
    error = _last_error(run_dir / "log.txt")
    atomic_write_json(run_dir / "failed.json", {"returncode": proc.returncode, "error": error,
                                                "notebook": str(run_dir / "notebook.ipynb")})
    return {"run": run.name, "state": "failed", "seconds": seconds, "error": error}


_EXCEPTION_LINE = re.compile(r"^[A-Z][\w.]*(Error|Exception|Diverged|Interrupt|Exit)\w*: .+")


def _load_libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux: runs are still stopped by the sweep on Ctrl-C
        return None


_LIBC = _load_libc()  # loaded in the parent: the child between fork and exec must not import


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the thread that started it dies (a killed
    sweep or Dask worker), so no orphaned run keeps writing into a directory being retried."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _last_error(log_path: Path) -> str:
    """The most telling line of a failed run's log: the last 'SomeError: message' line (the
    run's own exception, which papermill's traceback repeats at the end)."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
    for line in reversed(lines):
        text = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()  # tracebacks from the kernel are coloured
        if _EXCEPTION_LINE.match(text) and not text.startswith("PapermillExecutionError"):
            return text[-500:]
    return lines[-1].strip()[-500:] if lines else "no output"


class StatusBoard:
    """One line per run: queued / running epoch k / done mAP / failed. Live on a terminal,
    else a line per change (what CI logs and nox show)."""

    def __init__(self, runs: list[Run], runs_root: Path):
        self.runs, self.runs_root = runs, runs_root
        self.state = {r.name: "queued" for r in runs}
        self.last_printed = {}
        self.live = None
        if sys.stdout.isatty() and not os.environ.get("PNEUMO_NO_PROGRESS"):
            from rich.live import Live

            self.live = Live(self._table(), refresh_per_second=2, transient=False)
            self.live.start()

    def line(self, name: str) -> str:
        state = self.state[name]
        if state == "running":
            status = _read_json(self.runs_root / name / "status.json")
            if status.get("state") == "done":
                return "finishing (saving the executed notebook)"
            if status.get("epoch"):
                return f"running epoch {status['epoch']}/{status.get('epochs', '?')}  val mAP {status.get('val_map', 0):.3f}"
            return "running (starting kernel)"
        if state == "done":
            metrics = _read_json(self.runs_root / name / "metrics.json")
            return f"done  best val mAP {metrics.get('best_val_map') or 0:.4f}"
        if state == "failed":
            return f"FAILED  {_read_json(self.runs_root / name / 'failed.json').get('error', '')[:100]}"
        return state

    def _table(self):
        from rich.table import Table

        table = Table(show_header=False, box=None)
        for r in self.runs:
            table.add_row(r.name, self.line(r.name))
        return table

    def update(self, name: str | None = None, state: str | None = None) -> None:
        if name:
            self.state[name] = state
        if self.live is not None:
            self.live.update(self._table())
            return
        for r in self.runs:
            text = self.line(r.name)
            if self.last_printed.get(r.name) != text and self.state[r.name] != "queued":
                print(f"  {r.name:32} {text}", flush=True)
                self.last_printed[r.name] = text

    def close(self):
        if self.live is not None:
            self.live.stop()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------- summary and marathon


def summarize(sweep: Sweep, runs_root: Path, sweeps_root: Path) -> list[dict]:
    """Write summary.csv and summary.md (runs ranked by best val mAP) and return the rows."""
    import pandas as pd

    keys = {k for r in sweep.runs for k in r.params}
    # the parameters that tell the runs apart (all of a one-run sweep's own entry)
    varying = sorted(k for k in keys if len({repr(r.params.get(k)) for r in sweep.runs}) > 1
                     or (len(sweep.runs) == 1 and k not in sweep.base))
    rows = []
    for run in sweep.runs:
        run_dir = run.dir(runs_root)
        metrics = _read_json(run_dir / "metrics.json")
        row = {"run": run.name, "status": run_state(run_dir), "best_val_map": metrics.get("best_val_map"),
               "best_epoch": metrics.get("best_epoch"), "epochs_done": metrics.get("epochs_done"),
               "threshold": metrics.get("threshold"), "wall_time_s": metrics.get("wall_time_s")}
        process_s = _read_json(run_dir / "process.json").get("seconds")
        if process_s is not None and row["wall_time_s"] is not None:
            # papermill, kernel start-up and imports: what a run costs beyond fit() itself
            row["overhead_s"] = round(process_s - row["wall_time_s"], 1)
        row.update({k: run.params.get(k) for k in varying})
        if row["status"] == "failed":
            row["error"] = _read_json(run_dir / "failed.json").get("error", "")
        rows.append(row)
    df = pd.DataFrame(rows)
    df["_rank_key"] = df["best_val_map"].fillna(-1.0).astype(float)
    df = df.sort_values("_rank_key", ascending=False, kind="stable").drop(columns="_rank_key")
    df.insert(0, "rank", range(1, len(df) + 1))
    out = sweeps_root / sweep.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.csv", df.to_csv(index=False))
    header = (f"# Sweep `{sweep.name}`\n\nNotebook `{sweep.notebook.name}`, {len(df)} runs, ranked by best "
              f"validation mAP (official RSNA metric).\nCompare in TensorBoard: `tensorboard --logdir {runs_root}`\n\n")
    base = "\n".join(f"- `{k}`: {v}" for k, v in sweep.base.items())
    atomic_write_text(out / "summary.md", header + _markdown_table(df) + f"\n\nBase parameters:\n{base}\n")
    return df.to_dict("records")


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


def sweep(params_file, out="outputs", data_dir=None, max_parallel: int | None = None, resume: bool = False,
          marathon: bool = False, cluster: str | None = None, cluster_file=None) -> dict:
    """Run a sweep (and optionally its marathon); returns where everything is and which runs failed.

    cluster: None runs on this machine; 'local', 'slurm', 'htcondor', 'pbs' or a scheduler
    address run the same runs as Dask tasks (see pneumo.executors).
    """
    from pneumo.executors import make_executor

    spec = load_sweep(params_file, data_dir=data_dir)
    out = Path(out).resolve()  # runs execute with their run directory as working directory
    runs_root = out / "runs" / spec.name
    sweeps_root = out / "sweeps"
    started = [r for r in spec.runs if r.dir(runs_root).exists()]
    if started and not resume:
        raise SweepError(f"{runs_root}: this sweep has runs already ({len(started)}); "
                         "pass --resume to finish it, or give the sweep another name")
    pending = [r for r in spec.runs if run_state(r.dir(runs_root)) != "done"]
    executor = make_executor(cluster, max_parallel, cluster_file)
    try:
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
        failed = [r["run"] for r in rows if r["status"] != "done"]
        result = {"sweep": spec.name, "runs_dir": str(runs_root), "summary": str(sweeps_root / spec.name / "summary.md"),
                  "failed": failed, "best": rows[0] if rows and rows[0]["status"] == "done" else None}
        if marathon:
            result.update(run_marathon(spec, rows, out, executor.whole_machine()))
    finally:
        executor.close()
    return result


def _prepare_once(spec: Sweep, runs: list[Run], out: Path) -> None:
    """Prepare each distinct data cache before the runs start, so parallel runs never race to build it."""
    from pneumo.training import load_prepared

    seen = set()
    for run in runs:
        config = TrainConfig.from_dict(run.params)
        key = (config.data_dir, config.image_size, config.val_fraction, config.seed)
        if key not in seen:
            seen.add(key)
            try:
                load_prepared(config, outputs=out)
            except PneumoError as exc:  # that run fails with this error; the others go on
                log.warning("run %s: %s", run.name, exc)


def run_marathon(spec: Sweep, rows: list[dict], out: Path, executor) -> dict:
    """Train the best run's parameters with the marathon overrides, then export the model."""
    best = next((r for r in rows if r["status"] == "done"), None)
    if best is None:
        raise SweepError(f"sweep {spec.name}: no finished run to train longer")
    params = {**next(r.params for r in spec.runs if r.name == best["run"]), **spec.marathon}
    marathon = Run("marathon", params)
    runs_root = out / "runs" / spec.name
    run_dir = marathon.dir(runs_root)
    if run_state(run_dir) != "done":
        print(f"marathon: {best['run']} trained longer ({', '.join(f'{k}={v}' for k, v in spec.marathon.items())})",
              flush=True)
        result = executor.run(spec.notebook, [marathon], runs_root)[0]
        if result["state"] != "done":
            raise SweepError(f"marathon failed: {result.get('error', result['state'])}; log: {run_dir / 'log.txt'}")
    model_dir = export_model(run_dir, out / "models", spec.name, spec.name)
    return {"marathon_run": str(run_dir), "model": str(model_dir),
            "marathon_val_map": _read_json(run_dir / "metrics.json").get("best_val_map")}
