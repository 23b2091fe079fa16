"""A work's pending state: where a pending work sits, and the wait for a work to be done.

A reusable :class:`cmwq_exec.Work` is *pending* from the moment it is queued until a worker starts
it. Its pending bit (``work._pending``, a lock used as a test-and-set bit) says so; ``work._where``
says where it sits meanwhile. Every change of either happens under the lock of the workqueue that
owns the work (``work._pwq.wq._lock``), with the pool lock too where a pool's list changes, except
the two a worker makes under the pool lock alone (taking a work off the worklist, handing it to the
worker already running it). So whoever holds both locks sees a pending work in exactly one place,
and cancelling never waits for a work "in transit".

A call submitted to an executor (:class:`cmwq_exec.CMWQFuture`) is a one-shot work: its future's
state is its pending state, and ``_where`` is kept for reading only.
"""

from __future__ import annotations

import enum
import os
import threading

from .lockdep import make_lock


class Where(enum.Enum):
    """Where a pending work sits."""

    NOWHERE = 0  # not pending (it may be running)
    TIMER = 1  # a delayed work waiting for its timer
    INACTIVE = 2  # on its workqueue's inactive list, waiting for a max_active slot
    WORKLIST = 3  # on a pool's worklist
    SCHEDULED = 4  # handed to the worker that runs its previous run (non-reentrancy)


NOWHERE = Where.NOWHERE
TIMER = Where.TIMER
INACTIVE = Where.INACTIVE
WORKLIST = Where.WORKLIST
SCHEDULED = Where.SCHEDULED


class WorkFlush:
    """The condition that ``Work.flush()`` waits on: notified when a reusable work finishes a run
    or stops being pending (cancelled), while anyone waits. One for the process: flushes of single
    works are rare, and a work may move between pools and workqueues while one waits for it."""

    def __init__(self) -> None:
        # ``with self.lock``, never ``with self.cond``: Condition.__enter__ is a Python function,
        # and an exception raised as it returns (a Ctrl-C, a Celery time limit) would keep the lock
        self.lock = make_lock("flush")  # I: the F of waiters
        self.cond = threading.Condition(self.lock)  # I
        self.waiters = 0  # F; read without it by notifiers (see notify)

    def notify(self) -> None:
        """A work's run ended or its pending state was released. Callers test ``waiters`` first,
        after making the change: a waiter counts itself before it looks at the work, so either it
        sees the change or its count is seen here."""
        with self.lock:
            self.cond.notify_all()

    def after_fork(self) -> None:
        self.__init__()  # type: ignore[misc]


work_flush = WorkFlush()
os.register_at_fork(after_in_child=work_flush.after_fork)
