"""Queueing: choosing a pool for a work and putting it on that pool's worklist.

This module owns the queueing paths of a workqueue: a reusable work's (its pending bit taken under
the workqueue's lock), a one-shot work's (a submitted call: ``queue_call``, the hot path of every
submit, under the pool's lock alone when the workqueue has no limit), the choice of a pool (the
queueing CPU's, the one a work already runs on, the unbound pool, or a plugin's choice), refusing
calls, and the one place a work goes onto a list (``_insert_locked``): a work beyond the
workqueue's limits goes to its inactive list instead (:mod:`cmwq_exec.core.wq_active`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from . import hooks
from .cpus import current_cpu
from .interfaces import ReusableWork, WorkItem, WorkQueueOps
from .interrupts import deferred_interrupts
from .lockdep import ENABLED as _CHECKED
from .lockdep import assert_held, must_hold
from .pending import INACTIVE, NOWHERE, WORKLIST
from .worker import current, current_worker
from .wq_flush import Flushing

if TYPE_CHECKING:
    from .pool import WorkerPool


class Queueing(Flushing):
    """A workqueue's queueing paths."""

    def _queue_if_idle(self, work: ReusableWork, cpu: int | None) -> bool:
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

    def _check_open(self) -> None:
        if self._destroyed:
            raise RuntimeError(f"workqueue {self.name!r} is destroyed: no new works")
        if self._draining:
            worker = current_worker()
            pwq = worker.current_pwq if worker is not None else None
            if pwq is None or pwq.wq is not cast("WorkQueueOps", self):
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

    def queue_call(self, work: WorkItem, cpu: int | None = None) -> None:
        """Queue a one-shot work (a submitted call: a front-end's future or job), refused once
        :meth:`refuse_calls` was called: the hot path of every submit."""
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

        ``queue_call`` reads ``_refusing`` under the lock it queues under (``_lock``, or the pool's
        lock); taking each of those locks once after the store waits out any queueing that read
        the old value."""
        self._refusing = message
        with self._lock:
            pass
        for pwq in self._pwqs:
            with pwq.pool.lock:
                pass

    @must_hold("_lock")
    def _place(self, work: WorkItem, pool: WorkerPool) -> None:
        """Put a work whose pending state is ours on ``pool``'s worklist, or on the inactive list
        beyond the limits. W: held."""
        limited = self._limited
        inactive = limited and not self._may_activate_locked()
        with pool.lock:
            self._insert_locked(work, pool, limited and not inactive, inactive)

    def _insert_locked(self, work: WorkItem, pool: WorkerPool, counted: bool, inactive: bool = False) -> None:
        """The one place a work is counted in flight for its flush color and put on a list: on
        ``pool``'s worklist (and, if ``counted``, holding a max_active slot), or with ``inactive``
        on the workqueue's inactive list, to wait for the limits. P: held, ``pool``'s (and W if
        counted or inactive).

        Calls that may fail come first, then the changes with no call between them but the last
        (the append); the tests of ``counted`` and ``inactive`` come before any change (see
        cmwq_exec.core.interrupts)."""
        if _CHECKED:
            assert_held(pool.lock)
        pwq = self._pwqs[pool.index]
        if self._system.timing:
            work._queued_at = time.monotonic()
        if not (inactive or pool.watchdog_armed):
            pool.prepare_insert()
        color = self._work_color
        in_flight = pwq.in_flight
        count = in_flight.get(color, 0) + 1
        if counted:
            self._nr_active += 1
        work._pwq = pwq
        work._color = color
        work._counted = counted
        work._where = INACTIVE if inactive else WORKLIST
        in_flight[color] = count
        if inactive:
            self._inactive.append(work)
            return
        pool.worklist.append(work)
        # the kernel's need_more_worker holds after an append only if nobody runs, and its
        # wake_up_worker finds nothing to do while a woken worker is on its way
        if not pool.kernel_policy or not (pool.nr_running or pool.nr_woken):
            pool.kick()
