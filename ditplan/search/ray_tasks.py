"""The driver's in-flight Ray tasks, one per trial, each with a deadline.

Knows nothing about trials: it holds an opaque item per task and hands back what each task gave
(its result, or the one-line reason it failed: it raised, its worker died, it ran past its deadline).
The driver never waits on Ray longer than it asks to, and a task past its deadline is cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray


@dataclass
class Outcome:
    """What one task gave: ``result`` when it finished, else ``error`` (one line)."""

    item: Any
    result: Any = None
    error: str | None = None


def _reason(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return (lines[-1] if lines else type(err).__name__)[:500]


class TaskPool:
    """``timeout_s``: how long a task may run (from submission) before it fails and is cancelled."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._tasks: dict[ray.ObjectRef, tuple[Any, float]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def submit(self, ref: ray.ObjectRef, item: Any) -> None:
        self._tasks[ref] = (item, time.monotonic() + self.timeout_s)

    def items(self) -> list[Any]:
        return [item for item, _ in self._tasks.values()]

    def wait(self, max_wait_s: float) -> list[Outcome]:
        """At most ``max_wait_s`` (or until the next deadline) for one task or more to end: the
        finished ones, then the overdue ones (cancelled)."""
        if not self._tasks:
            return []
        next_deadline = min(deadline for _, deadline in self._tasks.values())
        timeout = max(0.0, min(max_wait_s, next_deadline - time.monotonic()))
        ready, _ = ray.wait(list(self._tasks), num_returns=1, timeout=timeout)
        return [self._collect(ref) for ref in ready] + self._expire()

    def _collect(self, ref: ray.ObjectRef) -> Outcome:
        item, _ = self._tasks.pop(ref)
        try:
            return Outcome(item, result=ray.get(ref))
        except ray.exceptions.RayError as err:  # it raised, or its worker died past its retries: this trial only
            return Outcome(item, error=_reason(err))

    def _expire(self) -> list[Outcome]:
        now = time.monotonic()
        overdue = [ref for ref, (_, deadline) in self._tasks.items() if deadline <= now]
        if not overdue:
            return []
        done, overdue = ray.wait(overdue, num_returns=len(overdue), timeout=0)  # ended just in time
        self._cancel(overdue)
        return [self._collect(ref) for ref in done] + [Outcome(self._tasks.pop(ref)[0], error=f"timed out after {self.timeout_s:g} s (search.trial_timeout_s)")
                for ref in overdue]

    def cancel_all(self) -> list[Any]:
        """Cancel every task still in flight (the driver is stopping); returns their items."""
        items = self.items()
        self._cancel(list(self._tasks))
        self._tasks.clear()
        return items

    @staticmethod
    def _cancel(refs: Sequence[ray.ObjectRef]) -> None:
        for ref in refs:
            ray.cancel(ref, force=True)  # NOTE: force kills the worker: a hung trial never yields
