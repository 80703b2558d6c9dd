"""The run directory: the one place that knows its file names and decides what state a run is in.

outputs/runs/<sweep>/<run>/ (or wherever `pneumo train --out` points) holds:

    config.yaml          the TrainConfig of the run
    status.json          live progress: state, epoch, epochs, val_map (written by training)
    metrics.json         the final record; status "finished" marks a finished run, "pruned" a
                         search trial its study stopped early (at an epoch boundary)
    failed.json          written by the executor when the run's process failed
    process.json         the papermill process's seconds and return code
    threads              a CPU thread share handed over by a sweep when other runs end
    checkpoints/         best.ckpt (by val/map) and last.ckpt (resume)
    events.out.tfevents.*  TensorBoard events (in tensorboard/ for runs started before; events_dir)
    val_images/          annotated validation PNGs
    notebook.ipynb, log.txt, papermill-params.yaml   the executed notebook, its log, its parameters

Training, the executors, the sweep, predict and the plots go through RunDir; nothing else
spells these names.
"""

from __future__ import annotations

import json
from pathlib import Path

from pneumo.io import atomic_write_json, atomic_write_text

STATES = ("done", "pruned", "failed", "interrupted", "running", "starting", "pending")


def read_json(path) -> dict:
    """A JSON object from path, {} when it is missing or torn (a reader racing a writer)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


class _Inside:
    """A read-only path inside the run directory: `config_file = _Inside("config.yaml")`."""

    def __init__(self, relative: str):
        self.relative = relative

    def __get__(self, run_dir, owner=None):
        return self if run_dir is None else run_dir.path / self.relative


class RunDir:
    """One run's directory; cheap to make, reads the disk only when asked."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ paths

    @property
    def name(self) -> str:
        return self.path.name

    config_file = _Inside("config.yaml")
    status_file = _Inside("status.json")
    metrics_file = _Inside("metrics.json")
    failed_file = _Inside("failed.json")
    process_file = _Inside("process.json")
    threads_file = _Inside("threads")
    checkpoints = _Inside("checkpoints")
    best_checkpoint = _Inside("checkpoints/best.ckpt")
    last_checkpoint = _Inside("checkpoints/last.ckpt")
    images_dir = _Inside("val_images")
    notebook = _Inside("notebook.ipynb")
    log = _Inside("log.txt")
    papermill_params = _Inside("papermill-params.yaml")

    @property
    def events_dir(self) -> Path:
        """TensorBoard's event files: the run directory itself, so TensorBoard names the run after it;
        a run started when they went to tensorboard/ keeps writing there when resumed."""
        legacy = self.path / "tensorboard"
        return legacy if legacy.is_dir() else self.path

    # ------------------------------------------------------------ config

    def write_config(self, config) -> None:
        atomic_write_text(self.config_file, config.to_yaml())

    def read_config(self) -> dict:
        """The saved TrainConfig values, {} when the run has none yet."""
        import yaml

        if not self.config_file.is_file():
            return {}
        return yaml.safe_load(self.config_file.read_text()) or {}

    def changed_parameters(self, current: dict, ignore=frozenset()) -> list[str]:
        """The keys whose saved value (config.yaml) differs from current's; [] when none is saved."""
        previous = self.read_config()
        if not previous:
            return []
        return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k) and k not in ignore)

    # ------------------------------------------------------------ status, metrics, failure

    def write_status(self, state: str, **fields) -> None:
        atomic_write_json(self.status_file, {"state": state, **fields})

    def status(self) -> dict:
        return read_json(self.status_file)

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.metrics_file, metrics)

    def metrics(self) -> dict:
        return read_json(self.metrics_file)

    def write_process(self, seconds: float, returncode: int, **fields) -> None:
        atomic_write_json(self.process_file, {"seconds": round(seconds, 2), "returncode": returncode, **fields})

    def process(self) -> dict:
        return read_json(self.process_file)

    def mark_failed(self, error: str, **fields) -> None:
        atomic_write_json(self.failed_file, {"error": error[:500], **fields})

    def failure(self) -> dict:
        return read_json(self.failed_file)

    def finished(self) -> bool:
        """True once training wrote its final metrics: a finished run is never trained again."""
        return self.metrics().get("status") == "finished"

    def ended(self) -> bool:
        """Finished, or pruned (a search's pruner stopped it early): never trained again."""
        return self.metrics().get("status") in ("finished", "pruned")

    def state(self) -> str:
        """done, pruned, failed, interrupted, running, starting or pending; from what the run left on disk."""
        ended = self.metrics().get("status")
        if ended in ("finished", "pruned"):
            return "done" if ended == "finished" else "pruned"
        if self.failed_file.is_file():
            return "failed"
        if self.status_file.is_file():
            # a torn status file is a run writing it right now
            return self.status().get("state", "running")
        return "pending"

    def start_execution(self) -> None:
        """Forget what an earlier execution left that must not steer this one (a failure, a thread share)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.failed_file.unlink(missing_ok=True)
        self.threads_file.unlink(missing_ok=True)

    # ------------------------------------------------------------ thread share

    def give_threads(self, threads: int) -> None:
        atomic_write_text(self.threads_file, f"{threads}\n")

    def thread_share(self) -> int | None:
        """Threads a sweep handed this run after other runs ended; None when it handed none."""
        try:
            threads = int(self.threads_file.read_text())
        except (OSError, ValueError):
            return None
        return threads if threads > 0 else None
