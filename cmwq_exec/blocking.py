"""Telling the pool that a worker sleeps: the scheduler hook of this design.

The kernel learns from the scheduler that a worker blocks and wakes another one if works are pending.
Python has no such hook, so code says it: ``with cmwq_exec.blocking():`` around a wait (or
``@cmwq_exec.blocking()`` on a function). Waiting on a cmwq future from inside a worker does it by
itself (see :mod:`cmwq_exec.executor`). Outside a worker it does nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .core.worker import current


class blocking(contextlib.ContextDecorator):
    """Context manager and decorator: the current worker is about to sleep, and woke up on exit.

    Cheap when nested and a no-op outside a worker, so it is safe to put around any wait in library
    code. One instance may be shared by threads: the state lives on the worker.
    """

    __slots__ = ()

    def __enter__(self) -> blocking:
        worker = current.worker
        if worker is not None:
            worker.sleep_begin()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        worker = current.worker
        if worker is not None:
            worker.sleep_end()
