"""Telling the pool that a worker sleeps: the scheduler hook of this design.

The kernel learns from the scheduler that a worker blocks and wakes another one if works are pending.
Python has no such hook, so code says it: ``with cmwq_exec.blocking():`` around a wait (or
``@cmwq_exec.blocking()`` on a function). Waiting on a cmwq future from inside a worker does it by
itself (see :mod:`cmwq_exec.executor`). Outside a worker it does nothing.

``with cmwq_exec.waiting():`` says more: the call waits for *other calls* of its own executor or
workqueue (a queue a sibling call feeds, an Event a sibling sets). It sleeps as in ``blocking()``
and also gives its ``max_workers`` (``max_active``) slot up until it wakes, so the calls it waits
for can start even on a bounded executor, as a wait on a cmwq future does.
"""

from __future__ import annotations

import contextlib
import threading
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


#: The thread's open waiting() blocks, innermost last: (the worker's work_seq, whether that block
#: gave the slot up). An entry of an earlier work (one an exception left behind) is never taken
#: for the current work's: the end of a work takes its slot back by itself.
_waits = threading.local()


class waiting(contextlib.ContextDecorator):
    """Context manager and decorator: the current call waits for other calls of its executor or
    workqueue. Like :class:`blocking`, and the call gives its ``max_active`` slot up meanwhile
    (the outermost block does; nested ones only sleep).

    Use it where a call of a bounded executor waits on something its sibling calls provide;
    a plain ``blocking()`` keeps the slot, which is what bounds a pool of connections, say.
    A no-op outside a worker; one instance may be shared by threads.
    """

    __slots__ = ()

    def __enter__(self) -> waiting:
        worker = current.worker
        if worker is not None:
            stack = getattr(_waits, "stack", None)
            if stack is None:
                stack = _waits.stack = []
            worker.sleep_begin()
            stack.append((worker.work_seq, worker.wait_begin()))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        worker = current.worker
        if worker is not None:
            stack = getattr(_waits, "stack", None)
            began = False
            while stack:
                seq, began = stack.pop()
                if seq == worker.work_seq:
                    break
                began = False  # left behind by an earlier work: not this one's
            worker.wait_end(began)
            worker.sleep_end()
