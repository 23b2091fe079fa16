"""A worker pool: the kernel's ``global_cwq``, one per usable CPU plus one unbound.

Every workqueue queues its works on these shared pools. A pool keeps ``nr_running``, the number of
its workers that are runnable (processing and not asleep, not CPU-intensive, not rogue). Queueing a
work wakes an idle worker only when ``nr_running`` is 0; a running worker keeps taking works while it
is the only runner. When the last idle worker is about to start working it first becomes the manager
and creates another worker, so an idle worker is always ready for the next time a runner blocks.

Invariants (``P:`` fields, under ``lock``; checked by :meth:`check_invariants` in the tests):

* ``nr_workers == len(workers)``, every worker is idle, busy, or the manager;
* ``nr_idle == len(idle)`` and ``0 <= nr_running <= nr_workers - nr_idle``;
* ``nr_woken`` is the number of idle workers already woken;
* ``nr_running`` equals the busy workers that are running (no ``NOT_RUNNING`` flag, not in PREP);
* while the pool is online and not managing, at least one idle worker exists once it has started,
  unless it paces: beyond ``unpaced_workers`` a pool lets its last idle worker start working without
  making another, and while works wait and none of its workers runs, ``pacer.timer`` is armed (or
  the timer thread is to create a worker: ``manager.create_pending``).

Growth. A pool that needs a worker first adopts a spare idle worker of another pool
(:meth:`Manager.give_idle_worker <cmwq_exec.core.manager.Manager.give_idle_worker>`): that adds no
thread. Only then does it create one: at once up to ``unpaced_workers``, beyond that one per
``create_interval`` in which no work finished, and not while most of its sleepers are due back
(:mod:`cmwq_exec.core.pacing`).

Parts. This module is the pool's run state: the worklist, ``nr_running``, the idle list, waking,
the flags of its workers, and the policy functions in force; every queued and every finished work
goes through it and through none of the parts, so its fields stay on the pool (one attribute hop
less per work). Each other concern is a part
with its own fields, reached from the pool: ``pool.manager`` (the manager role's work: creating,
adopting, reaping workers; :mod:`~cmwq_exec.core.manager`), ``pool.pacer`` (how fast it grows
beyond ``unpaced_workers``; :mod:`~cmwq_exec.core.pacing`), ``pool.mayday`` (calls for the
rescuers; :mod:`~cmwq_exec.core.mayday`), ``pool.trustee`` (the trustee's state while its CPU is
down; :mod:`~cmwq_exec.core.trustee`) and ``pool.watch`` (the watchdog's; :mod:`~cmwq_exec.core.poolwatch`).

Field ownership: the letters of the core's legend (:mod:`cmwq_exec.core.lockdep`): ``I:`` set at init,
``P:`` under ``lock``.

Interruptions. Every critical section here that a caller's thread can reach follows the rule
written once in :mod:`cmwq_exec.core.interrupts` (locks in ``with`` blocks; calls first, stores
after; pop in a ``try``, append in its ``finally``), so an asynchronous exception anywhere leaves the
invariants above true (``worker_set_flags`` is an example: the flag and the count first, the
handover's calls after).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from . import hooks, timer
from . import policy as _policy
from .interfaces import SystemForPools
from .lockdep import assert_held, make_lock, must_hold
from .manager import Manager
from .manager import WorkerCreationError as WorkerCreationError  # re-exported: the pool's error
from .manager import interpreter_exiting as interpreter_exiting  # re-exported: workqueue's atexit
from .mayday import Mayday
from .pacing import Pacer
from .poolwatch import PoolWatch
from .trustee import TRUSTEE_DONE, TrusteeState
from .worker import DIE, IDLE, NOT_RUNNING, ROGUE, Worker

log = logging.getLogger("cmwq_exec.pool")


class Unlocked:
    """``with pool.unlocked:`` drops the held pool lock for the block and takes it back however the
    block ends (the manager creating a worker, a worker running a work)."""

    __slots__ = ("lock",)

    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        self.lock.release()

    def __exit__(self, *exc_info: Any) -> None:
        self.lock.acquire()


class WorkerPool:
    """One pool of concurrency-managed workers (gcwq): its run state, and its parts."""

    def __init__(self, system: SystemForPools[WorkerPool, Worker], cpu: int | None, index: int) -> None:
        self.system = system  # I
        self.cpu = cpu  # I: None for the unbound pool
        self.index = index  # I: position in system.pools, indexes each workqueue's pwqs
        self.name = "unbound" if cpu is None else f"cpu{cpu}"  # I
        self.lock = make_lock("pool")  # I
        self.unlocked = Unlocked(self.lock)  # I
        self.worklist: deque[Any] = deque()  # P: pending works, FIFO
        self.idle: dict[Worker, None] = {}  # P: idle workers; the last inserted is woken first (LIFO)
        self.workers: set[Worker] = set()  # P: every worker of the pool
        self.nr_workers = 0  # P
        self.nr_idle = 0  # P
        self.nr_woken = 0  # P: idle workers already woken (on their way out of the idle list)
        self.nr_running = 0  # P
        self.managing = False  # P: a worker (or the trustee, or the timer thread) holds the manager role
        self.manage_requested = False  # P: GCWQ_MANAGE_WORKERS
        self.online = True  # P: serves its CPU; False once the CPU went down (trustee in charge)
        self.dying = False  # P: System.shutdown(): workers exit as they go idle
        self.next_worker_id = 0  # P: workers numbered so far (0: the pool has not started)
        self.idle_timer: timer.Timer | None = None  # P: the manager's reaping timer; read on every idle entry
        self.watchdog_armed = False  # P: the watchdog looks at this pool; read on every queueing
        self.sleep_avg = 0.0  # P: moving average of how long a blocking() sleep lasts here
        self.woke_at = 0.0  # P: when a blocking() sleep here last ended
        # counters, P: read at scrape time
        self.nr_started = 0  # works started here
        self.nr_completed = 0  # works finished here
        self.cm_wakeups = 0  # wakeups by concurrency management (a runner slept, or was found stuck)
        # the parts (I), each owning its own fields
        self.manager = Manager(self)
        self.pacer = Pacer(self)
        self.mayday = Mayday(self)
        self.trustee = TrusteeState(self.lock)
        self.watch = PoolWatch()
        self.read_policy()

    # -- policy -----------------------------------------------------------------------------------

    def read_policy(self) -> None:
        """Bind the policy functions in force (called again when plugins change)."""
        policy = hooks.current_policy
        self.need_more_worker = policy.need_more_worker
        self.may_start_working = policy.may_start_working
        self.keep_working = policy.keep_working
        self.need_to_create_worker = policy.need_to_create_worker
        self.need_to_manage_workers = policy.need_to_manage_workers
        self.too_many_workers = policy.too_many_workers
        # the kernel's formulas are inlined on the per-work paths (queueing, running) while they are
        # in force; a plugin's are called there
        self.kernel_policy = all(getattr(policy, name) is getattr(_policy, name)
                                 for name in hooks.POLICY_NAMES)

    # -- waking -----------------------------------------------------------------------------------

    @must_hold("lock")
    def wake_up_worker(self) -> bool:
        """Wake the first idle worker. P: held. Returns False if none is idle (the manager is at it)."""
        if not self.idle:
            return False
        self.wake_worker(next(reversed(self.idle)))
        return True

    @must_hold("lock")
    def wake_worker(self, worker: Worker) -> None:
        """Wake an idle worker unless it was woken already. P: held.

        A worker parks by acquiring its ``park`` lock, which is held while it is idle; waking
        releases it, at most once per idle period (``woken``), so a wakeup that comes before the
        worker parks is kept by the lock and none is lost or doubled (see Worker.thread_main)."""
        if not worker.woken:
            worker.woken = True
            if worker.flags & IDLE:
                self.nr_woken += 1
            worker.park.release()

    @must_hold("lock")
    def prepare_insert(self) -> None:
        """Before works are appended to the worklist: arm the watchdog. P: held.

        The calls that may fail come before the worklist changes (rule 2 of
        :mod:`cmwq_exec.core.interrupts`)."""
        if not self.watchdog_armed:
            self.system.watchdog.arm(self)

    @must_hold("lock")
    def kick(self) -> None:
        """After works were appended: wake a worker if the policy says so, or have one created if
        the pool has nobody to wake and nobody who could create one. P: held."""
        if self.need_more_worker(self) and not self.wake_up_worker():
            if not self.nr_workers:
                self.manager.schedule_create_worker()
            elif not self.managing:
                self.pacer.pace_create_worker()  # every worker asleep and the pool beyond unpaced_workers

    @must_hold("lock")
    def insert_work(self, work: Any) -> None:
        """Append a work whose accounting is done to the worklist, and wake a worker. P: held."""
        self.prepare_insert()
        self.worklist.append(work)
        self.kick()

    # -- worker state transitions (the kernel's worker_set_flags / worker_clr_flags) ---------------

    @must_hold("lock")
    def worker_set_flags(self, worker: Worker, flags: int, wakeup: bool) -> None:
        """Set ``flags``; a worker that stops running leaves ``nr_running``. P: held.

        With ``wakeup``, a worker that was the last runner then hands over (:meth:`Worker.hand_over
        <cmwq_exec.core.worker.Worker.hand_over>`): an idle worker is woken if works are pending
        (concurrency management's whole point). The flag and the count are stored first, with no
        call between them, and the handover's calls come after: an asynchronous exception at any
        of their returns leaves ``nr_running`` matching the flags (:mod:`cmwq_exec.core.interrupts`)."""
        oflags = worker.flags
        worker.flags = oflags | flags
        if flags & NOT_RUNNING and not oflags & NOT_RUNNING:
            self.nr_running -= 1
            if wakeup:
                worker.hand_over(self)

    @must_hold("lock")
    def worker_clr_flags(self, worker: Worker, flags: int) -> None:
        """Clear ``flags``; a worker that runs again re-enters ``nr_running``. P: held."""
        oflags = worker.flags
        worker.flags = oflags & ~flags
        if flags & NOT_RUNNING and oflags & NOT_RUNNING and not worker.flags & NOT_RUNNING:
            self.nr_running += 1

    @must_hold("lock")
    def worker_enter_idle(self, worker: Worker) -> None:
        """P: held."""
        worker.flags |= IDLE
        worker.woken = False
        worker.last_active = time.monotonic()
        self.idle[worker] = None
        self.nr_idle += 1
        if self.dying:
            self.manager.destroy_worker(worker, "shutdown")
        elif worker.flags & ROGUE:
            self.trustee.cond.notify_all()
        elif self.idle_timer is None and self.too_many_workers(self):
            self.idle_timer = timer.add_timer(self.system.config.idle_timeout,
                                              self.manager.idle_worker_timeout)

    @must_hold("lock")
    def worker_leave_idle(self, worker: Worker) -> None:
        """P: held."""
        worker.flags &= ~IDLE
        del self.idle[worker]
        self.nr_idle -= 1
        if worker.woken:
            self.nr_woken -= 1

    # -- the seams the worker uses (cmwq_exec.core.worker) -----------------------------------------

    @must_hold("lock")
    def manage_workers(self, worker: Worker | None) -> bool:
        """:meth:`Manager.manage_workers <cmwq_exec.core.manager.Manager.manage_workers>`. P: held."""
        return self.manager.manage_workers(worker)

    @must_hold("lock")
    def pace_create_worker(self, delay: float = 0.0) -> None:
        """:meth:`Pacer.pace_create_worker <cmwq_exec.core.pacing.Pacer.pace_create_worker>`. P: held."""
        self.pacer.pace_create_worker(delay)

    def shutdown(self) -> None:
        """System.shutdown(): idle workers exit now, busy ones when they go idle."""
        with self.lock:
            self.dying = True
            if not self.worklist:  # else they run what is left and exit as they go idle
                for worker in [w for w in self.idle if not w.woken]:
                    self.manager.destroy_worker(worker, "shutdown")
            if self.idle_timer is not None:
                self.idle_timer.cancel()
                self.idle_timer = None

    def worker_crashed(self, worker: Worker, exc: BaseException) -> None:
        """A worker's loop raised (a bug; hooks and works cannot make it). Take the worker out of
        the accounting and make sure the pool still has someone to run its works. No lock held."""
        log.critical("cmwq_exec worker %r died: %r; the pool replaces it", worker, exc, exc_info=exc)
        with self.lock:
            if worker.flags & IDLE:
                self.worker_leave_idle(worker)
            if worker in self.workers:
                self.workers.discard(worker)
                self.nr_workers -= 1
                if not worker.flags & NOT_RUNNING:
                    self.nr_running -= 1
                with self.system.threads_lock:
                    self.system.nr_threads -= 1
            worker.flags |= DIE
            if self.worklist and not self.wake_up_worker():
                self.manager.schedule_create_worker()
        destroyed = hooks.events.worker_destroyed
        if destroyed is not None:
            destroyed(pool=self, worker=worker, reason="crashed")

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
                "sleep_avg": self.sleep_avg,
                "cm_wakeups": self.cm_wakeups,
                "cpu_intensive": self.watch.cpu_intensive,
                "mayday": self.mayday.nr_mayday,
                "paced": self.pacer.nr_paced,
                "adopted": self.manager.nr_adopted,
                "given": self.manager.nr_given,
                "trustee_state": self.trustee.state,
                "managing": self.managing,
            }

    def check_invariants(self) -> None:
        """Assert the invariants written in the module docstring. P: held by the caller."""
        assert_held(self.lock)
        busy = [w for w in self.workers if not w.flags & IDLE]
        running = [w for w in busy if not w.flags & NOT_RUNNING]
        assert self.nr_workers == len(self.workers), (self.nr_workers, len(self.workers))
        assert self.nr_idle == len(self.idle), (self.nr_idle, len(self.idle))
        assert all(w.flags & IDLE for w in self.idle)
        assert self.nr_woken == sum(1 for w in self.idle if w.woken), self.nr_woken
        assert 0 <= self.nr_running <= len(busy), (self.nr_running, len(busy))
        if self.trustee.state == TRUSTEE_DONE:
            assert self.nr_running == len(running), (self.nr_running, len(running))
            if (self.kernel_policy and self.worklist and self.nr_workers and not self.nr_running
                    and not self.nr_idle and not self.managing and self.online and not self.dying):
                assert self.pacer.timer is not None or self.manager.create_pending, "works wait for nobody"

    def __repr__(self) -> str:
        return (f"<WorkerPool {self.name} workers={self.nr_workers} idle={self.nr_idle} "
                f"running={self.nr_running}>")


