"""The suite's one way to wait for a state: poll a predicate until it holds or a timeout passes.

Tests never sleep for a fixed time to let something happen; they say what they wait for and how
long they give it. Kept free of pytest and of the package, so that the benchmarks (which import the
Celery harness) can use it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["wait_for"]


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 20.0,
             interval: float | None = None) -> Any:
    """Call ``predicate`` until it returns something truthy, and return that; after ``timeout``
    seconds raise AssertionError saying ``what`` was awaited. It is called every ``interval``
    seconds if given, else after 1 ms, then each time twice as late up to 50 ms: an in-process
    state is seen at once, a broker or a subprocess is not polled in a tight loop."""
    deadline = time.monotonic() + timeout
    pause = 0.001 if interval is None else interval
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(pause)
        if interval is None:
            pause = min(pause * 2, 0.05)
