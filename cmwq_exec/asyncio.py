"""asyncio on cmwq: event loops whose default executor runs on the shared concurrency-managed pools.

``run_in_executor(None, ...)``, ``asyncio.to_thread`` and the loop's own blocking helpers
(``getaddrinfo``, ``sock_sendfile`` fallbacks) use a loop's default executor. Three ways to make it
cmwq, from the narrowest to the widest:

* ``asyncio.run(main(), loop_factory=cmwq_exec.asyncio.new_event_loop)`` (Python 3.12+), or
  ``asyncio.Runner(loop_factory=cmwq_exec.asyncio.new_event_loop)`` (3.11+);
* ``cmwq_exec.asyncio.run(main())``: the same on every supported Python (3.10 too);
* ``cmwq_exec.asyncio.install()``: every loop the event loop policy makes from then on, that is
  every ``asyncio.run`` and ``asyncio.new_event_loop()`` of the process (the policy API is
  deprecated from Python 3.14 on: prefer ``loop_factory`` there).

Each loop gets a :class:`~cmwq_exec.CMWQExecutor` of its own. ``asyncio.run`` ends by calling
``loop.shutdown_default_executor()``, which shuts the executor down for good; an executor is only a
workqueue on the pools every executor shares (no threads of its own but its rescuer), so one per
loop costs about 0.4 ms at creation, less than ``ThreadPoolExecutor``'s first thread, and the next
``asyncio.run`` gets a fresh one instead of "cannot schedule new futures after shutdown". The
executor has no ``max_workers``: the pools start a thread only when the running ones block, so a
call that waits for another call of the same loop (``to_thread`` inside ``to_thread``, through
``run_coroutine_threadsafe``) does not deadlock the way a bounded default executor does.

This module is named after the standard library's package and imports it with an absolute import
(``import asyncio as _asyncio``), which always finds the standard library's.
"""

from __future__ import annotations

import asyncio as _asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .executor import CMWQExecutor

__all__ = ["EventLoopPolicy", "install", "new_event_loop", "run", "uninstall"]

_T = TypeVar("_T")


def _loop_executor() -> CMWQExecutor:
    return CMWQExecutor(name="asyncio-default")


def new_event_loop() -> _asyncio.AbstractEventLoop:
    """A new event loop (the platform's default kind) whose default executor is a new
    :class:`~cmwq_exec.CMWQExecutor`: usable as ``loop_factory`` of ``asyncio.run``/``Runner``."""
    loop = _asyncio.SelectorEventLoop()  # asyncio's default loop on POSIX (this package's platform)
    loop.set_default_executor(_loop_executor())
    return loop


class EventLoopPolicy(_asyncio.DefaultEventLoopPolicy):  # type: ignore[misc,name-defined,unused-ignore]
    """The default event loop policy, whose new loops have a cmwq default executor (see
    :func:`install`)."""

    def new_event_loop(self) -> _asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_default_executor(_loop_executor())
        return loop


def install() -> None:
    """Make every event loop created from now on (``asyncio.run``, ``asyncio.new_event_loop()``,
    ``asyncio.Runner`` without a ``loop_factory``) use a cmwq default executor, by installing
    :class:`EventLoopPolicy`. Loops that already exist keep their executor."""
    if not isinstance(_asyncio.get_event_loop_policy(), EventLoopPolicy):
        _asyncio.set_event_loop_policy(EventLoopPolicy())


def uninstall() -> None:
    """Put the standard policy back (if :func:`install` put ours in place)."""
    if isinstance(_asyncio.get_event_loop_policy(), EventLoopPolicy):
        _asyncio.set_event_loop_policy(None)


def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None) -> _T:
    """``asyncio.run(main, debug=debug)`` in a loop from :func:`new_event_loop`, on any supported
    Python (``asyncio.Runner`` from 3.11, the same steps by hand on 3.10)."""
    if not _asyncio.iscoroutine(main):
        raise ValueError(f"run() needs a coroutine as main, got {type(main).__name__}")
    runner_class: Callable[..., Any] | None = getattr(_asyncio, "Runner", None)
    if runner_class is not None:
        with runner_class(debug=debug, loop_factory=new_event_loop) as runner:
            return runner.run(main)  # type: ignore[no-any-return]
    return _run_310(main, debug)


def _run_310(main: Coroutine[Any, Any, _T], debug: bool | None) -> _T:
    """Python 3.10's ``asyncio.run``, with the loop from :func:`new_event_loop`."""
    if _asyncio.events._get_running_loop() is not None:
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")
    loop = new_event_loop()
    try:
        _asyncio.set_event_loop(loop)
        if debug is not None:
            loop.set_debug(debug)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            _asyncio.set_event_loop(None)
            loop.close()


def _cancel_all_tasks(loop: _asyncio.AbstractEventLoop) -> None:
    """asyncio.runners._cancel_all_tasks of Python 3.10."""
    to_cancel = _asyncio.all_tasks(loop)
    if not to_cancel:
        return
    for task in to_cancel:
        task.cancel()
    loop.run_until_complete(_asyncio.gather(*to_cancel, return_exceptions=True))
    for task in to_cancel:
        if task.cancelled():
            continue
        if task.exception() is not None:
            loop.call_exception_handler({
                "message": "unhandled exception during asyncio.run() shutdown",
                "exception": task.exception(),
                "task": task,
            })
