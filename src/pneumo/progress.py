"""Progress bars for long work: on a terminal only, never inside sweep runs or CI logs."""

from __future__ import annotations

import os
import sys
import time


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("PNEUMO_NO_PROGRESS")


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
