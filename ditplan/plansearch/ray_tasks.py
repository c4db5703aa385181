"""Ray for a driver: connecting (a cluster it is given, or a local instance of its own) and its
in-flight tasks, each with a deadline.

:class:`TaskPool` knows nothing about trials: it holds an opaque item per task and hands back what each
task gave (its result, or the one-line reason it failed: it raised, its worker died, it ran past its
deadline). The driver never waits on Ray longer than it asks to, and a task past its deadline is cancelled.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import ray

from ditplan.errors import UserError


def resolve_ray_address(given: str | None) -> str | None:
    """The Ray cluster a search connects to: ``given`` (``--ray-address``), else ``RAY_ADDRESS``, else None (a
    local instance of its own). A ``host:port`` (or ``ray://host:port``) that accepts no connection within 5 s
    is a :class:`UserError` — ``ray.init`` would retry it for many minutes — raised before anything is written."""
    address, source = (given, "--ray-address") if given else (os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS")
    if address is None or address in ("auto", "local"):
        return address
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise UserError(f"{source} {address!r} is not host:port; give the address `ray start --head` prints, "
                        "e.g. 127.0.0.1:6379")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise UserError(f"no Ray cluster answers at {source} {address!r} ({err.strerror or err}); check the address, "
                        "or leave --ray-address and RAY_ADDRESS out to start a local Ray instance") from None
    return address


def ray_init_options() -> dict[str, Any]:
    """``ray.init`` options of every driver: no dashboard, no usage stats, worker logs kept off the driver's
    console, and workers that import what the driver imports (its working directory on their path)."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p),
           "RAY_USAGE_STATS_ENABLED": "0"}
    return {"include_dashboard": False, "runtime_env": {"env_vars": env}, "log_to_driver": False}


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connect to Ray for the block (``address``, from :func:`resolve_ray_address`) or start a local instance
    of its own — never one found on the machine (a ``ray start`` cluster of someone else's); shut down after
    the block only what this call connected to."""
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, **ray_init_options())
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), **ray_init_options())
    try:
        yield
    finally:
        ray.shutdown()


class LazyRay:
    """Ray for a block, connected (:func:`ray_session`) on the first :meth:`connect`: a driver with nothing
    left to run starts none. Use as a context manager; what it connected is shut down at its end."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._stack = ExitStack()
        self._connected = False

    def connect(self) -> None:
        if not self._connected:
            self._stack.enter_context(ray_session(self.address))
            self._connected = True

    def __enter__(self) -> LazyRay:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


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
