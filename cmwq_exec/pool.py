"""A worker pool: the kernel's ``global_cwq``, one per usable CPU plus one unbound.

Every workqueue queues its works on these shared pools. A pool keeps ``nr_running``, the number of
its workers that are runnable (processing and not asleep, not CPU-intensive, not rogue). Queueing a
work wakes an idle worker only when ``nr_running`` is 0; a running worker keeps taking works while it
is the only runner. When the last idle worker is about to start working it first becomes the manager
and creates another worker, so an idle worker is always ready for the next time a runner blocks.

Invariants (``L:`` fields, under ``lock``; checked by :meth:`check_invariants` in the tests):

* ``nr_workers == len(workers)``, every worker is idle, busy, or the manager;
* ``nr_idle == len(idle)`` and ``0 <= nr_running <= nr_workers - nr_idle``;
* ``nr_running`` equals the busy workers that are running (no ``NOT_RUNNING`` flag, not in PREP);
* while the pool is online and not managing, at least one idle worker exists once it has started.

Field ownership: ``I:`` set at init; ``L:`` under ``lock``; ``T:`` the trustee's while it is in charge.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from . import plugin, timer
from . import worker as _worker
from .worker import DIE, IDLE, NOT_RUNNING, ROGUE, Worker

if TYPE_CHECKING:
    from .system import System

log = logging.getLogger("cmwq_exec.pool")

TRUSTEE_START = "START"
TRUSTEE_IN_CHARGE = "IN_CHARGE"
TRUSTEE_BUTCHER = "BUTCHER"
TRUSTEE_RELEASE = "RELEASE"
TRUSTEE_DONE = "DONE"


class WorkerCreationError(RuntimeError):
    """A worker thread could not be created (thread limit, the configured cap, an injected fault)."""


class WorkerPool:
    """One pool of concurrency-managed workers (gcwq)."""

    def __init__(self, system: System, cpu: int | None, index: int) -> None:
        self.system = system  # I
        self.cpu = cpu  # I: None for the unbound pool
        self.index = index  # I: position in system.pools, indexes each workqueue's pwqs
        self.name = "unbound" if cpu is None else f"cpu{cpu}"  # I
        self.lock = threading.Lock()
        self.worklist: deque[Any] = deque()  # L: pending works, FIFO
        self.idle: dict[Worker, None] = {}  # L: idle workers; the last inserted is woken first (LIFO)
        self.workers: set[Worker] = set()  # L: every worker of the pool
        self.nr_workers = 0  # L
        self.nr_idle = 0  # L
        self.nr_running = 0  # L
        self.managing = False  # L: a worker (or the trustee) holds the manager role
        self.manage_requested = False  # L: GCWQ_MANAGE_WORKERS
        self.online = True  # L: serves its CPU; False once the CPU went down (trustee in charge)
        self.trustee_state = TRUSTEE_DONE  # L
        self.trustee_cond = threading.Condition(self.lock)  # trustee_wait
        self.done_cond = threading.Condition(self.lock)  # reusable works completed (flush_work)
        self.nr_done_waiters = 0  # L
        self.mayday_timer: timer.Timer | None = None  # L
        self.idle_timer: timer.Timer | None = None  # L
        self.next_worker_id = 0  # L
        self.first_worker_pending = False  # L: the timer thread is trying to create a first worker
        # counters, L: read at scrape time
        self.nr_started = 0  # works started here
        self.cm_wakeups = 0  # wakeups by concurrency management (a runner slept, or was found stuck)
        self.cpu_intensive = 0  # workers found hogging the CPU by the watchdog
        self.nr_mayday = 0  # mayday timer found the pool unable to get a worker
        self.watchdog_armed = False  # L: the watchdog looks at this pool while it has pending works
        self.wd_started = 0  # L: nr_started at the watchdog's last sign of progress
        self.wd_progress_at = time.monotonic()  # L: when that was
        self.stall_warned = False  # L: the current stall was reported
        self.read_policy()

    # -- policy -----------------------------------------------------------------------------------

    def read_policy(self) -> None:
        """Bind the policy functions in force (called again when plugins change)."""
        policy = plugin.current_policy
        self.need_more_worker = policy.need_more_worker
        self.may_start_working = policy.may_start_working
        self.keep_working = policy.keep_working
        self.need_to_create_worker = policy.need_to_create_worker
        self.need_to_manage_workers = policy.need_to_manage_workers
        self.too_many_workers = policy.too_many_workers

    # -- waking -----------------------------------------------------------------------------------

    def wake_up_worker(self) -> bool:
        """Wake the first idle worker. L: held. Returns False if none is idle (the manager is at it)."""
        if not self.idle:
            return False
        worker = next(reversed(self.idle))
        if not worker.woken:
            worker.woken = True
            worker.park.release()
        return True

    def insert_work(self, work: Any) -> None:
        """Append ``work`` to the worklist and wake a worker if the policy says so. L: held."""
        self.worklist.append(work)
        if self.need_more_worker(self) and not self.wake_up_worker() and not self.nr_workers:
            self.schedule_first_worker()
        if not self.watchdog_armed:
            self.system.watchdog.arm(self)

    # -- worker state transitions (the kernel's worker_set_flags / worker_clr_flags) ---------------

    def worker_set_flags(self, worker: Worker, flags: int, wakeup: bool) -> None:
        """Set ``flags``; a worker that stops running leaves ``nr_running``. L: held.

        With ``wakeup``, a worker that was the last runner hands over: an idle worker is woken if
        works are pending (concurrency management's whole point).
        """
        if flags & NOT_RUNNING and not worker.flags & NOT_RUNNING:
            self.nr_running -= 1
            if wakeup and self.worklist and self.need_more_worker(self):
                self.cm_wakeups += 1
                worker.count_cm_wakeup()
                if not self.wake_up_worker():
                    self.manage_requested = True
        worker.flags |= flags

    def worker_clr_flags(self, worker: Worker, flags: int) -> None:
        """Clear ``flags``; a worker that runs again re-enters ``nr_running``. L: held."""
        oflags = worker.flags
        worker.flags = oflags & ~flags
        if flags & NOT_RUNNING and oflags & NOT_RUNNING and not worker.flags & NOT_RUNNING:
            self.nr_running += 1

    def worker_enter_idle(self, worker: Worker) -> None:
        """L: held."""
        worker.flags |= IDLE
        worker.woken = False
        worker.last_active = time.monotonic()
        self.idle[worker] = None
        self.nr_idle += 1
        if worker.flags & ROGUE:
            self.trustee_cond.notify_all()
        elif self.idle_timer is None and self.too_many_workers(self):
            self.idle_timer = timer.add_timer(self.system.config.idle_timeout, self.idle_worker_timeout)

    def worker_leave_idle(self, worker: Worker) -> None:
        """L: held."""
        worker.flags &= ~IDLE
        del self.idle[worker]
        self.nr_idle -= 1

    # -- creating and destroying workers ----------------------------------------------------------

    def create_worker(self, rogue: bool = False) -> Worker:
        """Create and start a worker thread. Called WITHOUT the lock; raises WorkerCreationError.

        The new worker is parked (not yet idle); :meth:`start_worker` puts it on the idle list.
        """
        system = self.system
        with system.lock:
            if system.nr_threads >= system.config.max_total_workers:
                raise WorkerCreationError(
                    f"worker cap reached: {system.nr_threads} threads >= max_total_workers="
                    f"{system.config.max_total_workers}")
            system.nr_threads += 1
        with self.lock:
            worker_id = self.next_worker_id
            self.next_worker_id += 1
        worker = Worker(self, worker_id)
        if rogue:
            worker.flags |= ROGUE
        try:
            worker.thread = _worker.start_thread(worker.thread_main, f"cmwq/{self.name}:{worker_id}")
        except BaseException as exc:
            with system.lock:
                system.nr_threads -= 1
            if isinstance(exc, WorkerCreationError):
                raise
            raise WorkerCreationError(f"cannot start a worker thread for pool {self.name}: {exc}") from exc
        return worker

    def start_worker(self, worker: Worker) -> None:
        """Account a freshly created worker and make it idle. L: held."""
        self.workers.add(worker)
        self.nr_workers += 1
        self.worker_enter_idle(worker)
        created = plugin.events.worker_created
        if created is not None:
            created(pool=self, worker=worker)

    def destroy_worker(self, worker: Worker, reason: str) -> None:
        """Make an idle, not yet woken worker exit. L: held."""
        assert worker.flags & IDLE and not worker.woken
        self.worker_leave_idle(worker)
        self.workers.discard(worker)
        self.nr_workers -= 1
        worker.flags |= DIE
        worker.woken = True
        worker.park.release()
        with self.system.lock:
            self.system.nr_threads -= 1
        destroyed = plugin.events.worker_destroyed
        if destroyed is not None:
            destroyed(pool=self, worker=worker, reason=reason)

    def idle_worker_timeout(self) -> None:
        """Idle timer: reap workers idle for longer than ``idle_timeout`` beyond the ratio."""
        timeout = self.system.config.idle_timeout
        with self.lock:
            self.idle_timer = None
            while self.too_many_workers(self) and not self.managing:
                worker = next(iter(self.idle))  # the oldest idle worker
                expires = worker.last_active + timeout
                if worker.woken:
                    break
                if time.monotonic() < expires:
                    self.idle_timer = timer.add_timer(expires - time.monotonic(), self.idle_worker_timeout)
                    break
                self.destroy_worker(worker, "idle")

    # -- the manager ------------------------------------------------------------------------------

    def send_mayday(self) -> None:
        """Summon the rescuers of every workqueue with works pending here. L: held."""
        seen = set()
        for work in self.worklist:
            wq = work._pwq.wq
            if wq in seen:
                continue
            seen.add(wq)
            if wq._rescuer is not None:
                work._pwq.nr_mayday += 1
                wq._rescuer.summon(self)
                mayday = plugin.events.mayday
                if mayday is not None:
                    mayday(pool=self, workqueue=wq)

    def mayday_timeout(self) -> None:
        """Mayday timer: worker creation is taking too long, call for help and re-arm."""
        with self.lock:
            if self.mayday_timer is None:
                return
            draining = self.trustee_state == TRUSTEE_IN_CHARGE and self.worklist
            if draining or self.need_to_create_worker(self):
                self.nr_mayday += 1
                self.send_mayday()
            self.mayday_timer = timer.add_timer(self.system.config.mayday_interval, self.mayday_timeout)

    def _cancel_mayday_timer(self) -> None:
        """L: held."""
        if self.mayday_timer is not None:
            self.mayday_timer.cancel()
            self.mayday_timer = None

    def maybe_create_worker(self) -> bool:
        """Create workers until one is idle. Called by the manager with the lock held; drops it.

        On return need_to_create_worker() is False. While creation fails the mayday timer summons
        rescuers and the manager retries after ``create_cooldown``.
        """
        if not self.need_to_create_worker(self):
            return False
        config = self.system.config
        self.mayday_timer = timer.add_timer(config.mayday_initial_timeout, self.mayday_timeout)
        try:
            while True:
                self.lock.release()
                try:
                    worker = self.create_worker(rogue=not self.online)
                except WorkerCreationError as exc:
                    failed = plugin.events.worker_create_failed
                    if failed is not None:
                        failed(pool=self, error=exc)
                    log.debug("pool %s: %s", self.name, exc)
                    time.sleep(config.create_cooldown)
                    self.lock.acquire()
                    if not self.need_to_create_worker(self):
                        return True
                    continue
                self.lock.acquire()
                self.start_worker(worker)
                return True
        finally:
            self._cancel_mayday_timer()

    def manage_workers(self, worker: Worker | None) -> bool:
        """Take the manager role (if free) and create a worker if needed. L: held, may be dropped.

        Returns False if no action was taken and the lock stayed held throughout.
        """
        if self.managing:
            return False
        self.manage_requested = False
        self.managing = True
        try:
            created = self.maybe_create_worker()
        finally:
            self.managing = False
            if self.trustee_state != TRUSTEE_DONE:
                self.trustee_cond.notify_all()
        if created:
            ran = plugin.events.manager_ran
            if ran is not None:
                ran(pool=self, created=1, destroyed=0)
        return created

    # -- starting ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the pool's first worker; if that fails, keep trying from the timer thread."""
        try:
            worker = self.create_worker()
        except WorkerCreationError as exc:
            log.warning("pool %s: cannot create its first worker (will retry): %s", self.name, exc)
            with self.lock:
                self.schedule_first_worker()
            return
        with self.lock:
            self.start_worker(worker)
            if self.need_more_worker(self):
                self.wake_up_worker()  # works may be waiting (a pool handed back by its trustee)

    def schedule_first_worker(self) -> None:
        """A pool without any worker has nobody to be its manager: the timer thread tries to create
        one, sends mayday while works wait, and retries after ``create_cooldown``. L: held."""
        if self.first_worker_pending:
            return
        self.first_worker_pending = True
        timer.add_timer(0, self._create_first_worker)

    def _create_first_worker(self) -> None:
        with self.lock:
            if self.nr_workers or self.managing:
                self.first_worker_pending = False
                return
            self.managing = True
        worker: Worker | None
        try:
            worker = self.create_worker(rogue=not self.online)
        except WorkerCreationError:
            worker = None
        with self.lock:
            self.managing = False
            if worker is not None:
                self.first_worker_pending = False
                self.start_worker(worker)
                if self.need_more_worker(self):
                    self.wake_up_worker()
                return
            if self.worklist:
                self.nr_mayday += 1
                self.send_mayday()
            timer.add_timer(self.system.config.create_cooldown, self._create_first_worker)

    # -- reading ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of the pool's state and counters (for metrics and ``top``)."""
        with self.lock:
            return {
                "pool": self.name,
                "cpu": self.cpu,
                "online": self.online,
                "nr_running": self.nr_running,
                "nr_idle": self.nr_idle,
                "nr_workers": self.nr_workers,
                "nr_pending": len(self.worklist),
                "cm_wakeups": self.cm_wakeups,
                "cpu_intensive": self.cpu_intensive,
                "mayday": self.nr_mayday,
                "trustee_state": self.trustee_state,
                "managing": self.managing,
            }

    def check_invariants(self) -> None:
        """Assert the invariants written in the module docstring. L: held by the caller."""
        busy = [w for w in self.workers if not w.flags & IDLE]
        running = [w for w in busy if not w.flags & NOT_RUNNING]
        assert self.nr_workers == len(self.workers), (self.nr_workers, len(self.workers))
        assert self.nr_idle == len(self.idle), (self.nr_idle, len(self.idle))
        assert all(w.flags & IDLE for w in self.idle)
        assert 0 <= self.nr_running <= len(busy), (self.nr_running, len(busy))
        if self.trustee_state == TRUSTEE_DONE:
            assert self.nr_running == len(running), (self.nr_running, len(running))

    def __repr__(self) -> str:
        return (f"<WorkerPool {self.name} workers={self.nr_workers} idle={self.nr_idle} "
                f"running={self.nr_running}>")


