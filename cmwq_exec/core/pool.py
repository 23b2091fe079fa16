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
  making another, and while works wait and none of its workers runs, ``pace_timer`` is armed (or
  the timer thread is to create a worker: ``create_pending``).

Growth. A pool that needs a worker first adopts a spare idle worker of another pool
(:meth:`give_idle_worker`): that adds no thread. Only then does it create one: at once up to
``unpaced_workers``, beyond that one per ``create_interval`` in which no work finished
(:meth:`pace_create_worker`), and not while most of its sleepers are due back
(:meth:`sleepers_due`).

Field ownership: the letters of the core's legend (:mod:`cmwq_exec.core.lockdep`): ``I:`` set at init,
``P:`` under ``lock``.

Interruptions. A ``KeyboardInterrupt`` (or any asynchronous exception) is raised only where the
interpreter checks for one: when a call returns and on a backward jump, never between two stores.
Every lock is taken in a ``with`` block (the lock is released however the block ends); a critical
section reachable from a caller's thread makes its calls first (they may fail) and its changes
after, with no call between two changes but the last; a move from one list to another pops in a
``try`` and appends in its ``finally``. So an interruption anywhere leaves the invariants above true.
A wakeup lost to one (a work appended, the wake not yet done) is made up by the watchdog, which
wakes a worker for a pool with works pending and nobody running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from . import hooks, timer
from . import policy as _policy
from . import worker as _worker
from .cpus import Placed
from .lockdep import assert_held, make_lock, must_hold
from .worker import DIE, IDLE, NOT_RUNNING, ROGUE, SLEEPING, Worker

if TYPE_CHECKING:
    from .config import Config


class Arming(Protocol):
    def arm(self, pool: WorkerPool) -> None: ...


class System(Protocol):
    """What a pool needs of the set of pools it belongs to (:class:`cmwq_exec.core.system.System`)."""

    config: Config
    threads_lock: Any  # a lock (cmwq_exec.core.lockdep.make_lock)
    nr_threads: int
    timing: bool
    usable: set[int]

    @property
    def watchdog(self) -> Arming: ...
    @property
    def unbound_pool(self) -> WorkerPool: ...
    def bind_thread(self, pool: Placed) -> None: ...
    def adopt_idle_worker(self, pool: WorkerPool) -> Worker | None: ...

log = logging.getLogger("cmwq_exec.pool")

TRUSTEE_START = "START"
TRUSTEE_IN_CHARGE = "IN_CHARGE"
TRUSTEE_BUTCHER = "BUTCHER"
TRUSTEE_RELEASE = "RELEASE"
TRUSTEE_DONE = "DONE"

#: A pool gives another pool idle workers only beyond this many idle workers of its own (the
#: kernel's too_many_workers keeps two idle as well).
SPARE_IDLE = 2


#: Set at interpreter exit (see :func:`interpreter_exiting`): no new thread can be started then.
_interpreter_exiting = False


def interpreter_exiting() -> None:
    """The interpreter is exiting: managers stop waiting for workers that cannot be created."""
    global _interpreter_exiting
    _interpreter_exiting = True


class WorkerCreationError(RuntimeError):
    """A worker thread could not be created (thread limit, the configured cap, an injected fault)."""


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
    """One pool of concurrency-managed workers (gcwq)."""

    def __init__(self, system: System, cpu: int | None, index: int) -> None:
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
        self.managing = False  # P: a worker (or the trustee) holds the manager role
        self.manage_requested = False  # P: GCWQ_MANAGE_WORKERS
        self.online = True  # P: serves its CPU; False once the CPU went down (trustee in charge)
        self.trustee_state = TRUSTEE_DONE  # P
        self.trustee_cond = threading.Condition(self.lock)  # I: trustee_wait, over lock
        self.dying = False  # P: System.shutdown(): workers exit as they go idle
        self.mayday_timer: timer.Timer | None = None  # P
        self.idle_timer: timer.Timer | None = None  # P
        self.next_worker_id = 0  # P
        self.create_pending = False  # P: the timer thread is to create a worker (no worker can)
        self.pace_timer: timer.Timer | None = None  # P: a paced creation is due when it fires
        self.pace_completed = 0  # P: nr_completed when it was armed
        self.sleep_avg = 0.0  # P: moving average of how long a blocking() sleep lasts here
        self.woke_at = 0.0  # P: when a blocking() sleep here last ended
        # counters, P: read at scrape time
        self.nr_started = 0  # works started here
        self.nr_completed = 0  # works finished here
        self.nr_paced = 0  # creations put off: a runner came back within a pacing interval, or
        # most sleepers are expected back (see sleepers_due)
        self.nr_adopted = 0  # idle workers taken from other pools instead of creating a thread
        self.nr_given = 0  # idle workers given to other pools
        self.cm_wakeups = 0  # wakeups by concurrency management (a runner slept, or was found stuck)
        self.cpu_intensive = 0  # workers found hogging the CPU by the watchdog
        self.nr_mayday = 0  # mayday timer found the pool unable to get a worker
        self.watchdog_armed = False  # P: the watchdog looks at this pool while it has pending works
        self.wd_started = 0  # P: nr_started at the watchdog's last sign of progress
        self.wd_progress_at = time.monotonic()  # P: when that was
        self.stall_warned = False  # P: the current stall was reported
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

        The calls that may fail come before the worklist changes (see "Interruptions")."""
        if not self.watchdog_armed:
            self.system.watchdog.arm(self)

    @must_hold("lock")
    def kick(self) -> None:
        """After works were appended: wake a worker if the policy says so, or have one created if
        the pool has nobody to wake and nobody who could create one. P: held."""
        if self.need_more_worker(self) and not self.wake_up_worker():
            if not self.nr_workers:
                self.schedule_create_worker()
            elif not self.managing:
                self.pace_create_worker()  # every worker asleep and the pool beyond unpaced_workers

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
                    if not self.managing:
                        self.pace_create_worker()
        worker.flags |= flags

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
            self.destroy_worker(worker, "shutdown")
        elif worker.flags & ROGUE:
            self.trustee_cond.notify_all()
        elif self.idle_timer is None and self.too_many_workers(self):
            self.idle_timer = timer.add_timer(self.system.config.idle_timeout, self.idle_worker_timeout)

    @must_hold("lock")
    def worker_leave_idle(self, worker: Worker) -> None:
        """P: held."""
        worker.flags &= ~IDLE
        del self.idle[worker]
        self.nr_idle -= 1
        if worker.woken:
            self.nr_woken -= 1

    # -- creating and destroying workers ----------------------------------------------------------

    def add_worker(self, rogue: bool = False) -> bool:
        """Create one worker, start its thread and make it idle; False if that failed (the
        ``cmwq_worker_create_failed`` event says why). P: held, dropped while the thread starts.

        Every worker of a pool is made here: by the manager, by the timer for a pool that has
        nobody to manage it, and by the trustee (``rogue``: unbound, for a pool whose CPU left)."""
        assert_held(self.lock)
        with self.unlocked:
            worker = None if rogue else self.system.adopt_idle_worker(self)
            adopted = worker is not None
            if worker is None:
                try:
                    worker = self.create_worker(rogue)
                except WorkerCreationError as exc:
                    self.creation_failed(exc)
                    return False
        self.start_worker(worker, adopted)
        return True

    def create_worker(self, rogue: bool = False) -> Worker:
        """Create and start a worker thread (for :meth:`add_worker`, and the tests' fault injection).
        Called WITHOUT the lock; raises WorkerCreationError. The new worker is parked (not yet
        idle); :meth:`start_worker` puts it on the idle list.
        """
        system = self.system
        with system.threads_lock:
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
            with system.threads_lock:
                system.nr_threads -= 1
            if isinstance(exc, WorkerCreationError):
                raise
            raise WorkerCreationError(f"cannot start a worker thread for pool {self.name}: {exc}") from exc
        return worker

    def start_worker(self, worker: Worker, adopted: bool = False) -> None:
        """Account a freshly created (or ``adopted``) worker and make it idle. P: held."""
        assert_held(self.lock)
        donor = worker.pool
        if adopted:
            worker.pool = self
            self.bind_adopted(worker)
            worker.id = self.next_worker_id
            self.next_worker_id += 1
            if worker.thread is not None:
                worker.thread.name = f"cmwq/{self.name}:{worker.id}"
            self.nr_adopted += 1
        self.workers.add(worker)
        self.nr_workers += 1
        self.worker_enter_idle(worker)
        if adopted:
            moved = hooks.events.worker_adopted
            if moved is not None:
                moved(pool=self, worker=worker, donor=donor)
        else:
            created = hooks.events.worker_created
            if created is not None:
                created(pool=self, worker=worker)

    def bind_adopted(self, worker: Worker) -> None:
        """Bind an adopted worker's thread to this pool's CPU (or every usable CPU), as its own
        thread would on start. P: held, as the trustee holds it to re-bind workers. A thread that
        has not bound itself yet (no ``native_id``) binds to this pool itself: it binds under the
        lock of the pool it is in (Worker.thread_main)."""
        assert_held(self.lock)
        config = self.system.config
        if self.cpu is None or config.pin_workers:
            cpus = self.system.usable
            if self.cpu is not None and self.online:
                cpus = {self.cpu}
            _worker.set_thread_affinity(worker, cpus)

    def give_idle_worker(self) -> Worker | None:
        """Take an idle worker this pool can spare off its lists, for another pool that needs one
        (:meth:`System.adopt_idle_worker`); None if it has none to spare. P: held.

        It spares only beyond ``SPARE_IDLE`` idle workers not yet woken, and only while online with
        no trustee or manager at work. The one given is the longest idle (the pool wakes the most
        recent first). It stays parked until its new pool wakes it."""
        assert_held(self.lock)
        if (self.nr_idle - self.nr_woken <= SPARE_IDLE or not self.online or self.dying
                or self.managing or self.trustee_state != TRUSTEE_DONE):
            return None
        worker = next(iter(self.idle))
        if worker.woken or worker.flags & ROGUE:
            return None
        self.worker_leave_idle(worker)
        self.workers.discard(worker)
        self.nr_workers -= 1
        self.nr_given += 1
        return worker

    def destroy_worker(self, worker: Worker, reason: str) -> None:
        """Make an idle, not yet woken worker exit. P: held."""
        assert_held(self.lock)
        assert worker.flags & IDLE and not worker.woken
        self.worker_leave_idle(worker)
        self.workers.discard(worker)
        self.nr_workers -= 1
        worker.flags |= DIE
        self.wake_worker(worker)
        with self.system.threads_lock:
            self.system.nr_threads -= 1
        destroyed = hooks.events.worker_destroyed
        if destroyed is not None:
            destroyed(pool=self, worker=worker, reason=reason)

    def idle_worker_timeout(self) -> None:
        """Idle timer: reap workers idle for longer than ``idle_timeout`` beyond the ratio."""
        timeout = self.system.config.idle_timeout
        destroyed = 0
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
                destroyed += 1
        ran = hooks.events.manager_ran
        if destroyed and ran is not None:  # the manager's other half (maybe_destroy_workers)
            ran(pool=self, created=0, destroyed=destroyed)

    # -- the manager ------------------------------------------------------------------------------

    def send_mayday(self) -> None:
        """Summon the rescuers of every workqueue with works pending here. P: held."""
        assert_held(self.lock)
        seen = set()
        for work in self.worklist:
            wq = work._pwq.wq
            if wq in seen:
                continue
            seen.add(wq)
            if wq._rescuer is not None:
                work._pwq.nr_mayday += 1
                wq._rescuer.summon(self)
                mayday = hooks.events.mayday
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
        """P: held."""
        assert_held(self.lock)
        if self.mayday_timer is not None:
            self.mayday_timer.cancel()
            self.mayday_timer = None

    def maybe_create_worker(self) -> bool:
        """Create workers until one is idle. Called by the manager, P: held; dropped meanwhile.

        On return need_to_create_worker() is False. While creation fails the mayday timer summons
        rescuers and the manager retries after ``create_cooldown``. At interpreter exit no thread
        can be started (Python 3.12+ refuses): the manager gives up at once and runs the works
        itself (False: nothing was created), so the exit's flush finishes on the workers there are.
        """
        assert_held(self.lock)
        if not self.need_to_create_worker(self):
            return False
        config = self.system.config
        if self.nr_workers >= config.unpaced_workers and self.online and not self.dying:
            with self.unlocked:  # a spare idle worker of another pool adds no thread: no pacing
                worker = self.system.adopt_idle_worker(self)
            if worker is None:
                self.pace_create_worker()
                return False
            self.start_worker(worker, adopted=True)
            return True
        self._cancel_mayday_timer()  # one mayday chain per pool (the timer thread's may run)
        self.mayday_timer = timer.add_timer(config.mayday_initial_timeout, self.mayday_timeout)
        try:
            while not self.add_worker(rogue=not self.online):
                if _interpreter_exiting:
                    return False
                with self.unlocked:
                    time.sleep(config.create_cooldown)
                if not self.need_to_create_worker(self):
                    break
            return True
        finally:
            self._cancel_mayday_timer()

    def creation_failed(self, exc: WorkerCreationError) -> None:
        """A worker could not be created: tell the plugins (no lock held)."""
        failed = hooks.events.worker_create_failed
        if failed is not None:
            failed(pool=self, error=exc)
        log.debug("pool %s: %s", self.name, exc)

    def manage_workers(self, worker: Worker | None) -> bool:
        """Take the manager role (if free) and create a worker if needed. P: held, may be dropped.

        Returns False if no action was taken and the lock stayed held throughout.
        """
        assert_held(self.lock)
        if self.managing:
            return False
        self.manage_requested = False
        self.managing = True
        adopted = self.nr_adopted
        try:
            added = self.maybe_create_worker()
        finally:
            self.managing = False
            if self.trustee_state != TRUSTEE_DONE:
                self.trustee_cond.notify_all()
        if added and self.nr_adopted == adopted:  # an adopted worker was not created
            ran = hooks.events.manager_ran
            if ran is not None:
                ran(pool=self, created=1, destroyed=0)
        return added

    # -- starting ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the pool's first worker; if that fails, keep trying from the timer thread."""
        with self.lock:
            self.schedule_create_worker(now=True)

    def schedule_create_worker(self, now: bool = False) -> None:
        """A pool without an idle worker and without anyone to be its manager (no worker at all, or
        its workers gone): the timer thread creates one, sends mayday while works wait, and retries
        after ``create_cooldown``. With ``now``, the calling thread tries first. P: held."""
        assert_held(self.lock)
        if self.create_pending:
            return
        self.create_pending = True
        if now:
            self._create_worker_from_timer(locked=True)
        else:
            timer.add_timer(0, self._create_worker_from_timer)

    def pace_create_worker(self, delay: float = 0.0) -> None:
        """Every worker is busy and none runs, works wait, and the pool already has
        ``unpaced_workers``: create the next worker after ``create_interval`` unless a work finished
        meanwhile (a runner came back and takes the next work). P: held.

        Creating a thread whenever the last runner sleeps sizes the pool to every work of a burst
        that blocks at once; a runner coming back serves the burst as well without a new thread.
        So beyond ``unpaced_workers`` a pool adds at most one worker per interval, and only while
        no runner came back for a whole interval: a pending work waits at most one interval per
        worker it needs, and never for a worker that exists (idle workers are woken at once).
        ``delay``: fire no sooner than this (sleepers due back)."""
        assert_held(self.lock)
        if self.pace_timer is None and not self.create_pending:
            self.pace_completed = self.nr_completed
            self.pace_timer = timer.add_timer(max(delay, self.system.config.create_interval),
                                              self._pace_timeout)

    def _pace_timeout(self) -> None:
        """Pacing timer (timer thread): create the worker if still nobody runs, nothing finished,
        and most sleepers are not due back yet."""
        with self.lock:
            self.pace_timer = None
            if self.managing or not self.need_to_create_worker(self):
                return  # a runner or an idle worker is back; the next one to sleep re-arms
            if self.nr_completed != self.pace_completed:
                self.nr_paced += 1
                self.pace_create_worker()
                return
            now = time.monotonic()
            due = self.sleepers_due(now) - now
            if due > 0:
                self.nr_paced += 1
                self.pace_create_worker(due)
                return
            self.schedule_create_worker(now=True)
            if not self.create_pending:  # created: the next one is due an interval from now
                self.pace_create_worker()

    def sleepers_due(self, now: float) -> float:
        """Until when (monotonic time) a paced creation waits for sleepers to come back. Reads ``P``
        fields: its caller holds the lock (a function of them alone, which the tests call on plain objects).

        A sleep counts as expected back while it is younger than twice this pool's average sleep
        (``sleep_avg``, capped at ``create_hold_max``). While at least half of the busy workers are
        such young sleepers, the next wave of returns is near and will serve the waiting works: a
        burst of short waits then reuses the workers of the last burst instead of adding threads.

        The average only learns from sleeps that end. A sleeper older than the window that is not
        followed by any return within the window shows that sleeps here are not short now (works
        that wait for each other, long waits): then nothing is held, and creation goes on one per
        interval however young the newest sleepers are. Returns 0 (no wait) when no sleep was
        measured yet; otherwise the answer may come early (the caller asks again then)."""
        window = min(2 * self.sleep_avg, self.system.config.create_hold_max)
        if window <= 0:
            return 0.0
        need = (self.nr_workers - self.nr_idle + 1) // 2  # half of the busy workers, rounded up
        if need < 1:
            return 0.0
        cutoff = now - window
        young: list[float] = []
        overdue = False
        for worker in self.workers:
            if worker.flags & SLEEPING:
                if worker.slept_at > cutoff:
                    young.append(worker.slept_at)
                else:
                    overdue = True
        if len(young) < need:
            return 0.0
        if not overdue:
            return min(young) + window  # then the oldest one is overdue: ask again
        if self.woke_at <= cutoff:
            return 0.0  # an overdue sleeper and no return since: the average is stale
        # held until the return ages past the window, or fewer than `need` sleepers are young:
        # that is when the need-th youngest one ages past it
        young.sort()
        return min(young[len(young) - need], self.woke_at) + window

    def _create_worker_from_timer(self, locked: bool = False) -> None:
        if locked:
            self._create_worker_locked()
        else:
            with self.lock:
                self._create_worker_locked()

    def _create_worker_locked(self) -> None:
        """P: held (dropped while creating). Runs with create_pending set."""
        assert_held(self.lock)
        if self.nr_idle or self.managing or (self.dying and not self.worklist):
            self.create_pending = False
            if not self.managing:  # a manager runs its own mayday chain and ends it
                self._cancel_mayday_timer()
            return
        self.managing = True
        try:
            added = self.add_worker(rogue=not self.online)
        finally:
            self.managing = False
            if self.trustee_state != TRUSTEE_DONE:
                self.trustee_cond.notify_all()
        if added:
            self.create_pending = False
            self._cancel_mayday_timer()
            if self.need_more_worker(self):
                self.wake_up_worker()  # works may be waiting (a pool handed back by its trustee)
            return
        log.warning("pool %s: cannot create a worker (will retry)", self.name)
        if self.worklist:
            self.nr_mayday += 1
            self.send_mayday()
        # Until a retry succeeds, call the rescuers every mayday_interval as the manager's loop
        # does, not once per create_cooldown: a rescuer stops as soon as its pool has an idle
        # worker, and works that keep arriving would otherwise wait a whole cooldown for it.
        if self.mayday_timer is None:
            self.mayday_timer = timer.add_timer(self.system.config.mayday_interval, self.mayday_timeout)
        timer.add_timer(self.system.config.create_cooldown, self._create_worker_from_timer)

    def shutdown(self) -> None:
        """System.shutdown(): idle workers exit now, busy ones when they go idle."""
        with self.lock:
            self.dying = True
            if not self.worklist:  # else they run what is left and exit as they go idle
                for worker in [w for w in self.idle if not w.woken]:
                    self.destroy_worker(worker, "shutdown")
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
                self.schedule_create_worker()
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
                "cpu_intensive": self.cpu_intensive,
                "mayday": self.nr_mayday,
                "paced": self.nr_paced,
                "adopted": self.nr_adopted,
                "given": self.nr_given,
                "trustee_state": self.trustee_state,
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
        if self.trustee_state == TRUSTEE_DONE:
            assert self.nr_running == len(running), (self.nr_running, len(running))
            if (self.kernel_policy and self.worklist and self.nr_workers and not self.nr_running
                    and not self.nr_idle and not self.managing and self.online and not self.dying):
                assert self.pace_timer is not None or self.create_pending, "works wait for nobody"

    def __repr__(self) -> str:
        return (f"<WorkerPool {self.name} workers={self.nr_workers} idle={self.nr_idle} "
                f"running={self.nr_running}>")


