"""Policy functions: how a worker pool is managed.

These are the kernel's predicates (kernel/workqueue.c, "Policy functions. These define the policies on
how the global worker pool is managed"), one for one. Each is pure: it reads the pool's counters and
returns a bool. Callers hold ``pool.lock``.

They are written here once. The default plugin of the ``cmwq_*`` policy hooks
(:class:`cmwq_exec.plugin.DefaultPolicy`) calls them; a plugin may answer instead, and each pool
binds whichever function is in force (``WorkerPool.read_policy``, from
:data:`cmwq_exec.core.hooks.current_policy`).
"""

from __future__ import annotations

from .interfaces import PoolCounters as PoolCounters  # re-exported: what a policy function reads

#: Idle workers beyond a quarter of the busy ones may be reaped (MAX_IDLE_WORKERS_RATIO).
MAX_IDLE_WORKERS_RATIO = 4


def need_more_worker(pool: PoolCounters) -> bool:
    """Need to wake up a worker? Called from anything but currently running workers."""
    return bool(pool.worklist) and not pool.nr_running


def may_start_working(pool: PoolCounters) -> bool:
    """Can I start working? Called from busy but !running workers: only if an idle one stays behind."""
    return pool.nr_idle > 0


def keep_working(pool: PoolCounters) -> bool:
    """Do I need to keep working? Called from currently running workers: only while I am the only runner."""
    return bool(pool.worklist) and pool.nr_running <= 1


def need_to_create_worker(pool: PoolCounters) -> bool:
    """Do we need a new worker? Called from the manager."""
    return need_more_worker(pool) and not may_start_working(pool)


def need_to_manage_workers(pool: PoolCounters) -> bool:
    """Do I need to be the manager?"""
    return need_to_create_worker(pool) or pool.manage_requested


def too_many_workers(pool: PoolCounters) -> bool:
    """Do we have too many workers and should some go away? The manager counts as idle."""
    nr_idle = pool.nr_idle + pool.managing
    nr_busy = pool.nr_workers - nr_idle
    return nr_idle > 2 and (nr_idle - 2) * MAX_IDLE_WORKERS_RATIO >= nr_busy
