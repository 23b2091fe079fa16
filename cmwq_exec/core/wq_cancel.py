"""Delayed works and cancel: a work's timer, and taking a pending work off wherever it sits.

This module owns queueing a :class:`cmwq_exec.DelayedWork` on its timer, the timer's firing (or a
flush that wants the work now), and cancelling a pending work of the workqueue: off its timer,
its workqueue's inactive list, a pool's worklist or the list of the worker running its previous
run (see :mod:`cmwq_exec.core.pending` for where a pending work may sit). Once a work is taken off
its list, the rest is done in ``finally`` blocks (see :mod:`cmwq_exec.core.interrupts`).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from . import timer
from .interrupts import deferred_interrupts
from .lockdep import assert_held
from .pending import INACTIVE, NOWHERE, SCHEDULED, TIMER, WORKLIST, work_flush
from .wq_queue import Queueing
from .wq_state import state_of

if TYPE_CHECKING:
    from .work import DelayedWork, Work

log = logging.getLogger("cmwq_exec.workqueue")


class DelayedAndCancel(Queueing):
    """A workqueue's delayed works and cancel."""

    def _queue_delayed(self, work: DelayedWork, delay: float) -> bool:
        """Take the pending bit and start the work's timer; False if the work is already pending."""
        with deferred_interrupts(), self._lock:
            self._check_open()
            try:
                if not work._pending.acquire(False):
                    return False
                work._pwq = self._pwqs[self._system.unbound_pool.index]  # the owner, until it fires
                tm = timer.add_timer(delay, functools.partial(self._fire_delayed, work))
                work._timer = tm
                work._where = TIMER
            except BaseException:
                if work._where is NOWHERE and work._pending.locked():
                    work._pending.release()
                raise
        return True

    def _fire_delayed(self, work: DelayedWork, now: bool = False) -> None:
        """A delayed work's timer fired (on the timer thread), or ``flush()`` wants it now: queue it
        if it still waits for its timer. A destroyed workqueue cancels it, with a warning.

        A timer that fired after the work was cancelled and queued again with a new timer finds
        that new timer still pending and leaves the work to it."""
        pool = self._select_pool(work, None)
        with deferred_interrupts(), self._lock:
            tm = work._timer
            if work._where is not TIMER or tm is None or (tm.pending and not now):
                return  # cancelled, or waiting for another timer
            if now:
                tm.cancel()  # if it fires meanwhile, its callback finds the work queued
            if self._destroyed:
                log.warning("workqueue %r was destroyed while %r waited for its delay: cancelled",
                            self.name, work)
                work._where = NOWHERE
                work._pending.release()
                if work_flush.waiters:
                    work_flush.notify()
                return
            work._where = NOWHERE
            try:
                self._place(work, pool)
            except BaseException:
                work._pending.release()
                raise

    def _cancel_locked(self, work: Work) -> bool | None:
        """Cancel a pending work of this workqueue. W: held. True if it was pending here (and now
        is not), False if it was not pending, None if it is pending but not (yet) placed here.

        Once the work is taken off its list, the rest (its in-flight count, its slot, its pending
        bit) is done in ``finally`` blocks: an interruption cannot leave it half cancelled."""
        assert_held(self._lock)
        where = work._where
        pwq = state_of(work)
        if where is NOWHERE:
            with pwq.pool.lock:  # a worker releases the bit under the pool lock
                if not work._pending.locked():
                    return False
            return None
        pool = pwq.pool
        taken = counted = False
        try:
            if where is TIMER:
                taken = True
                work._where = NOWHERE
                tm = work._timer
                if tm is not None:
                    tm.cancel()  # if it fired already, its callback finds the work no longer waiting
            elif where is INACTIVE:
                with pool.lock:
                    taken = True
                    work._where = NOWHERE
                    try:
                        self._inactive.remove(work)
                    finally:
                        self._drop_in_flight(pwq, work._color)
            else:  # on a pool's worklist or a worker's scheduled list
                with pool.lock:
                    if work._where is not where:  # a worker took it meanwhile (under the pool lock)
                        return False
                    counted = work._counted
                    taken = True
                    work._where = NOWHERE
                    try:
                        if where is WORKLIST:
                            pool.worklist.remove(work)
                        else:
                            assert where is SCHEDULED and work._worker is not None  # running its last run
                            work._worker.scheduled.remove(work)
                    finally:
                        self._drop_in_flight(pwq, work._color)
        finally:
            if taken:
                try:
                    if counted:
                        self._slot_freed_locked()
                finally:
                    work._pending.release()
                    if work_flush.waiters:
                        work_flush.notify()
        return True
