"""Workqueues: what users queue works on (the kernel's ``workqueue_struct``).

A workqueue is a name, flags and ``max_active`` (and optionally ``max_running``); its works run on
the shared pools. This module owns :class:`WorkQueue`'s public face: making one (its arguments
checked), queueing a work on it, and what the front-ends read of it. The machinery is in parts,
one concept each, as the sections of the kernel's workqueue.c read; each is a base of WorkQueue:

* :mod:`cmwq_exec.core.wq_state`: the flags, the fields (who may touch each), the state per pool;
* :mod:`cmwq_exec.core.wq_stats`: its figures and its works not yet started;
* :mod:`cmwq_exec.core.wq_active`: max_active and max_running, the inactive list;
* :mod:`cmwq_exec.core.wq_flush`: flush colors, flush and drain;
* :mod:`cmwq_exec.core.wq_queue`: choosing a pool and queueing;
* :mod:`cmwq_exec.core.wq_cancel`: delayed works and cancel;
* :mod:`cmwq_exec.core.wq_lifecycle`: the rescuer, destruction, interpreter exit and fork.

The works themselves (:class:`Work`, :class:`DelayedWork`) and :class:`waiting` are in
:mod:`cmwq_exec.core.work`; all of these names are importable from here.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from . import system as _system
from . import timer
from .lockdep import make_lock
from .work import DelayedWork, Work, waiting
from .wq_lifecycle import Lifecycle, all_workqueues, flush_all
from .wq_state import ALL_FLAGS, BUCKETS, WQ, PoolWorkqueue, check_limit

if TYPE_CHECKING:
    from .pool import WorkerPool
    from .system import System

__all__ = ["BUCKETS", "WQ", "DelayedWork", "PoolWorkqueue", "Work", "WorkQueue", "all_workqueues",
           "flush_all", "waiting"]


class WorkQueue(Lifecycle):
    """A workqueue: a name, flags and ``max_active``, queueing works on the shared pools."""

    def __init__(self, name: str, flags: WQ | int = 0, max_active: int | None = None,
                 max_running: int | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"WorkQueue name must be a non-empty string, got {name!r}")
        try:
            if isinstance(flags, bool) or not isinstance(flags, int) or flags < 0 or flags & ~ALL_FLAGS:
                raise ValueError
            flags = WQ(flags)
        except ValueError:
            raise ValueError(f"WorkQueue flags must be a combination of WQ.UNBOUND, WQ.ORDERED and "
                             f"WQ.RESCUER, got {flags!r}") from None
        check_limit("max_active", max_active)
        check_limit("max_running", max_running)
        if flags & WQ.ORDERED:
            if max_active not in (None, 1):
                raise ValueError(f"an ordered workqueue runs one work at a time: max_active must be 1 "
                                 f"or None, got {max_active!r}")
            if max_running is not None:
                raise ValueError(f"an ordered workqueue runs one work at a time: max_running must be "
                                 f"None, got {max_running!r}")
            flags |= WQ.UNBOUND
            max_active = 1
        self.name = name
        self.flags = flags
        self._system = system = _system.get_system()
        self._unbound = bool(flags & WQ.UNBOUND)
        self._max_active = max_active
        self._max_running = max_running
        self._limited = max_active is not None or max_running is not None
        self._lock = make_lock("workqueue")
        self._nr_active = 0
        self._nr_sleeping = 0
        self._nr_waiting = 0
        self._inactive = deque()
        self._work_color = 0
        self._flush_lock = make_lock("flush")
        self._flush_cond = threading.Condition(self._flush_lock)
        self._flush_seq = 0
        self._nr_flushers = 0
        self._draining = 0
        self._destroyed = False
        self._refusing = None
        self.flush_at_exit = True
        self._pwqs = [PoolWorkqueue(self, pool) for pool in system.pools]
        self._make_rescuer()
        system.add_workqueue(self)
        all_workqueues.add(self)
        if self._unbound:
            system.start_unbound_pool()

    @property
    def system(self) -> System:
        """The set of pools this workqueue's works run on."""
        return self._system

    @property
    def pools(self) -> list[WorkerPool]:
        """The pools its works may run on: the unbound pool for an unbound workqueue, else all."""
        system = self._system
        return [system.unbound_pool] if self._unbound else list(system.pools)

    def queue_work(self, work: Work) -> bool:
        """Queue ``work``. Returns False (and does nothing) if it is already pending."""
        if not isinstance(work, Work):
            raise TypeError(f"queue_work(work): work must be a cmwq_exec.Work, got {type(work).__name__}")
        return self._queue_if_idle(work, None)

    def queue_work_on(self, cpu: int, work: Work) -> bool:
        """Queue ``work`` on the pool of ``cpu`` (another usable pool while that CPU is down)
        instead of the queueing CPU's. An unbound workqueue ignores ``cpu``. Returns False (and does
        nothing) if the work is already pending."""
        if not isinstance(work, Work):
            raise TypeError(f"queue_work_on(cpu, work): work must be a cmwq_exec.Work, got "
                            f"{type(work).__name__}")
        cpus = self._system.cpu_pools
        if isinstance(cpu, bool) or cpu not in cpus:
            raise ValueError(f"queue_work_on(cpu, work): cpu must be one of this process's CPUs "
                             f"{sorted(cpus)}, got {cpu!r}")
        return self._queue_if_idle(work, cpu)

    def queue_delayed_work(self, work: DelayedWork, delay: float) -> bool:
        """Queue ``work`` after ``delay`` seconds. Returns False if it is already pending."""
        if not isinstance(work, DelayedWork):
            raise TypeError(f"queue_delayed_work(work, delay): work must be a cmwq_exec.DelayedWork, "
                            f"got {type(work).__name__}")
        delay = timer.check_delay("queue_delayed_work(work, delay): delay", delay)
        if delay == 0:
            return self.queue_work(work)
        return self._queue_delayed(work, delay)

    def __repr__(self) -> str:
        running = "" if self._max_running is None else f" max_running={self._max_running}"
        return f"<WorkQueue {self.name!r} flags={self.flags!r} max_active={self._max_active}{running}>"
