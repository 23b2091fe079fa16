"""Pacing: how fast a pool beyond ``unpaced_workers`` adds workers while its runners sleep.

Creating a thread whenever the last runner sleeps sizes the pool to every work of a burst that blocks
at once; a runner coming back serves the burst as well without a new thread. So beyond
``unpaced_workers`` a pool adds at most one worker per ``create_interval``, and only while no runner
came back for a whole interval: a pending work waits at most one interval per worker it needs, and
never for a worker that exists (idle workers are woken at once). While most of its sleepers are due
back (:func:`sleepers_due`), it holds off longer.

:class:`Pacer` (``pool.pacer``) owns the pacing timer, the completion count it was armed at and the
count of creations put off. The creation itself is the manager's (``pool.manager``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import timer
from .lockdep import assert_held, must_hold
from .worker import SLEEPING

if TYPE_CHECKING:
    from .pool import WorkerPool


class Pacer:
    """The pacing of one pool's worker creation. (No ``__slots__``: the tests replace
    :meth:`sleepers_due` on an instance to watch the decisions.)"""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool  # I
        self.timer: timer.Timer | None = None  # P: a paced creation is due when it fires
        self.completed = 0  # P: pool.nr_completed when it was armed
        self.nr_paced = 0  # P: creations put off (a runner came back within an interval, or most
        # sleepers are expected back); read at scrape time

    def pace_create_worker(self, delay: float = 0.0) -> None:
        """Every worker is busy and none runs, works wait, and the pool already has
        ``unpaced_workers``: create the next worker after ``create_interval`` unless a work finished
        meanwhile (a runner came back and takes the next work). ``delay``: fire no sooner than this
        (sleepers due back). P: held."""
        pool = self.pool
        assert_held(pool.lock)
        if self.timer is None and not pool.manager.create_pending:
            self.completed = pool.nr_completed
            self.timer = timer.add_timer(max(delay, pool.system.config.create_interval), self._timeout)

    def _timeout(self) -> None:
        """Pacing timer (timer thread): create the worker if still nobody runs, nothing finished,
        and most sleepers are not due back yet."""
        pool = self.pool
        with pool.lock:
            self.timer = None
            if pool.managing or not pool.need_to_create_worker(pool):
                return  # a runner or an idle worker is back; the next one to sleep re-arms
            if pool.nr_completed != self.completed:
                self.nr_paced += 1
                self.pace_create_worker()
                return
            now = time.monotonic()
            due = self.sleepers_due(now) - now
            if due > 0:
                self.nr_paced += 1
                self.pace_create_worker(due)
                return
            manager = pool.manager
            manager.schedule_create_worker(now=True)
            if not manager.create_pending:  # created: the next one is due an interval from now
                self.pace_create_worker()

    @must_hold("pool.lock")
    def sleepers_due(self, now: float) -> float:
        """:func:`sleepers_due` of this pool. P: held."""
        return sleepers_due(self.pool, now)


def sleepers_due(pool: WorkerPool, now: float) -> float:
    """Until when (monotonic time) a paced creation waits for sleepers to come back. Reads ``P``
    fields: its caller holds the lock (a function of them alone, which the tests call on plain objects).

    A sleep counts as expected back while it is younger than twice this pool's average sleep
    (``sleep_avg``, capped at ``create_hold_max``). While at least half of the busy workers are
    such young sleepers, the next wave of returns is near and will serve the waiting works: a
    burst of short waits then reuses the workers of the last burst instead of adding threads.

    The average only learns from sleeps that end. A sleeper older than the window that is not
    followed by any return within the window shows that sleeps here are not short now (works
    that wait for each other, long waits): then nothing is held, and creation goes on one per
    interval however young the newest sleepers are. Returns 0 (no wait) when no sleep was
    measured yet; otherwise the answer may come early (the caller asks again then)."""
    window = min(2 * pool.sleep_avg, pool.system.config.create_hold_max)
    if window <= 0:
        return 0.0
    need = (pool.nr_workers - pool.nr_idle + 1) // 2  # half of the busy workers, rounded up
    if need < 1:
        return 0.0
    cutoff = now - window
    young: list[float] = []
    overdue = False
    for worker in pool.workers:
        if worker.flags & SLEEPING:
            if worker.slept_at > cutoff:
                young.append(worker.slept_at)
            else:
                overdue = True
    if len(young) < need:
        return 0.0
    if not overdue:
        return min(young) + window  # then the oldest one is overdue: ask again
    if pool.woke_at <= cutoff:
        return 0.0  # an overdue sleeper and no return since: the average is stale
    # held until the return ages past the window, or fewer than `need` sleepers are young:
    # that is when the need-th youngest one ages past it
    young.sort()
    return min(young[len(young) - need], pool.woke_at) + window
