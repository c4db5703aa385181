"""Progress bars for long work (training, sampling, searches), built on rich."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    """A handle on one progress task: ``update(n, **info)`` advances it and shows ``info``."""

    def __init__(self, progress: Progress, task: int) -> None:
        self._progress = progress
        self._task = task

    def update(self, advance: int = 1, **info: object) -> None:
        shown = "  ".join(f"{k}={v}" for k, v in info.items() if v is not None)
        if shown:
            self._progress.update(self._task, advance=advance, info=shown)
        else:
            self._progress.update(self._task, advance=advance)


@contextmanager
def progress_bar(total: int, description: str, completed: int = 0, enabled: bool = True) -> Iterator[Bar]:
    """A progress bar for ``total`` units of work; ``enabled=False`` keeps it silent (inner loops)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, disable=not enabled, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield Bar(progress, task)
