"""Workers and rescuers: the threads that run works.

A worker belongs to one pool at a time. It sleeps parked on its own lock while idle; the pool wakes
it by releasing that lock. Its loop is the kernel's ``worker_thread``: leave idle, manage the pool if
it is the last idle worker, run works while it is the only runner, go idle again. While idle it may
be given to another pool that would otherwise create a thread (adoption); the new pool binds it to
its CPU.

A rescuer belongs to one workqueue. Summoned by a pool that cannot get a worker (mayday), it moves to
that pool and runs the workqueue's works there one at a time, so a workqueue that reserved one always
makes progress even when no thread can be created.

Fields say who may touch them with the core's legend (:mod:`cmwq_exec.core.lockdep`): ``I:`` set at
creation, ``P:`` under the pool lock, ``R:`` under the rescuer's lock, ``X:`` the worker's own thread.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, cast

from . import hooks
from .cpus import set_batch_policy
from .interfaces import PoolForWorkers, QueueState, ReusableWork, SystemForWorkers, WorkItem, WorkQueueOps
from .lockdep import assert_held, make_lock, must_hold
from .pending import NOWHERE, SCHEDULED, work_flush

log = logging.getLogger("cmwq_exec.worker")

# worker flags
IDLE = 1 << 0  # on the idle list
PREP = 1 << 1  # between works: leaving idle, managing, about to sleep
DIE = 1 << 2  # reaped: exit when woken
ROGUE = 1 << 3  # its CPU went down; unbound and not counted (trustee in charge)
SLEEPING = 1 << 4  # inside blocking(): told us it sleeps
CPU_INTENSIVE = 1 << 5  # the watchdog saw it burn CPU in the current work
STUCK = 1 << 6  # seen blocked without an annotation: uncounted until it idles or burns CPU
RESCUER = 1 << 7  # a workqueue's rescuer, never counted
HOG_SEEN = 1 << 8  # the watchdog counted the current work as CPU-intensive (bookkeeping only)
#: flags that take a worker out of nr_running (the kernel's WORKER_NOT_RUNNING)
NOT_RUNNING = PREP | ROGUE | SLEEPING | CPU_INTENSIVE | STUCK | RESCUER
#: flags that belong to the work a worker runs: cleared when it ends, however it ends
WORK_FLAGS = SLEEPING | CPU_INTENSIVE | HOG_SEEN

#: weight of the latest sleep in a pool's moving average of sleep lengths (``sleep_avg``)
SLEEP_AVG_WEIGHT = 0.125
_monotonic = time.monotonic

class _Current(threading.local):
    """Per-thread: the worker this thread is (None for other threads). A class default, not a
    missing attribute: a failed lookup raises AttributeError inside getattr, costing ~0.4 us on
    every submit from a non-worker thread."""

    worker: Worker | None = None
    detected: list[Any] | None = None


#: The worker running on this thread, if any: ``current.worker``.
current = _Current()


def _after_fork_in_child() -> None:
    current.worker = None  # forked from a worker: this thread is not one in the child
    current.detected = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def current_worker() -> Worker | None:
    """The worker (or rescuer) the calling thread is, or None."""
    return current.worker


def start_thread(target: Any, name: str) -> threading.Thread:
    """Start a daemon thread running ``target`` (the fault-injection point of the tests)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


class Worker:
    """A worker thread of a pool (the kernel's ``struct worker``)."""

    __slots__ = (
        "pool", "id", "thread", "native_id", "flags", "park", "woken", "last_active",
        "current_work", "current_pwq", "current_counted", "scheduled", "sleep_depth", "slept_at",
        "sleeping_wq", "waiting_wq", "work_seq", "cpu_sample", "__weakref__",
    )

    def __init__(self, pool: PoolForWorkers[Worker], worker_id: int) -> None:
        self.pool = pool  # P: changed only while idle and parked (adoption); X for a rescuer
        self.id = worker_id  # P: renumbered by the pool that adopts it
        self.thread: threading.Thread | None = None  # I: set before the pool publishes it
        self.native_id = 0  # X: set by the thread itself
        self.flags = PREP  # P
        self.park = threading.Lock()  # I: parked on while idle; released (under P) to wake it
        self.park.acquire()
        self.woken = False  # P: park released and not yet consumed
        self.last_active = time.monotonic()  # P
        self.current_work: WorkItem | None = None  # P
        self.current_pwq: QueueState | None = None  # P
        self.current_counted = False  # P: the current work holds a slot of its workqueue
        self.scheduled: deque[WorkItem] = deque()  # P: works that collided with the one we run
        self.sleep_depth = 0  # X: nesting of blocking()
        self.slept_at = 0.0  # P: when the outermost blocking() began
        self.sleeping_wq: WorkQueueOps | None = None  # W (its own): whose running count our sleep lowered
        self.waiting_wq: WorkQueueOps | None = None  # W (its own): whose active count our wait lowered
        self.work_seq = 0  # P: bumped per work; the watchdog tells works apart with it
        self.cpu_sample: tuple[int, int, int, float] | None = None  # P: the watchdog's last look:
        # (work_seq, CPU ns at its first look at that work, CPU ns now, when)

    # -- the loop ---------------------------------------------------------------------------------

    def thread_main(self) -> None:
        current.worker = self
        self.native_id = threading.get_native_id()
        while True:  # bind under the lock of the pool it is in (it may be adopted before this)
            pool = self.pool
            with pool.lock:
                if self.pool is pool:
                    self.bind(pool)
                    break
        if pool.system.config.batch_workers:
            set_batch_policy()
        try:
            self.worker_loop()
        except BaseException as exc:  # a bug: works and hooks cannot raise into the loop
            self.pool.worker_crashed(self, exc)

    def bind(self, pool: PoolForWorkers[Worker]) -> None:
        """Bind this (the worker's own) thread to ``pool``'s CPU, or to every usable CPU."""
        system = pool.system
        if pool.cpu is None or system.config.pin_workers:
            system.bind_thread(pool)

    def worker_loop(self) -> None:
        park = self.park
        while True:
            # Parked until woken. No wakeup can be lost: ``park`` stays held from the moment the
            # worker is put on the idle list (under the pool lock) until a waker releases it (under
            # the pool lock, once per idle period: ``woken``); a release before this acquire is
            # kept by the lock, and this acquire consumes exactly that release.
            park.acquire()
            # another pool may have adopted it while it was idle and parked: that pool bound it
            # to its CPU (Manager.bind_adopted; thread_main if the thread had not bound itself)
            pool = self.pool
            with pool.lock:
                if self.flags & DIE:
                    return
                pool.worker_leave_idle(self)
                self.work_until_idle()

    @must_hold("pool.lock")
    def work_until_idle(self) -> None:
        """The kernel's worker_thread body, from leaving idle to going idle again. P: held
        (dropped while a work runs or the manager creates a worker)."""
        pool = self.pool
        while True:  # recheck
            if not pool.need_more_worker(pool):
                if pool.manage_requested and pool.manage_workers(self):
                    continue
                break
            # the last idle worker about to work first makes another one
            if not pool.may_start_working(pool) and pool.manage_workers(self):
                continue
            pool.worker_clr_flags(self, PREP)
            worklist = pool.worklist
            scheduled = self.scheduled
            while worklist:
                self.process_one_work(worklist.popleft())
                while scheduled:
                    self.process_one_work(scheduled.popleft())
                if pool.kernel_policy:  # keep_working, inlined
                    if not worklist or pool.nr_running > 1:
                        break
                elif not pool.keep_working(pool):
                    break
            pool.worker_set_flags(self, PREP, wakeup=False)
            if self.flags & STUCK:
                pool.worker_clr_flags(self, STUCK)  # found blocked: counted again once it idles
            if pool.need_to_manage_workers(pool) and pool.manage_workers(self):
                continue
            break
        pool.worker_enter_idle(self)

    @must_hold("pool.lock")
    def process_one_work(self, work: WorkItem) -> None:
        """Run one work. Called and returns with the pool lock held; drops it while the work runs.

        A reusable work already running on another worker of this pool is handed to that worker
        instead (non-reentrancy: a work never runs concurrently with itself).
        """
        pool = self.pool
        if work._reusable:
            reusable = cast("ReusableWork", work)
            running = reusable._worker
            if running is not None and running is not self:
                work._where = SCHEDULED
                running.scheduled.append(work)
                return
            reusable._worker = self
            work._where = NOWHERE
            reusable._pending.release()  # from here on it may be queued again
        pwq = work._pwq
        assert pwq is not None  # set while it is queued
        color, queued_at = work._color, work._queued_at
        counted = work._counted  # it holds one of its workqueue's max_active slots
        self.current_work, self.current_pwq, self.current_counted = work, pwq, counted
        self.work_seq += 1
        pool.nr_started += 1
        pwq.nr_started += 1
        timing = pool.system.timing
        if pool.worklist and (not pool.nr_running if pool.kernel_policy else pool.need_more_worker(pool)):
            pool.wake_up_worker()  # kick: a policy that allows more runners gets them chained
        wq = pwq.wq
        events = hooks.events
        # pool.unlocked, spelled out on this path: the lock is taken back however the block ends
        # (a worker thread gets no KeyboardInterrupt between the release and the try)
        lock = pool.lock
        lock.release()
        try:
            if timing:
                started = time.monotonic()
                cpu_started = time.thread_time()
            else:
                started = cpu_started = 0.0
            if events.work_started is not None:
                events.work_started(pool=pool, workqueue=wq, work=work)
            try:
                error = work._execute()
            except BaseException as exc:  # past the work's own handling (a done callback's SystemExit)
                log.exception("cmwq_exec worker %s: %r escaped the completion of %r", self, exc, work)
                error = exc
            if events.work_finished is not None:
                events.work_finished(pool=pool, workqueue=wq, work=work, error=error)
            error = None
            if self.sleeping_wq is not None:
                self.sleeping_wq._work_wakes(self)  # a blocking() cut short by an asynchronous exception
            if self.waiting_wq is not None:
                self.waiting_wq._work_stops_waiting(self)  # likewise for a wait on another work
            if counted:
                wq._work_done()
        finally:
            lock.acquire()
        if timing:
            ended = time.monotonic()
            pwq.observe(started - queued_at, ended - started, time.thread_time() - cpu_started)
        # per-work state back to between-works, however it ended (its slots were given back above)
        if self.sleep_depth or self.flags & WORK_FLAGS:
            self.end_work_state(pool)
        self.current_work = self.current_pwq = None
        self.current_counted = False
        if work._reusable:
            cast("ReusableWork", work)._worker = None
            if work_flush.waiters:
                work_flush.notify()
        else:
            work._pwq = None  # a finished call keeps no workqueue (nor its executor's rescuer) alive
        pwq.nr_completed += 1
        pool.nr_completed += 1
        in_flight = pwq.in_flight  # wq._drop_in_flight(pwq, color), its common case inlined
        left = in_flight[color] - 1
        if left:
            in_flight[color] = left
        else:
            wq._drop_in_flight(pwq, color)

    # -- sleep notifications (the scheduler hook of this design) ---------------------------------

    def sleep_begin(self) -> None:
        """The worker's thread is about to sleep: hand over to another worker if it was the last
        runner, and to a waiting work if the workqueue limits its running works (max_running).
        X: called on the worker's own thread, from blocking().

        An asynchronous exception (a Celery time limit, a terminate) may land at any call return
        in here, and the task may catch it and go on. So the flag and nr_running change first
        (worker_set_flags stores both before the handover's calls, whose loss is only a missed
        chance), and the depth last: an exception that lands in between leaves the worker flagged
        SLEEPING at depth 0, which the next blocking() and its exit handle as a first sleep, and
        the end of the work clears (see process_one_work). Either way nr_running matches the
        flags."""
        now = _monotonic()
        pool = self.pool
        with pool.lock:
            depth = self.sleep_depth
            if depth:
                self.sleep_depth = depth + 1
                return
            self.slept_at = now
            pool.worker_set_flags(self, SLEEPING, wakeup=True)
            self.sleep_depth = 1
        pwq = self.current_pwq
        if self.current_counted and pwq is not None and pwq.wq._max_running is not None:
            pwq.wq._work_sleeps(self)

    def hand_over(self, pool: PoolForWorkers[Worker]) -> None:
        """This worker just stopped running: if works wait and the policy wants another runner,
        wake an idle worker, or have one made (the wakeup of ``worker_set_flags(wakeup=True)``,
        made after the flag is stored). P: held."""
        assert_held(pool.lock)
        if pool.worklist and pool.need_more_worker(pool):
            pool.cm_wakeups += 1
            self.count_cm_wakeup()
            if not pool.wake_up_worker():
                pool.manage_requested = True
                if not pool.managing:
                    pool.pace_create_worker()

    def sleep_end(self) -> None:
        """The worker's thread woke up and runs again; the pool learns how long it slept.

        Interruptible as sleep_begin is: the depth is stored before the flag is cleared (one
        call that makes no call), so an exception at any return leaves either a sleep still on
        (cleared when the work ends) or, at depth 0, a flag the next blocking() takes as its own."""
        now = _monotonic()
        pool = self.pool
        with pool.lock:
            depth = self.sleep_depth - 1
            if depth > 0:
                self.sleep_depth = depth
                return
            self.sleep_depth = 0
            if self.flags & SLEEPING:
                pool.sleep_avg += (now - self.slept_at - pool.sleep_avg) * SLEEP_AVG_WEIGHT
                pool.woke_at = now
                pool.worker_clr_flags(self, SLEEPING)
        if self.sleeping_wq is not None:
            self.sleeping_wq._work_wakes(self)

    def end_work_state(self, pool: PoolForWorkers[Worker]) -> None:
        """Clear what a work left of its sleeps and of the watchdog's marks, however it ended: a
        blocking() whose enter or exit an asynchronous exception cut short leaves a depth or the
        SLEEPING flag, which would keep the worker out of nr_running (and its next sleeps from
        handing over) for good. P: held; on the worker's own thread."""
        assert_held(pool.lock)
        self.sleep_depth = 0
        stack = current.detected
        if stack:
            stack.clear()  # detect's open sleeps: they ended with the work
        pool.worker_clr_flags(self, WORK_FLAGS)

    def wait_begin(self) -> bool:
        """The current work is about to wait for another work (a future, a flush): while it waits
        it holds no max_active slot of its workqueue, so the work it waits for can always start
        (the kernel's answer: a sleeper is not counted). Returns whether this call gave the slot
        up (pass it to wait_end). X: on the worker's own thread."""
        pwq = self.current_pwq
        if self.current_counted and pwq is not None and self.waiting_wq is None:
            pwq.wq._work_waits(self)
            return True
        return False

    def wait_end(self, began: bool) -> None:
        """The wait that wait_begin() began is over: the work counts against max_active again."""
        wq = self.waiting_wq
        if began and wq is not None:
            wq._work_stops_waiting(self)

    @must_hold("pool.lock")
    def count_cm_wakeup(self) -> None:
        """A wakeup happened because this worker stopped running. P: held."""
        pwq = self.current_pwq
        if pwq is not None:
            pwq.nr_cm_wakeups += 1

    def __repr__(self) -> str:
        return f"<Worker {self.pool.name}:{self.id} flags={self.flags:#x}>"


class Rescuer:
    """The rescuer of one workqueue: a reserved thread that runs its works where workers are lacking.

    It holds its workqueue weakly: a workqueue (or executor) nobody references stops its rescuer
    (``stop``, from the workqueue's finalizer), and one that is closing (``close``: an executor shut
    down without waiting) stops it once its works are done.
    """

    def __init__(self, wq: WorkQueueOps, system: SystemForWorkers[PoolForWorkers[Worker]]) -> None:
        self.wq_ref = weakref.ref(wq)
        self.name = wq.name
        self.lock = make_lock("rescuer")  # I: the R of pools
        self.pools: deque[PoolForWorkers[Worker]] = deque()  # R: pools that sent mayday
        self.stopping = False  # set once, read by the rescuer after a signal
        self.closing = False  # likewise: stop once the workqueue has no works in flight
        # The rescuer sleeps on ``wake``, a lock used as a binary semaphore (held: no signal).
        # Signalling is a bare release, which takes no lock of ours: a finalizer run by the
        # garbage collector in the middle of any critical section may signal safely.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.worker = Worker(system.unbound_pool, -1)
        self.worker.flags = RESCUER
        self.batch = system.config.batch_workers  # I
        try:
            self.thread = start_thread(self.thread_main, f"cmwq/rescuer:{wq.name}")
        except RuntimeError as exc:  # like the kernel: no rescuer, no workqueue
            raise RuntimeError(f"cannot create the rescuer thread of workqueue {wq.name!r}: {exc}") from exc

    def signal(self) -> None:
        try:
            self.wake.release()
        except RuntimeError:
            pass  # a signal is pending already

    def summon(self, pool: PoolForWorkers[Worker]) -> None:
        """Mayday from ``pool``. P: held (lock order: pool, then rescuer)."""
        assert_held(pool.lock)
        with self.lock:
            if pool in self.pools:
                return
            self.pools.append(pool)
        self.signal()

    def stop(self) -> None:
        """Stop now (the workqueue is destroyed or gone). Safe from a finalizer."""
        self.stopping = True
        self.signal()

    def close(self) -> None:
        """Stop once the workqueue's works are done (the workqueue kicks on each drained color).
        Safe from a finalizer."""
        self.closing = True
        self.signal()

    kick = signal

    def thread_main(self) -> None:
        worker = self.worker
        current.worker = worker
        worker.native_id = threading.get_native_id()
        if self.batch:
            set_batch_policy()
        while True:
            self.wake.acquire()  # until signalled (a signal before this is kept by the lock)
            while not self.stopping:
                with self.lock:
                    pool = self.pools.popleft() if self.pools else None
                wq = self.wq_ref()
                if wq is None:
                    return
                if pool is None:
                    drained = self.closing and not any(wq._in_flight_counts())
                    del wq  # never sleep holding the workqueue: its finalizer stops this thread
                    if drained:
                        return
                    break  # nothing to do until the next signal
                try:
                    self.rescue(wq, pool)
                except Exception:
                    log.exception("rescuer of %s failed on pool %s", self.name, pool.name)
                del wq
            if self.stopping:
                return

    def rescue(self, wq: WorkQueueOps, pool: PoolForWorkers[Worker]) -> None:
        """Run the workqueue's pending works on ``pool``, one at a time, while the pool still lacks
        workers; then kick the pool so a regular worker takes over.

        The works stay on the worklist until each one runs, so a rescued work that blocks holds
        up only itself: the worker that creation brings at last takes the rest (the kernel's
        rescuer once took them all to a list of its own, where one blocking work stalled them
        all; fixed 2025). One pass moves the workqueue's works, in order, to the head of the
        worklist; the rescuer then takes its next work from there: the first one, unless another
        rescuer has put its own first meanwhile (then a scan in C finds it)."""
        worker = self.worker
        worker.pool = pool
        pool.system.bind_thread(pool)
        with pool.lock:
            worklist = pool.worklist
            mine: list[WorkItem] = []
            others: list[WorkItem] = []
            for work in worklist:
                (mine if _wq_of(work) is wq else others).append(work)
            if not mine:
                return
            if others:
                mine.extend(others)
                try:
                    worklist.clear()
                finally:
                    worklist.extend(mine)  # the same works, the workqueue's first
            while worklist:
                if _wq_of(worklist[0]) is wq:
                    work = worklist.popleft()
                else:
                    try:
                        at = operator.indexOf(map(_WQ_OF, worklist), wq)
                    except ValueError:
                        break  # none left: workers took them
                    work = worklist[at]
                    del worklist[at]
                pwq = work._pwq
                assert pwq is not None
                worker.process_one_work(work)
                pwq.nr_rescued += 1
                rescued = hooks.events.work_rescued
                if rescued is not None:
                    rescued(pool=pool, workqueue=wq, work=work)
                if not (pool.need_to_create_worker(pool) or not pool.online):
                    break
            if pool.need_more_worker(pool):
                pool.wake_up_worker()


def _wq_of(work: WorkItem) -> WorkQueueOps:
    pwq = work._pwq
    assert pwq is not None  # set while it is queued
    return pwq.wq


_WQ_OF = operator.attrgetter("_pwq.wq")  # _wq_of, in C (a queued work's _pwq is set)


def thread_cpu_ns(worker: Worker) -> int | None:
    """CPU time the worker's thread has used, in ns, or None if it has exited."""
    thread = worker.thread
    if thread is None or thread.ident is None or not thread.is_alive():
        return None  # a dead thread's clock id is undefined behaviour
    try:
        return time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))
    except (OSError, ProcessLookupError):
        return None


def set_thread_affinity(worker: Worker, cpus: set[int]) -> None:
    """Bind another worker's thread (best effort: the thread may be gone, the CPUs offline)."""
    if worker.native_id:
        try:
            os.sched_setaffinity(worker.native_id, cpus)
        except OSError:
            pass
