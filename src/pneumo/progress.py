"""Progress for long work. track()'s bars: on a terminal only. Lightning's training bar: on a terminal
or in a Jupyter kernel (JupyterLab). Never when PNEUMO_NO_PROGRESS is set: tests, CI logs and every
sweep run (pneumo.sweeps.runner sets it for the papermill process, so an executed notebook is not
flooded; papermill itself leaves no mark in the kernel's environment)."""

from __future__ import annotations

import os
import sys
import time


def switched_off() -> bool:
    return bool(os.environ.get("PNEUMO_NO_PROGRESS"))


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, a notebook, papermill), False in a plain process."""
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    shell = sys.modules["IPython"].get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def progress_enabled() -> bool:
    """track()'s bars: stderr is a terminal and progress is not switched off."""
    return sys.stderr.isatty() and not switched_off()


def training_bar_enabled() -> bool:
    """Lightning's progress bar: on a terminal or in a Jupyter kernel, unless switched off."""
    return not switched_off() and (sys.stderr.isatty() or in_notebook())


def track(iterable, total: int, description: str):
    """Iterate with a rich progress bar (done/total, items/s, ETA) when stderr is a terminal."""
    if not progress_enabled():
        yield from iterable
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    start = time.perf_counter()
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, rate="")
        for done, item in enumerate(iterable, 1):
            yield item
            bar.update(task, advance=1, rate=f"{done / (time.perf_counter() - start):.1f}/s")
