"""The manager of a pool: the manager role and the life of the pool's workers.

The kernel's ``manage_workers`` half of a gcwq. Every worker of a pool is made here: by a worker that
takes the manager role because it is the last idle one about to start working, by the timer thread for
a pool that has nobody to manage it (no worker at all, or its workers gone), and by the trustee
(``rogue`` workers, unbound, for a pool whose CPU left). A pool that needs a worker first adopts a
spare idle worker of another pool (:meth:`Manager.give_idle_worker` on the donor): that adds no
thread. Workers leave here too: reaped when idle for longer than ``idle_timeout`` beyond the ratio
(the kernel's ``maybe_destroy_workers``), at shutdown, or by the trustee.

:class:`Manager` (``pool.manager``) owns whether the timer thread is to create a worker and the
adoption counts; the manager role itself (``pool.managing``) and the reaping timer
(``pool.idle_timer``) stay on the pool, which reads them on its per-work path. Pacing is
``pool.pacer``'s, the calls for help while creation fails ``pool.mayday``'s.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from . import hooks, timer
from . import worker as _worker
from .lockdep import assert_held
from .trustee import TRUSTEE_DONE
from .worker import DIE, IDLE, ROGUE, Worker

if TYPE_CHECKING:
    from .pool import WorkerPool

log = logging.getLogger("cmwq_exec.pool")  # the pool's logger: its records keep the name they had

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


class Manager:
    """Creates, adopts, gives away and destroys the workers of one pool."""

    __slots__ = ("create_pending", "nr_adopted", "nr_given", "pool")

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool  # I
        self.create_pending = False  # P: the timer thread is to create a worker (no worker can)
        self.nr_adopted = 0  # P: idle workers taken from other pools instead of creating a thread
        self.nr_given = 0  # P: idle workers given to other pools

    # -- the manager role -------------------------------------------------------------------------

    def manage_workers(self, worker: Worker | None) -> bool:
        """Take the manager role (if free) and create a worker if needed. P: held, may be dropped.

        Returns False if no action was taken and the lock stayed held throughout.
        """
        pool = self.pool
        assert_held(pool.lock)
        if pool.managing:
            return False
        pool.manage_requested = False
        pool.managing = True
        adopted = self.nr_adopted
        try:
            added = self.maybe_create_worker()
        finally:
            pool.managing = False
            pool.trustee.manager_released()
        if added and self.nr_adopted == adopted:  # an adopted worker was not created
            ran = hooks.events.manager_ran
            if ran is not None:
                ran(pool=pool, created=1, destroyed=0)
        return added

    def maybe_create_worker(self) -> bool:
        """Create workers until one is idle. Called by the manager, P: held; dropped meanwhile.

        On return need_to_create_worker() is False. While creation fails the mayday timer summons
        rescuers and the manager retries after ``create_cooldown``. At interpreter exit no thread
        can be started (Python 3.12+ refuses): the manager gives up at once and runs the works
        itself (False: nothing was created), so the exit's flush finishes on the workers there are.
        """
        pool = self.pool
        assert_held(pool.lock)
        if not pool.need_to_create_worker(pool):
            return False
        config = pool.system.config
        if pool.nr_workers >= config.unpaced_workers and pool.online and not pool.dying:
            with pool.unlocked:  # a spare idle worker of another pool adds no thread: no pacing
                worker = pool.system.adopt_idle_worker(pool)
            if worker is None:
                pool.pacer.pace_create_worker()
                return False
            self.start_worker(worker, adopted=True)
            return True
        pool.mayday.start(config.mayday_initial_timeout)
        try:
            while not self.add_worker(rogue=not pool.online):
                if _interpreter_exiting:
                    return False
                with pool.unlocked:
                    time.sleep(config.create_cooldown)
                if not pool.need_to_create_worker(pool):
                    break
            return True
        finally:
            pool.mayday.cancel()

    # -- creating workers -------------------------------------------------------------------------

    def add_worker(self, rogue: bool = False) -> bool:
        """Create one worker, start its thread and make it idle; False if that failed (the
        ``cmwq_worker_create_failed`` event says why). P: held, dropped while the thread starts.

        Every worker of a pool is made here: by the manager, by the timer for a pool that has
        nobody to manage it, and by the trustee (``rogue``: unbound, for a pool whose CPU left)."""
        pool = self.pool
        assert_held(pool.lock)
        with pool.unlocked:
            worker = None if rogue else pool.system.adopt_idle_worker(pool)
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
        pool = self.pool
        system = pool.system
        with system.threads_lock:
            if system.nr_threads >= system.config.max_total_workers:
                raise WorkerCreationError(
                    f"worker cap reached: {system.nr_threads} threads >= max_total_workers="
                    f"{system.config.max_total_workers}")
            system.nr_threads += 1
        with pool.lock:
            worker_id = pool.next_worker_id
            pool.next_worker_id += 1
        worker = Worker(pool, worker_id)
        if rogue:
            worker.flags |= ROGUE
        try:
            worker.thread = _worker.start_thread(worker.thread_main, f"cmwq/{pool.name}:{worker_id}")
        except BaseException as exc:
            with system.threads_lock:
                system.nr_threads -= 1
            if isinstance(exc, WorkerCreationError):
                raise
            raise WorkerCreationError(f"cannot start a worker thread for pool {pool.name}: {exc}") from exc
        return worker

    def start_worker(self, worker: Worker, adopted: bool = False) -> None:
        """Account a freshly created (or ``adopted``) worker and make it idle. P: held."""
        pool = self.pool
        assert_held(pool.lock)
        donor = worker.pool
        if adopted:
            worker.pool = pool
            self.bind_adopted(worker)
            worker.id = pool.next_worker_id
            pool.next_worker_id += 1
            if worker.thread is not None:
                worker.thread.name = f"cmwq/{pool.name}:{worker.id}"
            self.nr_adopted += 1
        pool.workers.add(worker)
        pool.nr_workers += 1
        pool.worker_enter_idle(worker)
        if adopted:
            moved = hooks.events.worker_adopted
            if moved is not None:
                moved(pool=pool, worker=worker, donor=donor)
        else:
            created = hooks.events.worker_created
            if created is not None:
                created(pool=pool, worker=worker)

    def creation_failed(self, exc: WorkerCreationError) -> None:
        """A worker could not be created: tell the plugins (no lock held)."""
        failed = hooks.events.worker_create_failed
        if failed is not None:
            failed(pool=self.pool, error=exc)
        log.debug("pool %s: %s", self.pool.name, exc)

    # -- adoption ---------------------------------------------------------------------------------

    def bind_adopted(self, worker: Worker) -> None:
        """Bind an adopted worker's thread to this pool's CPU (or every usable CPU), as its own
        thread would on start. P: held, as the trustee holds it to re-bind workers. A thread that
        has not bound itself yet (no ``native_id``) binds to this pool itself: it binds under the
        lock of the pool it is in (Worker.thread_main)."""
        pool = self.pool
        assert_held(pool.lock)
        system = pool.system
        if pool.cpu is None or system.config.pin_workers:
            cpus = system.usable
            if pool.cpu is not None and pool.online:
                cpus = {pool.cpu}
            _worker.set_thread_affinity(worker, cpus)

    def give_idle_worker(self) -> Worker | None:
        """Take an idle worker this pool can spare off its lists, for another pool that needs one
        (:meth:`System.adopt_idle_worker`); None if it has none to spare. P: held.

        It spares only beyond ``SPARE_IDLE`` idle workers not yet woken, and only while online with
        no trustee or manager at work. The one given is the longest idle (the pool wakes the most
        recent first). It stays parked until its new pool wakes it."""
        pool = self.pool
        assert_held(pool.lock)
        if (pool.nr_idle - pool.nr_woken <= SPARE_IDLE or not pool.online or pool.dying
                or pool.managing or pool.trustee.state != TRUSTEE_DONE):
            return None
        worker = next(iter(pool.idle))
        if worker.woken or worker.flags & ROGUE:
            return None
        pool.worker_leave_idle(worker)
        pool.workers.discard(worker)
        pool.nr_workers -= 1
        self.nr_given += 1
        return worker

    # -- a pool with nobody to manage it ----------------------------------------------------------

    def start(self) -> None:
        """Create the pool's first worker; if that fails, keep trying from the timer thread."""
        with self.pool.lock:
            self.schedule_create_worker(now=True)

    def schedule_create_worker(self, now: bool = False) -> None:
        """A pool without an idle worker and without anyone to be its manager (no worker at all, or
        its workers gone): the timer thread creates one, sends mayday while works wait, and retries
        after ``create_cooldown``. With ``now``, the calling thread tries first. P: held."""
        assert_held(self.pool.lock)
        if self.create_pending:
            return
        if now:
            self.create_pending = True
            self._create_worker_locked()
        else:
            # the timer first, the mark after (calls first, stores after: core/interrupts.py): an
            # exception landing in add_timer must not leave the mark without its timer, which
            # would keep every later kick from having a worker created for the pool
            timer.add_timer(0, self._create_worker_from_timer)
            self.create_pending = True

    def _create_worker_from_timer(self) -> None:
        with self.pool.lock:
            self._create_worker_locked()

    def _create_worker_locked(self) -> None:
        """P: held (dropped while creating). Runs with create_pending set."""
        pool = self.pool
        assert_held(pool.lock)
        if pool.nr_idle or pool.managing or (pool.dying and not pool.worklist):
            self.create_pending = False
            if not pool.managing:  # a manager runs its own mayday chain and ends it
                pool.mayday.cancel()
            return
        pool.managing = True
        try:
            added = self.add_worker(rogue=not pool.online)
        finally:
            pool.managing = False
            pool.trustee.manager_released()
        config = pool.system.config
        if added:
            self.create_pending = False
            pool.mayday.cancel()
            if pool.need_more_worker(pool):
                pool.wake_up_worker()  # works may be waiting (a pool handed back by its trustee)
            return
        log.warning("pool %s: cannot create a worker (will retry)", pool.name)
        if pool.worklist:
            pool.mayday.call()
        # Until a retry succeeds, call the rescuers every mayday_interval as the manager's loop
        # does, not once per create_cooldown: a rescuer stops as soon as its pool has an idle
        # worker, and works that keep arriving would otherwise wait a whole cooldown for it.
        pool.mayday.keep_calling(config.mayday_interval)
        timer.add_timer(config.create_cooldown, self._create_worker_from_timer)

    # -- destroying workers -----------------------------------------------------------------------

    def destroy_worker(self, worker: Worker, reason: str) -> None:
        """Make an idle, not yet woken worker exit. P: held."""
        pool = self.pool
        assert_held(pool.lock)
        assert worker.flags & IDLE and not worker.woken
        pool.worker_leave_idle(worker)
        pool.workers.discard(worker)
        pool.nr_workers -= 1
        worker.flags |= DIE
        pool.wake_worker(worker)
        system = pool.system
        with system.threads_lock:
            system.nr_threads -= 1
        destroyed = hooks.events.worker_destroyed
        if destroyed is not None:
            destroyed(pool=pool, worker=worker, reason=reason)

    def idle_worker_timeout(self) -> None:
        """Idle timer (timer thread): reap workers idle for longer than ``idle_timeout`` beyond the
        ratio."""
        pool = self.pool
        timeout = pool.system.config.idle_timeout
        destroyed = 0
        with pool.lock:
            pool.idle_timer = None
            while pool.too_many_workers(pool) and not pool.managing:
                worker = next(iter(pool.idle))  # the oldest idle worker
                expires = worker.last_active + timeout
                if worker.woken:
                    break
                if time.monotonic() < expires:
                    pool.idle_timer = timer.add_timer(expires - time.monotonic(), self.idle_worker_timeout)
                    break
                self.destroy_worker(worker, "idle")
                destroyed += 1
        ran = hooks.events.manager_ran
        if destroyed and ran is not None:  # the manager's other half (maybe_destroy_workers)
            ran(pool=pool, created=0, destroyed=destroyed)
