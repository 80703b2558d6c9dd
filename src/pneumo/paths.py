"""Where outputs go: the one owner of the outputs folder's layout, used by train, prepare,
sweep, the marathon's model registry, predict and the notebooks alike.

outputs/ (`$PNEUMO_OUTPUTS`, else the nearest `outputs/` folder of the working directory or its
parents, so notebooks/ finds the project's, else ./outputs):
  data/<fingerprint>/     prepare's caches
  runs/<sweep>/<run>/     run directories (runs/train/ for `pneumo train`)
  sweeps/<sweep>/         summary.csv, summary.md, study.db
  models/<name>/vN/       exported model versions
  predictions/<name>/     the main job's predictions
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def absolute(path, what: str) -> str:
    """`path` made absolute (runs execute in their own directories), or one line naming it when
    the file system cannot resolve it (a symlink loop)."""
    from pneumo.errors import ConfigError

    try:
        return str(Path(str(path)).expanduser().resolve())
    except (OSError, RuntimeError) as exc:  # Python 3.11 raises RuntimeError on a symlink loop
        raise ConfigError(f"{what} {path}: cannot be resolved ({exc})") from None


def outputs_root() -> Path:
    if os.environ.get("PNEUMO_OUTPUTS"):
        return Path(os.environ["PNEUMO_OUTPUTS"])
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "outputs").is_dir():
            return folder / "outputs"
    return Path("outputs")


@dataclass(frozen=True)
class Outputs:
    """The layout under one outputs root (the default root when none is given)."""

    root: Path

    @classmethod
    def at(cls, root=None) -> Outputs:
        return cls(Path(root) if root else outputs_root())

    def data(self, fingerprint: str) -> Path:
        return self.root / "data" / fingerprint

    def runs(self, sweep: str) -> Path:
        return self.root / "runs" / sweep

    def sweep(self, name: str) -> Path:
        return self.root / "sweeps" / name

    @property
    def sweeps(self) -> Path:
        return self.root / "sweeps"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> Path:
        return self.models / name

    def predictions(self, name: str) -> Path:
        return self.root / "predictions" / name

    def train_run(self, label: str) -> Path:
        """A new `pneumo train` run directory: runs/train/<time>-<label>."""
        return self.runs("train") / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
