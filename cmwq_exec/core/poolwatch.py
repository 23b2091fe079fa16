"""The watchdog's state of one pool (``pool.watch``): its last sign of progress and what it found.

:class:`cmwq_exec.core.watchdog.Watchdog` reads and writes these, under the pool lock, when it arms
a look at the pool and on every look. Whether a look is armed (``pool.watchdog_armed``) stays on the
pool itself: every queueing reads it.
"""

from __future__ import annotations

import time


class PoolWatch:
    """Progress and findings of the watchdog for one pool (fields ``P``: under the pool lock)."""

    __slots__ = ("cpu_intensive", "progress_at", "stall_warned", "started")

    def __init__(self) -> None:
        self.started = 0  # P: pool.nr_started at the last sign of progress
        self.progress_at = time.monotonic()  # P: when that was
        self.stall_warned = False  # P: the current stall was reported
        self.cpu_intensive = 0  # P: workers found hogging the CPU (a counter read at scrape time)
