"""One timer thread for every pool: mayday timers, idle timers, delayed works, watchdog ticks.

The kernel's ``timer_list`` in a userspace shape: a heap of deadlines served by a single daemon
thread that sleeps until the next one. Callbacks run on that thread, must be short and must not
block (they take a pool lock, queue a work, wake a worker).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("cmwq_exec.timer")


class Timer:
    """A pending callback. ``cancel()`` returns True if it had not fired (and now never will)."""

    __slots__ = ("deadline", "callback", "state")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.state = 0  # 0 pending, 1 fired, 2 cancelled; L: the wheel's lock

    def cancel(self) -> bool:
        with _wheel.cond:
            if self.state != 0:
                return False
            self.state = 2
            return True

    @property
    def pending(self) -> bool:
        return self.state == 0


class _Wheel:
    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.heap: list[tuple[float, int, Timer]] = []  # L: cond
        self.seq = itertools.count()
        self.thread: threading.Thread | None = None  # L: cond

    def add(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        with self.cond:
            head = self.heap[0][0] if self.heap else None
            heapq.heappush(self.heap, (timer.deadline, next(self.seq), timer))
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="cmwq-timer", daemon=True)
                self.thread.start()
            elif head is None or timer.deadline < head:
                self.cond.notify()
        return timer

    def run(self) -> None:
        cond, heap = self.cond, self.heap
        while True:
            with cond:
                while True:
                    while heap and heap[0][2].state == 2:
                        heapq.heappop(heap)
                    now = time.monotonic()
                    if heap and heap[0][0] <= now:
                        timer = heapq.heappop(heap)[2]
                        timer.state = 1
                        break
                    cond.wait(heap[0][0] - now if heap else None)
            try:
                timer.callback()
            except Exception:
                log.exception("cmwq_exec timer callback %r raised", timer.callback)

    def after_fork(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.heap = []
        self.thread = None


_wheel = _Wheel()
os.register_at_fork(after_in_child=_wheel.after_fork)


def add_timer(delay: float, callback: Callable[[], None]) -> Timer:
    """Call ``callback`` on the timer thread after ``delay`` seconds."""
    return _wheel.add(delay, callback)
