"""max_active and max_running: how many works of a workqueue are active, and running, at once.

``max_active`` limits how many works of the workqueue are active (queued on a pool's worklist or
running) at once, system-wide, for every kind of workqueue; works beyond it wait, in order, on the
workqueue's inactive list. The kernel counts it per CPU for per-CPU workqueues; here every thread
shares one interpreter (and, on most builds, one GIL), so a per-CPU limit would only make the number
depend on the machine. ``None`` means no limit: concurrency management alone decides, at no cost on
the hot path.

``max_running`` (optional) limits how many of the active works are *running*, that is not asleep
inside :func:`cmwq_exec.blocking` (or a wait that says so itself), at once, system-wide: a work that
goes to sleep hands its running slot to the first waiting work and takes it back when it wakes, so
for a moment up to ``max_running`` plus the works woken meanwhile run. ``max_active`` still bounds
every active work, asleep or not. This is concurrency management at the workqueue's level, for
callers that count "how many at once" in running tasks (the Celery pool's ``-c``); a wait the
watchdog finds without an annotation does not give a slot back.

This module owns the counts behind both limits (``_nr_active``, ``_nr_sleeping``, ``_nr_waiting``),
the inactive list's activation, and changing the limits at run time.
"""

from __future__ import annotations

from typing import Any, cast

from . import timer
from .interfaces import SlotHolder, WorkQueueOps
from .interrupts import deferred_interrupts
from .lockdep import assert_held, must_hold
from .pending import WORKLIST
from .wq_state import KEEP, WQ, check_limit, state_of
from .wq_stats import WorkQueueStats


class ActiveLimits(WorkQueueStats):
    """A workqueue's max_active and max_running."""

    @property
    def max_active(self) -> int | None:
        return self._max_active

    @property
    def max_running(self) -> int | None:
        return self._max_running

    @must_hold("_lock")
    def _may_activate_locked(self) -> bool:
        """One more work may become active. W: held.

        Works waiting for other works (``_nr_waiting``) hold no max_active slot; works asleep
        (``_nr_sleeping``, counted only with max_running) hold no running slot."""
        max_active, max_running = self._max_active, self._max_running
        return ((max_active is None or self._nr_active - self._nr_waiting < max_active)
                and (max_running is None or self._nr_active - self._nr_sleeping < max_running))

    def _activate_locked(self) -> None:
        """Move waiting works to their pools while the limits allow, in order. W: held.

        Each move pops in a ``try`` and appends in its ``finally``: an interruption between the
        two cannot lose the work (see cmwq_exec.core.interrupts, rule 3)."""
        assert_held(self._lock)
        inactive = self._inactive
        while inactive and self._may_activate_locked():
            work = inactive[0]
            pool = state_of(work).pool
            with pool.lock:
                pool.prepare_insert()
                work._counted = True
                work._where = WORKLIST
                self._nr_active += 1
                try:
                    inactive.popleft()
                finally:
                    pool.worklist.append(work)
                pool.kick()

    @must_hold("_lock")
    def _slot_freed_locked(self) -> None:
        """A work holding a slot finished or was cancelled: pass its slot on. W: held."""
        self._nr_active -= 1
        if self._inactive:
            self._activate_locked()

    def _work_done(self) -> None:
        """A work of a limited workqueue finished: pass its slot on. No lock held."""
        with self._lock:
            self._slot_freed_locked()

    def _work_sleeps(self, worker: SlotHolder) -> None:
        """``worker``'s work (holding a slot) went to sleep: its running slot is free until it wakes.

        Runs on the sleeping work's own thread, where a Celery time limit may inject an exception:
        the count changes in straight-line code under the lock, and waiting works are activated by
        the timer thread, so an exception can only cost that activation (the next completion or
        sleep does it), never a work taken off the inactive list and not yet put on a pool. The
        timer is only bothered when a waiting work may start now (not when max_active binds)."""
        with self._lock:
            if worker.sleeping_wq is None:
                worker.sleeping_wq = cast("WorkQueueOps", self)
                self._nr_sleeping += 1
            self._activate_soon_locked()

    def _work_wakes(self, worker: SlotHolder) -> None:
        """``worker``'s work woke up: it runs again and counts against max_running (straight-line,
        as in _work_sleeps)."""
        with self._lock:
            if worker.sleeping_wq is cast("WorkQueueOps", self):
                worker.sleeping_wq = None
                self._nr_sleeping -= 1

    def _work_waits(self, worker: SlotHolder) -> None:
        """``worker``'s work (holding a slot) waits for another work: its max_active slot is free
        until the wait ends, so the awaited work can start whatever the limit (as _work_sleeps)."""
        with self._lock:
            if worker.waiting_wq is None:
                worker.waiting_wq = cast("WorkQueueOps", self)
                self._nr_waiting += 1
            self._activate_soon_locked()

    def _activate_soon_locked(self) -> None:
        """A slot was given up: have the timer thread start a waiting work, if one may start now
        (not when max_active binds). W: held (the timer's lock is a leaf)."""
        assert_held(self._lock)
        if self._inactive and self._may_activate_locked():
            timer.add_timer(0.0, self._activate_waiting)

    def _work_stops_waiting(self, worker: SlotHolder) -> None:
        """The wait is over: the work holds its slot again (for a moment the workqueue may run one
        work more than max_active: the one it waited for may still be running)."""
        with self._lock:
            if worker.waiting_wq is cast("WorkQueueOps", self):
                worker.waiting_wq = None
                self._nr_waiting -= 1

    def _activate_waiting(self) -> None:
        """Start the waiting works the limits now allow (on the timer thread)."""
        with self._lock:
            self._activate_locked()

    def set_max_active(self, max_active: int | None, max_running: Any = KEEP) -> None:
        """Change ``max_active`` (and ``max_running``, if given) at run time; raising a limit starts
        waiting works at once."""
        check_limit("max_active", max_active)
        if max_running is not KEEP:
            check_limit("max_running", max_running)
        if self.flags & WQ.ORDERED and (max_active != 1 or max_running not in (KEEP, None)):
            raise ValueError(f"workqueue {self.name!r} is ordered: max_active stays 1, max_running None")
        with deferred_interrupts(), self._lock:
            # _nr_active counts the works holding a slot (work._counted): works queued while there
            # was no limit hold none, finish as they are, and never give one back
            self._max_active = max_active
            if max_running is not KEEP:
                self._max_running = max_running
            self._limited = max_active is not None or self._max_running is not None
            self._activate_locked()  # all of them if there is no limit any more
