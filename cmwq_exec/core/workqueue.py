"""Workqueues and works: what users queue, and the per-pool state of each workqueue.

A workqueue is a name, flags and ``max_active``; its works run on the shared pools. Per pool it has a
:class:`PoolWorkqueue` (the kernel's ``cpu_workqueue_struct``) holding the in-flight counts that
flushing waits on and the counters that metrics read.

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
"""

from __future__ import annotations

import bisect
import enum
import functools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast

from . import hooks, timer
from . import pool as _pool
from . import system as _system
from .cpus import current_cpu
from .interfaces import QueueState, ReusableWork, RunningWorker, SlotHolder, WorkItem
from .interrupts import deferred_interrupts
from .lockdep import make_lock
from .pending import INACTIVE, NOWHERE, SCHEDULED, TIMER, WORKLIST, work_flush
from .worker import Rescuer, current, current_worker

if TYPE_CHECKING:
    from .pool import WorkerPool

log = logging.getLogger("cmwq_exec.workqueue")

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
_KEEP: Any = object()

#: every defined flag bit, as a plain int (~ on an IntFlag stays within its members since 3.11)
_ALL_FLAGS = int(WQ.UNBOUND | WQ.ORDERED | WQ.RESCUER)


class PoolWorkqueue:
    """A workqueue's state on one pool. All fields ``L:`` under ``pool.lock``."""

    __slots__ = ("wq", "pool", "in_flight", "nr_started", "nr_completed", "nr_cm_wakeups",
                 "nr_cpu_intensive", "nr_mayday", "nr_rescued", "latency", "execution",
                 "latency_sum", "execution_sum", "cpu_sum")

    def __init__(self, wq: WorkQueue, pool: WorkerPool) -> None:
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

    def observe(self, latency: float, execution: float, cpu: float) -> None:
        """Record one work's queue latency, run time and CPU time. L: held."""
        self.latency[bisect.bisect_left(BUCKETS, latency)] += 1
        self.execution[bisect.bisect_left(BUCKETS, execution)] += 1
        self.latency_sum += latency
        self.execution_sum += execution
        self.cpu_sum += cpu


class Work:
    """A reusable work item (the kernel's ``work_struct``): ``fn(*args, **kwargs)`` runs on a worker.

    A work is *pending* from the moment it is queued until a worker starts it; queueing a pending
    work does nothing and returns False. A work never runs concurrently with itself: queued again
    while it runs, it runs again after, on the same pool. Exceptions are logged (a work has no
    caller to return to); use :class:`cmwq_exec.CMWQExecutor` for results. Its pending state is
    described in :mod:`cmwq_exec.core.pending`.
    """

    _reusable: ClassVar[bool] = True
    __slots__ = ("fn", "args", "kwargs", "_pending", "_pwq", "_color", "_queued_at", "_counted", "_worker",
                 "_where", "_timer", "__weakref__")

    def __init__(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        if not callable(fn):
            raise TypeError(f"Work(fn): fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self._pending = threading.Lock()  # locked while pending: test-and-set is acquire(False)
        self._pwq: QueueState | None = None  # the owning workqueue's state on the chosen pool
        self._color = 0
        self._queued_at = 0.0
        self._counted = False  # holds a max_active slot of its workqueue (set under wq._lock)
        self._worker: RunningWorker | None = None  # L: the worker running it
        self._where = NOWHERE  # wq._lock (and L for pool lists): where it sits while pending
        self._timer: timer.Timer | None = None

    def _execute(self) -> BaseException | None:
        try:
            self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            log.exception("work %r raised", self)
            return exc
        return None

    @property
    def pending(self) -> bool:
        """Queued and not yet started."""
        return self._pending.locked()

    @property
    def running(self) -> bool:
        return self._worker is not None

    def cancel(self) -> bool:
        """Take the work off its queue if pending. Returns True if it was pending (and now is not).
        A run already started is not interrupted."""
        while True:
            if self._pwq is None:
                return False  # never queued
            wq = _state_of(self).wq
            with deferred_interrupts(), wq._lock:
                if self._pwq is None or self._pwq.wq is not wq:
                    continue  # queued on another workqueue meanwhile: ask that one
                answer = wq._cancel_locked(self)
            if answer is not None:
                return answer
            # Pending, but placed by no workqueue: another workqueue is queueing it at this very
            # moment (the same work queued on two workqueues at once) and has not yet recorded
            # itself as the owner. The only wait of this kind; it lasts a few bytecodes.
            time.sleep(0)

    def flush(self) -> bool:
        """Wait until the work is neither pending nor running. Returns True if it had to wait."""
        worker = current_worker()
        if worker is not None and worker.current_work is self:
            raise RuntimeError("a work cannot flush itself: it would wait for its own end")
        if self._pwq is None:
            return False
        waited = False
        cond = work_flush.cond
        with waiting(worker):
            with work_flush.lock:  # not the Condition (see WorkFlush)
                work_flush.waiters += 1
                try:
                    while self._pending.locked() or self._worker is not None:
                        cond.wait()
                        waited = True
                finally:
                    work_flush.waiters -= 1
        return waited

    def cancel_sync(self) -> bool:
        """Cancel, then wait for a run in progress to end. On return the work is neither pending nor
        running (unless it queued itself again meanwhile). Returns True if it was pending."""
        grabbed = self.cancel()
        self.flush()
        return grabbed

    def __repr__(self) -> str:
        return f"<Work {getattr(self.fn, '__qualname__', self.fn)!s} pending={self.pending}>"


class DelayedWork(Work):
    """A work queued after a delay (``WorkQueue.queue_delayed_work``)."""

    __slots__ = ()

    def flush(self) -> bool:
        """Queue it now if its timer is still pending, then wait for it (flush_delayed_work).

        If its workqueue was destroyed meanwhile, the work is cancelled (with a warning) instead."""
        if self._pwq is not None and self._where is TIMER:
            _state_of(self).wq._fire_delayed(self, now=True)
        return super().flush()


class waiting:
    """``with waiting(worker):`` around a wait for other works: the worker sleeps (another worker
    takes over) and gives its max_active slot up meanwhile (the awaited work can start). A no-op
    outside a worker."""

    __slots__ = ("worker", "began")

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.began = False

    def __enter__(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.sleep_begin()
            self.began = worker.wait_begin()

    def __exit__(self, *exc_info: Any) -> None:
        worker = self.worker
        if worker is not None:
            worker.wait_end(self.began)
            worker.sleep_end()


class WorkQueue:
    """A workqueue: a name, flags and ``max_active``, queueing works on the shared pools."""

    def __init__(self, name: str, flags: WQ | int = 0, max_active: int | None = None,
                 max_running: int | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"WorkQueue name must be a non-empty string, got {name!r}")
        try:
            if isinstance(flags, bool) or not isinstance(flags, int) or flags < 0 or flags & ~_ALL_FLAGS:
                raise ValueError
            flags = WQ(flags)
        except ValueError:
            raise ValueError(f"WorkQueue flags must be a combination of WQ.UNBOUND, WQ.ORDERED and "
                             f"WQ.RESCUER, got {flags!r}") from None
        _check_limit("max_active", max_active)
        _check_limit("max_running", max_running)
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
        self._max_active = max_active  # L: _lock to change; read racily on the hot path
        self._max_running = max_running  # L: as _max_active
        self._limited = max_active is not None or max_running is not None  # L: as _max_active
        self._lock = make_lock("workqueue")
        self._nr_active = 0  # _lock: works of a limited workqueue on a worklist or running
        self._nr_sleeping = 0  # _lock: of those, asleep in blocking() (counted if max_running is set)
        self._nr_waiting = 0  # _lock: of those, waiting for another work (no max_active slot held)
        self._inactive: deque[WorkItem] = deque()  # _lock: works waiting for max_active
        self._work_color = 0  # _flush_lock: the color new works get
        # ``with self._flush_lock`` (a plain lock, whose __enter__ is C), never ``with`` the
        # Condition: its __enter__ is a Python function, and a Ctrl-C raised as it returns would
        # keep the lock, which workers take (under a pool lock) when a color drains
        self._flush_lock = make_lock("flush")
        self._flush_cond = threading.Condition(self._flush_lock)
        self._flush_seq = 0  # _flush_lock: bumped when a color count reaches zero
        self._nr_flushers = 0  # _flush_lock
        self._draining = 0
        self._destroyed = False
        self._refusing: str | None = None  # one-shot works are refused with this (refuse_calls)
        self._flush_at_exit = True  # interpreter exit waits for its works (the Celery pool's: no)
        self._pwqs = [PoolWorkqueue(self, pool) for pool in system.pools]
        self._make_rescuer()
        system.add_workqueue(self)
        all_workqueues.add(self)
        if self._unbound:
            system.start_unbound_pool()

    # -- queueing ---------------------------------------------------------------------------------

    @property
    def max_active(self) -> int | None:
        return self._max_active

    @property
    def max_running(self) -> int | None:
        return self._max_running

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

    def _queue_if_idle(self, work: Work, cpu: int | None) -> bool:
        """Take the pending bit and queue; False if the work is already pending."""
        with deferred_interrupts(), self._lock:
            try:
                if not work._pending.acquire(False):
                    return False
                self._check_open()
                self._place(work, self._select_pool(work, cpu))
            except BaseException:
                if work._where is NOWHERE and work._pending.locked():
                    work._pending.release()  # taken here and placed nowhere
                raise
        return True

    def queue_delayed_work(self, work: DelayedWork, delay: float) -> bool:
        """Queue ``work`` after ``delay`` seconds. Returns False if it is already pending."""
        if not isinstance(work, DelayedWork):
            raise TypeError(f"queue_delayed_work(work, delay): work must be a cmwq_exec.DelayedWork, "
                            f"got {type(work).__name__}")
        delay = timer.check_delay("queue_delayed_work(work, delay): delay", delay)
        if delay == 0:
            return self.queue_work(work)
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

    def _make_rescuer(self) -> None:
        """The rescuer, if the flags ask for one: reserved up front, as in the kernel (a workqueue
        whose rescuer cannot start is not made, RuntimeError)."""
        self._rescuer = Rescuer(self, self._system) if self.flags & WQ.RESCUER else None
        if self._rescuer is not None:
            weakref.finalize(self, self._rescuer.stop)  # nobody can queue on it any more

    def _check_open(self) -> None:
        if self._destroyed:
            raise RuntimeError(f"workqueue {self.name!r} is destroyed: no new works")
        if self._draining:
            worker = current_worker()
            pwq = worker.current_pwq if worker is not None else None
            if pwq is None or pwq.wq is not self:
                raise RuntimeError(f"workqueue {self.name!r} is draining: only its own works may "
                                   "queue works on it until drain() returns")

    def _select_pool(self, work: WorkItem, cpu: int | None) -> WorkerPool:
        running = cast("ReusableWork", work)._worker if work._reusable else None
        if running is not None:
            # non-reentrancy: where it runs now, whatever the workqueue (even an unbound one), so
            # the running worker takes it over under one pool lock
            return cast("WorkerPool", running.pool)  # a worker's pool is a WorkerPool
        return self._pool_for(cpu)

    def _pool_for(self, cpu: int | None) -> WorkerPool:
        """The pool a work that is not running anywhere goes to (a one-shot work: always)."""
        system = self._system
        if self._unbound:
            return system.unbound_pool
        if cpu is not None:  # queue_work_on()
            return system.usable_pool(cpu)
        worker = current.worker
        if worker is not None and worker.pool.online and worker.pool.cpu is not None:
            pool = cast("WorkerPool", worker.pool)
        else:  # system.local_pool(), its common case inlined
            cpu = current_cpu()
            local = system.cpu_pools.get(cpu)
            pool = local if local is not None and local.online else system.usable_pool(cpu)
        select = hooks.current_policy.select_pool
        if select is not None:
            pool = select(workqueue=self, pools=system.online_pools, current_pool=pool)
        return pool

    def _queue(self, work: WorkItem, cpu: int | None = None) -> None:
        """Queue a one-shot work (a submitted call): the hot path of every submit."""
        if self._draining or self._destroyed:
            self._check_open()
        pool = self._pool_for(cpu)  # a one-shot work runs nowhere yet
        if self._limited:
            with self._lock:
                if self._refusing is not None:
                    raise RuntimeError(self._refusing)
                self._place(work, pool)
            return
        with pool.lock:
            if self._refusing is not None:
                raise RuntimeError(self._refusing)
            self._insert_locked(work, pool, counted=False)

    def refuse_calls(self, message: str) -> None:
        """From now on one-shot works (submitted calls) are refused with ``RuntimeError(message)``.
        When this returns, every call queued before it is on a list, so a flush after it waits
        for them all.

        ``_queue`` reads ``_refusing`` under the lock it queues under (``_lock``, or the pool's
        lock); taking each of those locks once after the store waits out any queueing that read
        the old value."""
        self._refusing = message
        with self._lock:
            pass
        for pwq in self._pwqs:
            with pwq.pool.lock:
                pass

    def _place(self, work: WorkItem, pool: WorkerPool) -> None:
        """Put a work whose pending state is ours on ``pool``'s worklist, or on the inactive list
        beyond the limits. _lock held."""
        if self._limited and not self._may_activate_locked():
            pwq = self._pwqs[pool.index]
            if self._system.timing:
                work._queued_at = time.monotonic()
            with pool.lock:
                color = self._work_color
                in_flight = pwq.in_flight
                count = in_flight.get(color, 0) + 1
                # the changes, no call between them but the last (see pool.py, "Interruptions")
                work._pwq = pwq
                work._color = color
                work._counted = False
                work._where = INACTIVE
                in_flight[color] = count
                self._inactive.append(work)
            return
        with pool.lock:
            self._insert_locked(work, pool, counted=self._limited)

    def _insert_locked(self, work: WorkItem, pool: WorkerPool, counted: bool) -> None:
        """The one place a work goes onto a pool's worklist, counted in flight for its flush color
        and, if ``counted``, holding a max_active slot. ``pool.lock`` held (and _lock if counted).

        Calls that may fail come first, then the changes with no call between them but the last
        (the append); the test of ``counted`` comes before any change (see pool.py, "Interruptions")."""
        pwq = self._pwqs[pool.index]
        if self._system.timing:
            work._queued_at = time.monotonic()
        if not pool.watchdog_armed:
            pool.prepare_insert()
        color = self._work_color
        in_flight = pwq.in_flight
        count = in_flight.get(color, 0) + 1
        if counted:
            self._nr_active += 1
        work._pwq = pwq
        work._color = color
        work._counted = counted
        work._where = WORKLIST
        in_flight[color] = count
        pool.worklist.append(work)
        # the kernel's need_more_worker holds after an append only if nobody runs, and its
        # wake_up_worker finds nothing to do while a woken worker is on its way
        if not pool.kernel_policy or not (pool.nr_running or pool.nr_woken):
            pool.kick()

    def _cancel_locked(self, work: Work) -> bool | None:
        """Cancel a pending work of this workqueue. _lock held. True if it was pending here (and now
        is not), False if it was not pending, None if it is pending but not (yet) placed here.

        Once the work is taken off its list, the rest (its in-flight count, its slot, its pending
        bit) is done in ``finally`` blocks: an interruption cannot leave it half cancelled."""
        where = work._where
        pwq = _state_of(work)
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

    def _may_activate_locked(self) -> bool:
        """One more work may become active. _lock held.

        Works waiting for other works (``_nr_waiting``) hold no max_active slot; works asleep
        (``_nr_sleeping``, counted only with max_running) hold no running slot."""
        max_active, max_running = self._max_active, self._max_running
        return ((max_active is None or self._nr_active - self._nr_waiting < max_active)
                and (max_running is None or self._nr_active - self._nr_sleeping < max_running))

    def _activate_locked(self) -> None:
        """Move waiting works to their pools while the limits allow, in order. _lock held.

        Each move pops in a ``try`` and appends in its ``finally``: an interruption between the
        two cannot lose the work (see pool.py, "Interruptions")."""
        inactive = self._inactive
        while inactive and self._may_activate_locked():
            work = inactive[0]
            pool = _state_of(work).pool
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

    def _slot_freed_locked(self) -> None:
        """A work holding a slot finished or was cancelled: pass its slot on. _lock held."""
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
                worker.sleeping_wq = self
                self._nr_sleeping += 1
            self._activate_soon_locked()

    def _work_wakes(self, worker: SlotHolder) -> None:
        """``worker``'s work woke up: it runs again and counts against max_running (straight-line,
        as in _work_sleeps)."""
        with self._lock:
            if worker.sleeping_wq is self:
                worker.sleeping_wq = None
                self._nr_sleeping -= 1

    def _work_waits(self, worker: SlotHolder) -> None:
        """``worker``'s work (holding a slot) waits for another work: its max_active slot is free
        until the wait ends, so the awaited work can start whatever the limit (as _work_sleeps)."""
        with self._lock:
            if worker.waiting_wq is None:
                worker.waiting_wq = self
                self._nr_waiting += 1
            self._activate_soon_locked()

    def _activate_soon_locked(self) -> None:
        """A slot was given up: have the timer thread start a waiting work, if one may start now
        (not when max_active binds). _lock held (the timer's lock is a leaf)."""
        if self._inactive and self._may_activate_locked():
            timer.add_timer(0.0, self._activate_waiting)

    def _work_stops_waiting(self, worker: SlotHolder) -> None:
        """The wait is over: the work holds its slot again (for a moment the workqueue may run one
        work more than max_active: the one it waited for may still be running)."""
        with self._lock:
            if worker.waiting_wq is self:
                worker.waiting_wq = None
                self._nr_waiting -= 1

    def _activate_waiting(self) -> None:
        """Start the waiting works the limits now allow (on the timer thread)."""
        with self._lock:
            self._activate_locked()

    def set_max_active(self, max_active: int | None, max_running: Any = _KEEP) -> None:
        """Change ``max_active`` (and ``max_running``, if given) at run time; raising a limit starts
        waiting works at once."""
        _check_limit("max_active", max_active)
        if max_running is not _KEEP:
            _check_limit("max_running", max_running)
        if self.flags & WQ.ORDERED and (max_active != 1 or max_running not in (_KEEP, None)):
            raise ValueError(f"workqueue {self.name!r} is ordered: max_active stays 1, max_running None")
        with deferred_interrupts(), self._lock:
            # _nr_active counts the works holding a slot (work._counted): works queued while there
            # was no limit hold none, finish as they are, and never give one back
            self._max_active = max_active
            if max_running is not _KEEP:
                self._max_running = max_running
            self._limited = max_active is not None or self._max_running is not None
            self._activate_locked()  # all of them if there is no limit any more

    def _in_flight_counts(self) -> list[int]:
        counts = []
        for pwq in self._pwqs:
            with pwq.pool.lock:
                counts.append(sum(pwq.in_flight.values()))
        return counts

    # -- flushing ---------------------------------------------------------------------------------

    def _drop_in_flight(self, pwq: QueueState, color: int) -> None:
        """A work left (finished or cancelled). L: pwq.pool.lock held."""
        left = pwq.in_flight[color] - 1
        if left:
            pwq.in_flight[color] = left
        else:
            del pwq.in_flight[color]
            if self._nr_flushers:
                self._notify_flushers()
            rescuer = self._rescuer
            if rescuer is not None and rescuer.closing:
                rescuer.kick()  # it stops once nothing is in flight

    def _notify_flushers(self) -> None:
        """Called with a pool lock held (lock order: pool, then _flush_lock)."""
        with self._flush_lock:
            self._flush_seq += 1
            self._flush_cond.notify_all()

    def _colors_done(self, color: int) -> bool:
        for pwq in self._pwqs:
            with pwq.pool.lock:
                if any(c <= color for c in pwq.in_flight):
                    return False
        return True

    def flush(self) -> None:
        """Wait until every work queued before this call has finished (flush_workqueue).

        A work of this workqueue may not flush it: it would wait for itself (RuntimeError).

        No wakeup is lost: a flusher counts itself (``_nr_flushers``) before it looks at the
        counts, and reads ``_flush_seq`` before each look; a work that empties a color after
        the count was made sees the flusher and bumps the sequence, so the wait below returns."""
        worker = current.worker
        if worker is not None and worker.current_pwq is not None and worker.current_pwq.wq is self:
            raise RuntimeError(f"a work of workqueue {self.name!r} cannot flush or drain it: it would "
                               "wait for its own end")

        counted = False
        try:
            with self._flush_lock:
                color = self._work_color
                self._work_color += 1
                self._nr_flushers += 1
                counted = True  # no call since the count: an interruption finds it taken back below
            with waiting(worker):
                while True:
                    with self._flush_lock:
                        seq = self._flush_seq
                    if self._colors_done(color):
                        return
                    with self._flush_lock:
                        while self._flush_seq == seq:
                            self._flush_cond.wait()
        finally:
            if counted:
                with self._flush_lock:
                    self._nr_flushers -= 1

    def drain(self) -> None:
        """Flush until the workqueue is empty. Meanwhile only its own works may queue on it (chains
        finish); anyone else gets RuntimeError."""
        counted = False
        try:
            with self._flush_lock:
                self._draining += 1
                counted = True  # as flush()'s count of its flushers
            while True:
                self.flush()
                if not any(self._in_flight_counts()):
                    return
        finally:
            if counted:
                with self._flush_lock:
                    self._draining -= 1

    def destroy(self) -> None:
        """Drain, stop the rescuer, and refuse works from now on."""
        self.drain()
        self._destroyed = True
        if self._rescuer is not None:
            self._rescuer.stop()
        self._system.remove_workqueue(self)

    def _close(self) -> None:
        """Refuse nothing, but let the rescuer go once the works in flight are done (an executor
        shut down without waiting, or dropped)."""
        rescuer = self._rescuer
        if rescuer is not None:
            rescuer.close()

    def summon_rescuer(self, pool: WorkerPool) -> bool:
        """Mayday from ``pool`` (P: held): summon this workqueue's rescuer there. False if the
        workqueue has no rescuer."""
        rescuer = self._rescuer
        if rescuer is None:
            return False
        rescuer.summon(pool)
        return True

    def shutdown(self, wait: bool) -> threading.Thread | None:
        """The pools shut down (System.shutdown): with ``wait``, flush first unless destroyed; then
        refuse works and stop the rescuer. Returns the rescuer's thread (to join), or None."""
        if wait and not self._destroyed:
            self.flush()
        self._destroyed = True
        rescuer = self._rescuer
        if rescuer is None:
            return None
        rescuer.stop()
        return rescuer.thread

    # -- reading ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Totals over all pools (for metrics and ``top``)."""
        total: dict[str, Any] = {"workqueue": self.name, "started": 0, "completed": 0, "inflight": 0,
                 "cpu_seconds": 0.0, "cpu_intensive": 0, "cm_wakeups": 0, "mayday": 0, "rescued": 0}
        latency = [0] * len(BUCKETS)
        execution = [0] * len(BUCKETS)
        latency_sum = execution_sum = 0.0
        for pwq in self._pwqs:
            with pwq.pool.lock:
                total["started"] += pwq.nr_started
                total["completed"] += pwq.nr_completed
                total["inflight"] += sum(pwq.in_flight.values())
                total["cpu_seconds"] += pwq.cpu_sum
                total["cpu_intensive"] += pwq.nr_cpu_intensive
                total["cm_wakeups"] += pwq.nr_cm_wakeups
                total["mayday"] += pwq.nr_mayday
                total["rescued"] += pwq.nr_rescued
                for i in range(len(BUCKETS)):
                    latency[i] += pwq.latency[i]
                    execution[i] += pwq.execution[i]
                latency_sum += pwq.latency_sum
                execution_sum += pwq.execution_sum
        total["queue_latency"] = {"buckets": BUCKETS, "counts": latency, "sum": latency_sum}
        total["execution"] = {"buckets": BUCKETS, "counts": execution, "sum": execution_sum}
        return total

    def _pending_works(self) -> list[WorkItem]:
        """Works of this workqueue not yet started (on a worklist, inactive)."""
        found: list[WorkItem] = []
        for pwq in self._pwqs:
            with pwq.pool.lock:
                found.extend(w for w in pwq.pool.worklist if w._pwq is pwq)
        with self._lock:
            found.extend(self._inactive)
        return found

    def _reset_after_fork(self) -> None:
        """In a forked child: the parent's threads are gone; start afresh on the child's pools."""
        self._lock = make_lock("workqueue")
        self._flush_lock = make_lock("flush")
        self._flush_cond = threading.Condition(self._flush_lock)
        self._nr_active = 0
        self._nr_sleeping = 0
        self._nr_waiting = 0
        self._inactive = deque()
        self._nr_flushers = 0
        self._draining = 0
        self._system = system = _system.get_system()
        self._pwqs = [PoolWorkqueue(self, pool) for pool in system.pools]
        self._make_rescuer()
        system.add_workqueue(self)

    def __repr__(self) -> str:
        running = "" if self._max_running is None else f" max_running={self._max_running}"
        return f"<WorkQueue {self.name!r} flags={self.flags!r} max_active={self._max_active}{running}>"


def _state_of(work: WorkItem) -> PoolWorkqueue:
    """The state (on its pool) of the workqueue a queued work belongs to: always one of ours."""
    return cast(PoolWorkqueue, work._pwq)


def _check_limit(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None (no limit), got {value!r}")


#: Every workqueue ever created, so a forked child can start them afresh.
all_workqueues: weakref.WeakSet[WorkQueue] = weakref.WeakSet()


def flush_all() -> None:
    """Interpreter exit: wait for every work queued on any workqueue so far, on the workers there
    are (no new thread can be started now)."""
    _pool.interpreter_exiting()
    for wq in list(all_workqueues):
        if not wq._destroyed and wq._flush_at_exit:
            wq.flush()


def _after_fork_in_child() -> None:
    # Registered after system.py's own hook (this module imports it), so the child's fresh
    # system is there to start on.
    for wq in list(all_workqueues):
        wq._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
