"""Policy functions: how a worker pool is managed.

These are the kernel's predicates (kernel/workqueue.c, "Policy functions. These define the policies on
how the global worker pool is managed"), one for one. Each is pure: it reads the pool's counters and
returns a bool. Callers hold ``pool.lock``.

They are also the default plugin for the ``cmwq_*`` policy hooks (see :mod:`cmwq_exec.hookspecs`): a
plugin may replace any of them, the pool calls whichever is in force through ``pool.policy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .pool import WorkerPool

#: Idle workers beyond a quarter of the busy ones may be reaped (MAX_IDLE_WORKERS_RATIO).
MAX_IDLE_WORKERS_RATIO = 4


def need_more_worker(pool: WorkerPool) -> bool:
    """Need to wake up a worker? Called from anything but currently running workers."""
    return bool(pool.worklist) and not pool.nr_running


def may_start_working(pool: WorkerPool) -> bool:
    """Can I start working? Called from busy but !running workers: only if an idle one stays behind."""
    return pool.nr_idle > 0


def keep_working(pool: WorkerPool) -> bool:
    """Do I need to keep working? Called from currently running workers: only while I am the only runner."""
    return bool(pool.worklist) and pool.nr_running <= 1


def need_to_create_worker(pool: WorkerPool) -> bool:
    """Do we need a new worker? Called from the manager."""
    return need_more_worker(pool) and not may_start_working(pool)


def need_to_manage_workers(pool: WorkerPool) -> bool:
    """Do I need to be the manager?"""
    return need_to_create_worker(pool) or pool.manage_requested


def too_many_workers(pool: WorkerPool) -> bool:
    """Do we have too many workers and should some go away? The manager counts as idle."""
    nr_idle = pool.nr_idle + pool.managing
    nr_busy = pool.nr_workers - nr_idle
    return nr_idle > 2 and (nr_idle - 2) * MAX_IDLE_WORKERS_RATIO >= nr_busy


class DefaultPolicy:
    """The kernel's formulas as a pluggy plugin: the last word for every policy hook."""

    @hookimpl(trylast=True)
    def cmwq_need_more_worker(self, pool: WorkerPool) -> bool:
        return need_more_worker(pool)

    @hookimpl(trylast=True)
    def cmwq_may_start_working(self, pool: WorkerPool) -> bool:
        return may_start_working(pool)

    @hookimpl(trylast=True)
    def cmwq_keep_working(self, pool: WorkerPool) -> bool:
        return keep_working(pool)

    @hookimpl(trylast=True)
    def cmwq_need_to_create_worker(self, pool: WorkerPool) -> bool:
        return need_to_create_worker(pool)

    @hookimpl(trylast=True)
    def cmwq_need_to_manage_workers(self, pool: WorkerPool) -> bool:
        return need_to_manage_workers(pool)

    @hookimpl(trylast=True)
    def cmwq_too_many_workers(self, pool: WorkerPool) -> bool:
        return too_many_workers(pool)
