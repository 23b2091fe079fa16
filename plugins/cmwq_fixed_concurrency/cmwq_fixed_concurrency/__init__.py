"""A cmwq_exec policy plugin that runs a fixed number of workers per pool, like ThreadPoolExecutor.

Concurrency management starts a new worker only when the last running one
blocks.  This plugin turns that off, for comparison: every pool runs up to
``limit`` works at once whether they block or not, the way a
``ThreadPoolExecutor(max_workers=limit)`` does, and never more.

The policy, in the kernel's vocabulary (``busy`` = workers executing a work,
running or blocked):

- ``need_more_worker``: works are pending and fewer than ``limit`` workers are busy;
- ``may_start_working``: another idle worker remains, or the pool already has
  ``limit`` workers (no spare worker will be created beyond the limit);
- ``keep_working``: works are pending (every busy worker keeps draining the
  worklist, however many run);
- ``need_to_create_worker``: need_more_worker and not may_start_working;
- ``need_to_manage_workers``: need_to_create_worker or a manage request;
- ``too_many_workers``: the pool has more than ``limit`` workers and an idle one
  to reap.  Idle workers within the limit are kept, as ThreadPoolExecutor keeps
  its threads.

Use it installed (``pip install plugins/cmwq_fixed_concurrency``; the
``cmwq_exec`` entry point registers this module, which enforces the policy only
when ``CMWQ_FIXED_CONCURRENCY=N`` is set, and is inert otherwise) or
explicitly::

    from cmwq_exec import plugin
    from cmwq_fixed_concurrency import FixedConcurrency
    plugin.register(FixedConcurrency(4), name="fixed_concurrency")
"""

from __future__ import annotations

import os
from typing import Any

import pluggy

try:
    from cmwq_exec.plugin import SettingError
except ImportError:  # pragma: no cover - without cmwq_exec nothing loads this module as a plugin
    SettingError = ValueError  # type: ignore[misc,assignment]

__all__ = ["LIMIT", "FixedConcurrency", "configured_limit"]

hookimpl = pluggy.HookimplMarker("cmwq_exec")


def configured_limit() -> int | None:
    """The limit in ``CMWQ_FIXED_CONCURRENCY``, or None when it is unset or empty.

    Raises ``cmwq_exec.plugin.SettingError`` (a ValueError) for anything but a positive integer:
    raised while cmwq_exec loads this module, it stops the program, as a bad core setting does,
    instead of running without the policy the operator asked for.
    """
    text = os.environ.get("CMWQ_FIXED_CONCURRENCY", "").strip()
    if not text:
        return None
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise SettingError(f"CMWQ_FIXED_CONCURRENCY must be a positive integer (the most busy workers "
                           f"per pool) or unset, not {text!r}")
    return limit


class FixedConcurrency:
    """Policy hooks that keep up to ``limit`` workers busy per pool, blocked or not.

    Each hook is a few comparisons of the pool's counters, called with the
    pool's lock held (see ``cmwq_exec.hookspecs``).
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, not {limit!r}")
        self.limit = limit

    def __repr__(self) -> str:
        return f"FixedConcurrency({self.limit})"

    # The predicates, composed from one another as in the kernel.

    def busy(self, pool: Any) -> int:
        """Workers that hold a work, running or blocked.

        Not ``nr_workers - nr_idle``: that also counts a worker that just left
        the idle list and asks ``need_more_worker`` whether to start (PREP in
        the kernel's terms) and the manager, neither of which holds a work.
        The pool has no counter for this, so it is counted from each worker's
        ``current_work`` (under the pool lock, like every policy call): a walk
        over the pool's workers, which this policy keeps at ``limit``.
        """
        return sum(1 for worker in pool.workers if worker.current_work is not None)

    def need_more_worker(self, pool: Any) -> bool:
        return bool(pool.worklist) and self.busy(pool) < self.limit

    def may_start_working(self, pool: Any) -> bool:
        return pool.nr_idle > 0 or pool.nr_workers >= self.limit

    def keep_working(self, pool: Any) -> bool:
        return bool(pool.worklist)

    def need_to_create_worker(self, pool: Any) -> bool:
        return self.need_more_worker(pool) and not self.may_start_working(pool)

    def need_to_manage_workers(self, pool: Any) -> bool:
        return self.need_to_create_worker(pool) or bool(pool.manage_requested)

    def too_many_workers(self, pool: Any) -> bool:
        return pool.nr_idle > 0 and pool.nr_workers > self.limit

    # The hooks.

    @hookimpl
    def cmwq_need_more_worker(self, pool: Any) -> bool:
        return self.need_more_worker(pool)

    @hookimpl
    def cmwq_may_start_working(self, pool: Any) -> bool:
        return self.may_start_working(pool)

    @hookimpl
    def cmwq_keep_working(self, pool: Any) -> bool:
        return self.keep_working(pool)

    @hookimpl
    def cmwq_need_to_create_worker(self, pool: Any) -> bool:
        return self.need_to_create_worker(pool)

    @hookimpl
    def cmwq_need_to_manage_workers(self, pool: Any) -> bool:
        return self.need_to_manage_workers(pool)

    @hookimpl
    def cmwq_too_many_workers(self, pool: Any) -> bool:
        return self.too_many_workers(pool)


# The module itself is the plugin the entry point registers. Installed, it stays
# inert (no hook at all, so the pools' hot path is unchanged) until
# CMWQ_FIXED_CONCURRENCY names the limit: installing a comparison policy must not
# silently change every cmwq_exec process of the environment.
LIMIT = configured_limit()

if LIMIT is not None:
    _policy = FixedConcurrency(LIMIT)

    @hookimpl
    def cmwq_need_more_worker(pool: Any) -> bool:
        return _policy.need_more_worker(pool)

    @hookimpl
    def cmwq_may_start_working(pool: Any) -> bool:
        return _policy.may_start_working(pool)

    @hookimpl
    def cmwq_keep_working(pool: Any) -> bool:
        return _policy.keep_working(pool)

    @hookimpl
    def cmwq_need_to_create_worker(pool: Any) -> bool:
        return _policy.need_to_create_worker(pool)

    @hookimpl
    def cmwq_need_to_manage_workers(pool: Any) -> bool:
        return _policy.need_to_manage_workers(pool)

    @hookimpl
    def cmwq_too_many_workers(pool: Any) -> bool:
        return _policy.too_many_workers(pool)
