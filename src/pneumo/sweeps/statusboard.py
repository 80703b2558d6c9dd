"""The sweep's progress display: one line per run (queued / running epoch k / done mAP / failed),
read from what each run leaves in its run directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pneumo.training.rundir import RunDir


class StatusBoard:
    """Live on a terminal, else a line per change (what CI logs and nox show)."""

    def __init__(self, runs, runs_root: Path):
        self.runs, self.runs_root = list(runs), runs_root
        self.state = {r.name: "queued" for r in runs}
        self.last_printed = {}
        self.live = None
        if sys.stdout.isatty() and not os.environ.get("PNEUMO_NO_PROGRESS"):
            from rich.live import Live

            self.live = Live(self._table(), refresh_per_second=2, transient=False)
            self.live.start()

    def add(self, run) -> None:
        """A run that joined after the board started (a search's next trial)."""
        if run.name not in self.state:
            self.runs.append(run)
            self.state[run.name] = "queued"

    def line(self, name: str) -> str:
        state, run_dir = self.state[name], RunDir(self.runs_root / name)
        if state == "running":
            status = run_dir.status()
            if status.get("state") == "done":
                return "finishing (saving the executed notebook)"
            if status.get("epoch"):
                return (f"running epoch {status['epoch']}/{status.get('epochs', '?')}"
                        f"  val mAP {status.get('val_map', 0):.3f}")
            return "running (starting kernel)"
        if state == "done":
            return f"done  best val mAP {run_dir.metrics().get('best_val_map') or 0:.4f}"
        if state == "pruned":
            return (f"pruned at epoch {run_dir.metrics().get('pruned_at_epoch')}"
                    f"  best val mAP {run_dir.metrics().get('best_val_map') or 0:.4f}")
        if state == "failed":
            return f"FAILED  {run_dir.failure().get('error', '')[:100]}"
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
