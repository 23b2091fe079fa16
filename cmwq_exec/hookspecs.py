"""The hooks a plugin may implement: this module is the documentation of what can be customised.

Plugins are pluggy plugins of the project ``cmwq_exec``: objects or modules whose functions carry
``cmwq_exec.hookimpl``. They are registered with :func:`cmwq_exec.plugin.register` or found through the
``cmwq_exec`` entry-point group of installed distributions.

Policy hooks are ``firstresult``: the first plugin returning a value other than ``None`` decides, and the
kernel's formula (:class:`cmwq_exec.plugin.DefaultPolicy`, registered ``trylast``) answers last.
They are called with the pool's lock held, on the hot path: keep them to a few comparisons of the
pool's counters, and never block or take another lock. A policy hook that raises is logged once with
its plugin's name and the next answer (in the end the kernel's) is used; a plugin can never wedge a
pool.

Event hooks tell what happened; all implementations are called, results are ignored. Like the
kernel's tracepoints they are called from the thread that did the thing (a worker, the manager, the
watchdog, a trustee), often with the pool's lock held: record and return; never block, queue work or
call back into the pool. An event hook that no plugin implements costs nothing: the call site tests a
plain attribute. An event hook that raises is logged once and otherwise ignored.

Pool counters a policy may read (``L:`` under ``pool.lock``): ``worklist`` (pending works, a deque),
``nr_running`` (runnable workers), ``nr_idle``, ``nr_workers``, ``managing`` (bool),
``manage_requested`` (bool), ``cpu`` (int, or None for the unbound pool).
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("cmwq_exec")
hookimpl = pluggy.HookimplMarker("cmwq_exec")


# -- policy ---------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cmwq_need_more_worker(pool: Any) -> bool | None:
    """Must an idle worker be woken? Default: :func:`cmwq_exec.core.policy.need_more_worker`."""


@hookspec(firstresult=True)
def cmwq_may_start_working(pool: Any) -> bool | None:
    """May a worker leaving idle start working right away? Default:
    :func:`cmwq_exec.core.policy.may_start_working`."""


@hookspec(firstresult=True)
def cmwq_keep_working(pool: Any) -> bool | None:
    """Should a running worker take another work? Default: :func:`cmwq_exec.core.policy.keep_working`."""


@hookspec(firstresult=True)
def cmwq_need_to_create_worker(pool: Any) -> bool | None:
    """Must the manager create a worker? Default: :func:`cmwq_exec.core.policy.need_to_create_worker`."""


@hookspec(firstresult=True)
def cmwq_need_to_manage_workers(pool: Any) -> bool | None:
    """Must a worker take the manager role? Default:
    :func:`cmwq_exec.core.policy.need_to_manage_workers`."""


@hookspec(firstresult=True)
def cmwq_too_many_workers(pool: Any) -> bool | None:
    """Are there idle workers to reap? Default: :func:`cmwq_exec.core.policy.too_many_workers`."""


@hookspec(firstresult=True)
def cmwq_select_pool(workqueue: Any, pools: list[Any], current_pool: Any) -> Any | None:
    """Choose the pool a work of a per-CPU ``workqueue`` is queued on.

    ``pools`` are the online per-CPU pools; ``current_pool`` is the pool of the worker that queues the
    work, or the pool of the CPU the queueing thread runs on. Return one of ``pools``, or None to let
    the default decide (``current_pool``). Called without any lock, once per queued work: keep it cheap.
    Not called for unbound or ordered workqueues, which always use the unbound pool.
    """


# -- events ---------------------------------------------------------------------------------------


@hookspec
def cmwq_worker_created(pool: Any, worker: Any) -> None:
    """A worker thread was created and started for ``pool``."""


@hookspec
def cmwq_worker_destroyed(pool: Any, worker: Any, reason: str) -> None:
    """A worker left ``pool``: ``reason`` is "idle" (reaped), "trustee" (butchered), "shutdown"
    (``System.shutdown()``) or "crashed" (its loop raised: a bug, logged; the pool replaces it)."""


@hookspec
def cmwq_worker_adopted(pool: Any, worker: Any, donor: Any) -> None:
    """An idle worker of ``donor`` moved to ``pool``, which took it instead of creating a thread
    (``cmwq_worker_created`` is not called for it). With ``cmwq_worker_created`` and
    ``cmwq_worker_destroyed`` it accounts for every worker of every pool: a count of each pool's
    workers moves this one from ``donor`` to ``pool``."""


@hookspec
def cmwq_worker_create_failed(pool: Any, error: BaseException) -> None:
    """Creating a worker for ``pool`` failed (thread limit, cap, fault): the manager will retry."""


@hookspec
def cmwq_manager_ran(pool: Any, created: int, destroyed: int) -> None:
    """``pool``'s manager acted: a worker holding the manager role created ``created`` workers, or
    the idle timer (the kernel's maybe_destroy_workers) reaped ``destroyed`` idle ones."""


@hookspec
def cmwq_mayday(pool: Any, workqueue: Any) -> None:
    """``pool`` could not get a worker in time and summoned ``workqueue``'s rescuer."""


@hookspec
def cmwq_work_rescued(pool: Any, workqueue: Any, work: Any) -> None:
    """The rescuer of ``workqueue`` ran ``work`` on behalf of ``pool``."""


@hookspec
def cmwq_trustee_state(pool: Any, state: str) -> None:
    """The trustee of ``pool`` entered ``state``: START, IN_CHARGE, BUTCHER, RELEASE or DONE."""


@hookspec
def cmwq_cpu_intensive(pool: Any, worker: Any, work: Any) -> None:
    """The watchdog found ``worker`` burning CPU in ``work`` and took it out of concurrency management."""


@hookspec
def cmwq_worker_blocked(pool: Any, worker: Any, work: Any) -> None:
    """The watchdog found ``worker`` blocked in ``work`` without an annotation."""


@hookspec
def cmwq_stall(pool: Any, seconds: float, stacks: dict[int, str]) -> None:
    """``pool`` has made no progress for ``seconds``; ``stacks`` maps worker thread ids to stacks."""


@hookspec
def cmwq_work_started(pool: Any, workqueue: Any, work: Any) -> None:
    """A worker of ``pool`` is about to run ``work`` of ``workqueue``. On the hot path: keep it short."""


@hookspec
def cmwq_work_finished(pool: Any, workqueue: Any, work: Any, error: BaseException | None) -> None:
    """``work`` of ``workqueue`` returned (``error`` None) or raised ``error``."""
