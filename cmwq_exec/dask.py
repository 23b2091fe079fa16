"""Dask on cmwq: a scheduler ``get`` for ``dask.compute(..., scheduler=get)`` and
``dask.config.set(scheduler=get)``.

It is dask's own local scheduler (``dask.local.get_async``, as ``dask.threaded.get`` uses it), with
the tasks submitted to a :class:`~cmwq_exec.CMWQExecutor`:

* each task runs in a copy of the caller's context, as in dask's own thread pool, so the caller's
  ``ContextVar``\\ s and ``warnings.catch_warnings`` reach it;
* ``num_workers`` is what dask reads it for: how many tasks it keeps submitted at once (its
  ``fire_tasks`` hands out at most that many, in its priority order). Default: the executor's
  ``max_workers`` if it has one, else ``IN_FLIGHT_PER_CPU`` (4) per CPU, enough to keep the CPUs
  busy while some tasks block, few enough to keep dask's memory-saving order;
* a ``compute()`` inside a task never deadlocks, bounded executor or not: the scheduler loop waits
  for its tasks on a ``queue.Queue`` (not on a cmwq future), so on a worker the whole loop runs as a
  wait for other calls: the worker gives up its running slot and its executor's ``max_workers`` slot
  while it waits, and the inner tasks run. ``dask.local`` has no hook on that queue; the loop's own
  work between two waits (ordering, bookkeeping) is small.

Without an ``executor`` argument the tasks go to one shared unbounded executor; ``pool=`` (dask's
own option, or ``dask.config`` ``pool``) is used as given, as ``dask.threaded.get`` does.
"""

from __future__ import annotations

import contextvars
import multiprocessing.pool
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Any

from dask import config as _dask_config
from dask.local import MultiprocessingPoolExecutor, get_async

from .core.worker import current
from .core.workqueue import waiting
from .executor import CMWQExecutor

__all__ = ["IN_FLIGHT_PER_CPU", "get"]

#: Tasks kept submitted per CPU when the executor has no ``max_workers`` (see the module).
IN_FLIGHT_PER_CPU = 4

_shared: CMWQExecutor | None = None
_shared_lock = threading.Lock()


def _shared_executor() -> CMWQExecutor:
    global _shared
    with _shared_lock:
        if _shared is None or _shared._shutdown:
            _shared = CMWQExecutor(name="dask")
        return _shared


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _pack_exception(exc: BaseException, dumps: Callable[..., Any]) -> tuple[BaseException, Any]:
    return exc, sys.exc_info()[2]  # dask.threaded.pack_exception: the traceback travels as is


def _thread_id() -> int | None:
    return threading.get_ident()


def _context_submit(executor: Executor) -> Callable[..., Future[Any]]:
    """``executor.submit`` running each task in a copy of the submitting thread's context."""
    submit = executor.submit

    def submit_in_context(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return submit(contextvars.copy_context().run, fn, *args, **kwargs)

    return submit_in_context


def _in_flight(executor: Executor, num_workers: int | None) -> int:
    if num_workers is not None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers <= 0:
            raise ValueError(f"num_workers must be a positive int or None, got {num_workers!r}")
        return num_workers
    if isinstance(executor, CMWQExecutor):
        bound = executor.workqueue.max_active
        return bound if bound is not None else IN_FLIGHT_PER_CPU * _cpu_count()
    return int(getattr(executor, "_max_workers", 0)) or IN_FLIGHT_PER_CPU * _cpu_count()


def get(dsk: Mapping[Any, Any], keys: Sequence[Any] | Any, cache: Any = None, num_workers: int | None = None,
        pool: Any = None, executor: Executor | None = None, **kwargs: Any) -> Any:
    """Compute ``keys`` of the graph ``dsk`` on cmwq (``dask.threaded.get``'s signature).

    ``executor``: the executor the tasks go to (default: a shared unbounded
    :class:`~cmwq_exec.CMWQExecutor`); ``functools.partial(get, executor=CMWQExecutor(max_workers=4))``
    bounds the running tasks. ``pool`` (or ``dask.config`` ``pool``): an executor or a
    ``multiprocessing.pool.Pool`` to use instead, as ``dask.threaded.get`` takes it. ``num_workers``
    (or ``dask.config`` ``num_workers``): how many tasks are kept submitted at once. Other keyword
    arguments go to ``dask.local.get_async`` (``callbacks``, ``chunksize``, ...).
    """
    if executor is None:
        pool = pool or _dask_config.get("pool", None)
        if isinstance(pool, multiprocessing.pool.Pool):
            pool = MultiprocessingPoolExecutor(pool)
        executor = pool if pool is not None else _shared_executor()
    elif not isinstance(executor, Executor):
        raise TypeError(f"executor must be a concurrent.futures.Executor, got {type(executor).__name__}")
    num_workers = num_workers or _dask_config.get("num_workers", None)
    in_flight = _in_flight(executor, num_workers)
    # On a worker this whole call is a wait for other calls (see the module docstring).
    with waiting(current.worker):
        return get_async(_context_submit(executor), in_flight, dsk, keys, cache=cache,
                         get_id=_thread_id, pack_exception=_pack_exception, **kwargs)
