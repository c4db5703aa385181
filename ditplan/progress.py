"""Progress bars for long work (training, sampling, searches), built on rich (the search extra's): without
rich, or when disabled, a bar is silent, so that applying and sampling a plan needs only the base install."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress


class Bar:
    """A handle on one progress task: ``update(n, **info)`` advances it and shows ``info`` (a silent bar,
    ``progress`` None, does nothing)."""

    def __init__(self, progress: Progress | None, task: int = 0) -> None:
        self._progress = progress
        self._task = task

    def update(self, advance: int = 1, **info: object) -> None:
        if self._progress is None:
            return
        shown = "  ".join(f"{k}={v}" for k, v in info.items() if v is not None)
        if shown:
            self._progress.update(self._task, advance=advance, info=shown)
        else:
            self._progress.update(self._task, advance=advance)


@contextmanager
def progress_bar(total: int, description: str, completed: int = 0, enabled: bool = True) -> Iterator[Bar]:
    """A progress bar for ``total`` units of work; ``enabled=False`` keeps it silent (inner loops)."""
    if not enabled or importlib.util.find_spec("rich") is None:
        yield Bar(None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield Bar(progress, task)
