"""A pool's calls for help (the kernel's mayday timer and ``send_mayday``).

While a pool cannot get a worker (creation fails or takes long), the rescuers of the workqueues that
have works pending on it are summoned: by the manager after ``mayday_initial_timeout`` and then every
``mayday_interval`` while creation goes on, by the timer thread when it cannot create a pool's first
worker, and by the trustee on every pass while it drains the pool. A summoned rescuer comes to the pool
and runs its workqueue's works there (:class:`cmwq_exec.core.worker.Rescuer`).

:class:`Mayday` (``pool.mayday``) owns the pool's mayday timer and its count of calls; it reads the
pool's worklist and trustee state under the pool lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import hooks, timer
from .lockdep import assert_held, must_hold
from .trustee import TRUSTEE_IN_CHARGE

if TYPE_CHECKING:
    from .pool import WorkerPool


class Mayday:
    """The mayday timer and calls of one pool."""

    __slots__ = ("nr_mayday", "pool", "timer")

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool  # I
        self.timer: timer.Timer | None = None  # P: armed while a chain of calls runs
        self.nr_mayday = 0  # P: times the pool was found unable to get a worker (read at scrape time)

    @must_hold("pool.lock")
    def call(self) -> None:
        """Count a call and summon the rescuers. P: held."""
        self.nr_mayday += 1
        self.send()

    def send(self) -> None:
        """Summon the rescuers of every workqueue with works pending here. P: held."""
        pool = self.pool
        assert_held(pool.lock)
        seen = set()
        for work in pool.worklist:
            pwq = work._pwq
            wq = pwq.wq
            if wq in seen:
                continue
            seen.add(wq)
            if wq.summon_rescuer(pool):
                pwq.nr_mayday += 1
                mayday = hooks.events.mayday
                if mayday is not None:
                    mayday(pool=pool, workqueue=wq)

    @must_hold("pool.lock")
    def start(self, delay: float) -> None:
        """Start a new chain of calls, the first after ``delay`` (one chain per pool: a running one
        is cancelled first, though the timer thread may be running it). P: held."""
        self.cancel()
        self.timer = timer.add_timer(delay, self.timeout)

    @must_hold("pool.lock")
    def keep_calling(self, interval: float) -> None:
        """Call every ``interval`` from now on, unless a chain runs already. P: held."""
        if self.timer is None:
            self.timer = timer.add_timer(interval, self.timeout)

    def cancel(self) -> None:
        """End the chain. P: held."""
        assert_held(self.pool.lock)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def timeout(self) -> None:
        """Mayday timer (timer thread): worker creation is taking too long, call for help and re-arm."""
        pool = self.pool
        with pool.lock:
            if self.timer is None:
                return
            draining = pool.trustee.state == TRUSTEE_IN_CHARGE and pool.worklist
            if draining or pool.need_to_create_worker(pool):
                self.call()
            self.timer = timer.add_timer(pool.system.config.mayday_interval, self.timeout)
