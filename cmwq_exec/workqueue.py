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
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import plugin, timer
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
    caller to return to); use :class:`cmwq_exec.CMWQExecutor` for results.
    """

    _reusable = True
    __slots__ = ("fn", "args", "kwargs", "_pending", "_pwq", "_color", "_queued_at", "_counted", "_worker",
                 "_where", "_timer", "__weakref__")

    def __init__(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        if not callable(fn):
            raise TypeError(f"Work(fn): fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self._pending = threading.Lock()  # locked while pending: test-and-set is acquire(False)
        self._pwq: PoolWorkqueue | None = None
        self._color = 0
        self._queued_at = 0.0
        self._counted = False  # holds a max_active slot of its workqueue (set under wq._lock)
        self._worker: Any = None  # L: the worker running it
        self._where: str | None = None  # where a pending work sits: queueing, timer, inactive,
        # moving, worklist, scheduled
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
            if not self._pending.locked():
                return False
            where = self._where
            if where == "timer":
                tm = self._timer
                if tm is not None and tm.cancel():
                    self._where = None
                    self._pending.release()
                    return True
            elif where == "inactive":
                pwq = self._pwq
                assert pwq is not None
                wq = pwq.wq
                with wq._lock:
                    grabbed = self._where == "inactive"
                    if grabbed:
                        wq._inactive.remove(self)
                        self._where = None
                if grabbed:
                    with pwq.pool.lock:
                        wq._drop_in_flight(pwq, self._color)
                    self._pending.release()
                    return True
            elif where in ("worklist", "scheduled"):
                pwq = self._pwq
                assert pwq is not None
                pool = pwq.pool
                with pool.lock:
                    if self._where == where and self._pwq is pwq:
                        if where == "worklist":
                            pool.worklist.remove(self)
                        else:
                            self._worker.scheduled.remove(self)
                        self._where = None
                        pwq.wq._drop_in_flight(pwq, self._color)
                        grabbed = True
                    else:
                        grabbed = False
                if grabbed:
                    if self._counted:
                        pwq.wq._work_done()  # its slot passes on
                    self._pending.release()
                    return True
            time.sleep(0)  # queueing or moving between lists right now: look again

    def flush(self) -> bool:
        """Wait until the work is neither pending nor running. Returns True if it had to wait."""
        worker = current_worker()
        if worker is not None and worker.current_work is self:
            raise RuntimeError("a work cannot flush itself: it would wait for its own end")
        waited = False
        from .blocking import blocking

        with blocking():
            while True:
                pwq = self._pwq
                if pwq is None:
                    return waited
                pool = pwq.pool
                with pool.lock:
                    if not self._pending.locked() and self._worker is None:
                        return waited
                    pool.nr_done_waiters += 1
                    try:
                        pool.done_cond.wait(0.05)  # completions notify; the timeout rechecks moves
                    finally:
                        pool.nr_done_waiters -= 1
                waited = True

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
        """Queue it now if its timer is still pending, then wait for it (flush_delayed_work)."""
        tm = self._timer
        if self._where == "timer" and tm is not None and tm.cancel():
            pwq = self._pwq
            assert pwq is not None
            self._where = "queueing"
            pwq.wq._queue(self)
        return super().flush()


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
        from .system import get_system

        self.name = name
        self.flags = flags
        self._system = system = get_system()
        self._unbound = bool(flags & WQ.UNBOUND)
        self._max_active = max_active  # L: _lock to change; read racily on the hot path
        self._max_running = max_running  # L: as _max_active
        self._limited = max_active is not None or max_running is not None  # L: as _max_active
        self._lock = threading.Lock()
        self._nr_active = 0  # _lock: works of a limited workqueue on a worklist or running
        self._nr_sleeping = 0  # _lock: of those, asleep in blocking() (counted if max_running is set)
        self._inactive: deque[Any] = deque()  # _lock: works waiting for max_active
        self._work_color = 0  # _flush_cond: the color new works get
        self._flush_cond = threading.Condition(threading.Lock())
        self._flush_seq = 0  # _flush_cond: bumped when a color count reaches zero
        self._nr_flushers = 0  # _flush_cond
        self._draining = 0
        self._destroyed = False
        self._pwqs = [PoolWorkqueue(self, pool) for pool in system.pools]
        self._rescuer = Rescuer(self, system) if flags & WQ.RESCUER else None
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
        if not work._pending.acquire(False):
            return False
        work._where = "queueing"
        try:
            self._queue(work, cpu)
        except BaseException:
            work._where = None
            work._pending.release()
            raise
        return True

    def queue_delayed_work(self, work: DelayedWork, delay: float) -> bool:
        """Queue ``work`` after ``delay`` seconds. Returns False if it is already pending."""
        if not isinstance(work, DelayedWork):
            raise TypeError(f"queue_delayed_work(work, delay): work must be a cmwq_exec.DelayedWork, "
                            f"got {type(work).__name__}")
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
            raise ValueError(f"queue_delayed_work(work, delay): delay must be a number of seconds >= 0, "
                             f"got {delay!r}")
        if delay == 0:
            return self.queue_work(work)
        self._check_open()
        if not work._pending.acquire(False):
            return False
        work._pwq = self._pwqs[self._system.unbound_pool.index]  # remembers the workqueue
        work._where = "timer"

        def fire() -> None:
            work._where = "queueing"
            try:
                self._queue(work)
            except Exception:
                log.exception("delayed work %r could not be queued on %s", work, self.name)
                work._where = None
                work._pending.release()

        work._timer = timer.add_timer(delay, fire)
        return True

    def _check_open(self) -> None:
        if self._destroyed:
            raise RuntimeError(f"workqueue {self.name!r} is destroyed: no new works")
        if self._draining:
            worker = current_worker()
            pwq = worker.current_pwq if worker is not None else None
            if pwq is None or pwq.wq is not self:
                raise RuntimeError(f"workqueue {self.name!r} is draining: only its own works may "
                                   "queue works on it until drain() returns")

    def _select_pool(self, work: Any, cpu: int | None) -> WorkerPool:
        system = self._system
        if work._reusable and work._worker is not None:
            # non-reentrancy: where it runs now, whatever the workqueue (even an unbound one), so
            # the running worker takes it over under one pool lock
            return work._worker.pool
        if self._unbound:
            return system.unbound_pool
        if cpu is not None:  # queue_work_on()
            pool = system.cpu_pools[cpu]
            return pool if pool.online else system.fallback_pool(cpu)
        worker = current.worker
        if worker is not None and worker.pool.online and worker.pool.cpu is not None:
            pool = worker.pool
        else:
            pool = system.local_pool()
        select = plugin.current_policy.select_pool
        if select is not None:
            pool = select(workqueue=self, pools=system.online_pools, current_pool=pool)
        return pool

    def _queue(self, work: Any, cpu: int | None = None) -> None:
        """Put a work (pending bit already ours) on its pool, or on the inactive list beyond
        max_active. The hot path of every queued work."""
        if self._draining or self._destroyed:
            self._check_open()
        pool = self._select_pool(work, cpu)
        pwq = self._pwqs[pool.index]
        work._pwq = pwq
        if self._system.timing:
            work._queued_at = time.monotonic()
        lock = pool.lock
        lock.acquire()
        color = work._color = self._work_color
        in_flight = pwq.in_flight
        in_flight[color] = in_flight.get(color, 0) + 1
        if not self._limited:
            work._counted = False
            pool.insert_work(work)
            if work._reusable:
                work._where = "worklist"
            lock.release()
            return
        lock.release()
        with self._lock:
            limited = self._limited  # again, under the lock: set_max_active may have run
            active = not limited or self._may_activate_locked()
            work._counted = limited and active
            if work._counted:
                self._nr_active += 1
            elif not active:
                self._inactive.append(work)
                if work._reusable:
                    work._where = "inactive"
        if active:
            with lock:
                pool.insert_work(work)
                if work._reusable:
                    work._where = "worklist"

    def _may_activate_locked(self) -> bool:
        """One more work may become active. _lock held."""
        max_active, max_running = self._max_active, self._max_running
        return ((max_active is None or self._nr_active < max_active)
                and (max_running is None or self._nr_active - self._nr_sleeping < max_running))

    def _take_inactive_locked(self) -> list[Any]:
        """Give slots to waiting works while the limits allow, in order. _lock held; the caller
        activates what is returned."""
        taken = []
        inactive = self._inactive
        while inactive and self._may_activate_locked():
            work = inactive.popleft()
            work._counted = True
            if work._reusable:
                work._where = "moving"
            self._nr_active += 1
            taken.append(work)
        return taken

    def _work_done(self) -> None:
        """A work of a limited workqueue finished (or was cancelled): pass its slot on. No lock held."""
        with self._lock:
            self._nr_active -= 1
            if not self._inactive:
                return
            taken = self._take_inactive_locked()
        for work in taken:
            self._activate(work)

    def _work_sleeps(self, worker: Any) -> None:
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
            kick = bool(self._inactive) and self._may_activate_locked()
        if kick:
            timer.add_timer(0.0, self._activate_waiting)

    def _work_wakes(self, worker: Any) -> None:
        """``worker``'s work woke up: it runs again and counts against max_running (straight-line,
        as in _work_sleeps)."""
        with self._lock:
            if worker.sleeping_wq is self:
                worker.sleeping_wq = None
                self._nr_sleeping -= 1

    def _activate_waiting(self) -> None:
        """Start the waiting works the limits now allow (on the timer thread)."""
        with self._lock:
            taken = self._take_inactive_locked()
        for work in taken:
            self._activate(work)

    def _activate(self, work: Any) -> None:
        pool = work._pwq.pool
        with pool.lock:
            pool.insert_work(work)
            if work._reusable:
                work._where = "worklist"

    def set_max_active(self, max_active: int | None, max_running: Any = _KEEP) -> None:
        """Change ``max_active`` (and ``max_running``, if given) at run time; raising a limit starts
        waiting works at once."""
        _check_limit("max_active", max_active)
        if max_running is not _KEEP:
            _check_limit("max_running", max_running)
        if self.flags & WQ.ORDERED and (max_active != 1 or max_running not in (_KEEP, None)):
            raise ValueError(f"workqueue {self.name!r} is ordered: max_active stays 1, max_running None")
        with self._lock:
            # _nr_active counts the works holding a slot (work._counted): works queued while there
            # was no limit hold none, finish as they are, and never give one back
            self._max_active = max_active
            if max_running is not _KEEP:
                self._max_running = max_running
            self._limited = max_active is not None or self._max_running is not None
            taken = self._take_inactive_locked()  # all of them if there is no limit any more
        for work in taken:
            self._activate(work)

    def _in_flight_counts(self) -> list[int]:
        counts = []
        for pwq in self._pwqs:
            with pwq.pool.lock:
                counts.append(sum(pwq.in_flight.values()))
        return counts

    # -- flushing ---------------------------------------------------------------------------------

    def _drop_in_flight(self, pwq: PoolWorkqueue, color: int) -> None:
        """A work left (finished or cancelled). L: pwq.pool.lock held."""
        left = pwq.in_flight[color] - 1
        if left:
            pwq.in_flight[color] = left
        else:
            del pwq.in_flight[color]
            if self._nr_flushers:
                self._notify_flushers()

    def _notify_flushers(self) -> None:
        """Called with a pool lock held (lock order: pool, then _flush_cond)."""
        with self._flush_cond:
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

        A work of this workqueue may not flush it: it would wait for itself (RuntimeError)."""
        from .blocking import blocking

        worker = current.worker
        if worker is not None and worker.current_pwq is not None and worker.current_pwq.wq is self:
            raise RuntimeError(f"a work of workqueue {self.name!r} cannot flush or drain it: it would "
                               "wait for its own end")

        with self._flush_cond:
            color = self._work_color
            self._work_color += 1
            self._nr_flushers += 1
        try:
            with blocking():
                while True:
                    with self._flush_cond:
                        seq = self._flush_seq
                    if self._colors_done(color):
                        return
                    with self._flush_cond:
                        while self._flush_seq == seq:
                            self._flush_cond.wait(0.1)
        finally:
            with self._flush_cond:
                self._nr_flushers -= 1

    def drain(self) -> None:
        """Flush until the workqueue is empty. Meanwhile only its own works may queue on it (chains
        finish); anyone else gets RuntimeError."""
        with self._flush_cond:
            self._draining += 1
        try:
            while True:
                self.flush()
                if not any(self._in_flight_counts()):
                    return
        finally:
            with self._flush_cond:
                self._draining -= 1

    def destroy(self) -> None:
        """Drain, stop the rescuer, and refuse works from now on."""
        self.drain()
        self._destroyed = True
        if self._rescuer is not None:
            self._rescuer.stop()
        self._system.remove_workqueue(self)

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

    def _pending_works(self) -> list[Any]:
        """Works of this workqueue not yet started (on a worklist or inactive)."""
        found: list[Any] = []
        for pwq in self._pwqs:
            with pwq.pool.lock:
                found.extend(w for w in pwq.pool.worklist if w._pwq is pwq)
        with self._lock:
            found.extend(self._inactive)
        return found

    def _reset_after_fork(self) -> None:
        """In a forked child: the parent's threads are gone; start afresh on the child's pools."""
        from .system import get_system

        self._lock = threading.Lock()
        self._flush_cond = threading.Condition(threading.Lock())
        self._nr_active = 0
        self._nr_sleeping = 0
        self._inactive = deque()
        self._nr_flushers = 0
        self._draining = 0
        self._system = system = get_system()
        self._pwqs = [PoolWorkqueue(self, pool) for pool in system.pools]
        self._rescuer = Rescuer(self, system) if self.flags & WQ.RESCUER else None
        system.add_workqueue(self)

    def __repr__(self) -> str:
        running = "" if self._max_running is None else f" max_running={self._max_running}"
        return f"<WorkQueue {self.name!r} flags={self.flags!r} max_active={self._max_active}{running}>"


def _check_limit(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None (no limit), got {value!r}")


#: Every workqueue ever created, so a forked child can start them afresh.
all_workqueues: weakref.WeakSet[WorkQueue] = weakref.WeakSet()
