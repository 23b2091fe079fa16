"""A workqueue's state: its flags, its fields (who may touch each), and its state on each pool.

This module owns the workqueue's flags (:class:`WQ`), the check of its limits, the declaration of
every field a :class:`cmwq_exec.core.workqueue.WorkQueue` has (:class:`WorkQueueState`, the base
of the parts it is made of, with the core's legend letters: see :mod:`cmwq_exec.core.lockdep`)
and :class:`PoolWorkqueue`, a workqueue's state on one pool: the in-flight counts that flushing
waits on and the counters that metrics read.
"""

from __future__ import annotations

import bisect
import enum
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from .interfaces import WorkItem, WorkQueueOps
from .lockdep import must_hold

if TYPE_CHECKING:
    from .pool import WorkerPool
    from .system import System
    from .worker import Rescuer

#: Histogram buckets (seconds): fine below a millisecond, where a pool's latency lives.
BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
           0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


class WQ(enum.IntFlag):
    """Workqueue flags."""

    #: Works run on the unbound pool (not bound to a CPU) instead of the queueing CPU's pool.
    UNBOUND = 1
    #: Strict FIFO, one work at a time (implies UNBOUND and max_active=1).
    ORDERED = 2
    #: Reserve a rescuer thread: works make progress even when no worker can be created.
    RESCUER = 4


#: set_max_active(): leave max_running as it is
KEEP: Any = object()

#: every defined flag bit, as a plain int (~ on an IntFlag stays within its members since 3.11)
ALL_FLAGS = int(WQ.UNBOUND | WQ.ORDERED | WQ.RESCUER)


def check_limit(name: str, value: object) -> None:
    """``max_active`` or ``max_running``: a positive int or None, else ValueError naming it."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None (no limit), got {value!r}")


class WorkQueueState:
    """The fields of a workqueue, declared once for the parts it is made of (set by
    ``WorkQueue.__init__``, and again in a forked child by ``_reset_after_fork``)."""

    name: str  # I
    flags: WQ  # I
    _system: System  # I (the child's system after a fork)
    _unbound: bool  # I
    _max_active: int | None  # W; read racily on the hot path (a stale limit admits or defers one work)
    _max_running: int | None  # W; as _max_active
    _limited: bool  # W; as _max_active
    _lock: Any  # I: the workqueue's lock (make_lock("workqueue"))
    _nr_active: int  # W: works of a limited workqueue on a worklist or running
    _nr_sleeping: int  # W: of those, asleep in blocking() (counted if max_running is set)
    _nr_waiting: int  # W: of those, waiting for another work (no max_active slot held)
    _inactive: deque[WorkItem]  # W+P: works waiting for max_active
    _work_color: int  # F: the color new works get
    # ``with self._flush_lock`` (a plain lock, whose __enter__ is C), never ``with`` the
    # Condition: its __enter__ is a Python function, and an exception raised as it returns would
    # keep the lock, which workers take (under a pool lock) when a color drains
    _flush_lock: Any  # I (make_lock("flush"))
    _flush_cond: threading.Condition  # I, over _flush_lock
    _flush_seq: int  # F: bumped when a color count reaches zero
    _nr_flushers: int  # F; read racily by _drop_in_flight (a flusher counts itself before it looks)
    _draining: int  # F; read racily by the queueing paths (then checked under W)
    _destroyed: bool  # X: set once by destroy() or the pools' shutdown; read racily
    _refusing: str | None  # W+P: one-shot works are refused with this (refuse_calls)
    flush_at_exit: bool  # I: interpreter exit waits for its works (the Celery pool's: no)
    _pwqs: list[PoolWorkqueue]  # I: its state on each pool, by pool index
    _rescuer: Rescuer | None  # I


class PoolWorkqueue:
    """A workqueue's state on one pool (the kernel's ``cpu_workqueue_struct``). ``wq`` and ``pool``
    are I; every other field is P (``pool.lock``)."""

    __slots__ = ("wq", "pool", "in_flight", "nr_started", "nr_completed", "nr_cm_wakeups",
                 "nr_cpu_intensive", "nr_mayday", "nr_rescued", "latency", "execution",
                 "latency_sum", "execution_sum", "cpu_sum")

    def __init__(self, wq: WorkQueueOps, pool: WorkerPool) -> None:
        self.wq = wq
        self.pool = pool
        self.in_flight: dict[int, int] = {}  # flush color -> works queued and not finished
        self.nr_started = 0
        self.nr_completed = 0
        self.nr_cm_wakeups = 0
        self.nr_cpu_intensive = 0
        self.nr_mayday = 0
        self.nr_rescued = 0
        self.latency = [0] * len(BUCKETS)
        self.execution = [0] * len(BUCKETS)
        self.latency_sum = 0.0
        self.execution_sum = 0.0
        self.cpu_sum = 0.0

    @must_hold("pool.lock")
    def observe(self, latency: float, execution: float, cpu: float) -> None:
        """Record one work's queue latency, run time and CPU time. P: held."""
        self.latency[bisect.bisect_left(BUCKETS, latency)] += 1
        self.execution[bisect.bisect_left(BUCKETS, execution)] += 1
        self.latency_sum += latency
        self.execution_sum += execution
        self.cpu_sum += cpu


def state_of(work: WorkItem) -> PoolWorkqueue:
    """The state (on its pool) of the workqueue a queued work belongs to: always one of ours."""
    return cast(PoolWorkqueue, work._pwq)
