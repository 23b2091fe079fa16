"""Helpers shared by the test modules (tests/ is on sys.path: ``from helpers import wait_for``)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cmwq_exec import Work, WorkQueue, blocking, plugin


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 20.0,
             interval: float = 0.005) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; fail after ``timeout``
    seconds saying what was awaited. Tests wait for states this way, never with a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def hold_works(wq: WorkQueue, n: int, gate: threading.Event) -> tuple[list[Work], Callable[[], int]]:
    """Queue ``n`` works that each wait inside blocking() until ``gate`` is set; return them and a
    function telling how many have started."""
    started = []

    def hold() -> None:
        started.append(threading.get_ident())
        with blocking():
            assert gate.wait(30), "gate never opened"

    works = [Work(hold) for _ in range(n)]
    for work in works:
        assert wq.queue_work(work)
    return works, lambda: len(started)


@contextlib.contextmanager
def registered(obj: Any, prefix: str) -> Iterator[Any]:
    """Register ``obj`` as a cmwq_exec plugin under a unique name for the block; yield it."""
    name = plugin.register(obj, name=f"{prefix}-{uuid.uuid4().hex[:6]}")
    try:
        yield obj
    finally:
        plugin.unregister(name=name)
