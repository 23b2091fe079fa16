"""Interruptions: the rule every critical section follows, and deferring Ctrl-C over the few that
cannot.

Where an exception may land. A ``KeyboardInterrupt`` (in the main thread) or an exception another
thread raises with ``PyThreadState_SetAsyncExc`` (a Celery time limit, in a task's thread) is raised
only where the interpreter checks for one: as a call returns (a C call, or a Python function,
whose own code checks as its calls return), on entry to a function and on a backward jump; never
between two stores. So it can land between any two *calls* of a critical section reachable from a
caller's thread (queueing, cancelling, flushing, changing the limits, ``blocking()``), and in
any of the Python functions those call.

The rule, for every such section:

1. Every lock is taken in a ``with`` block whose ``__enter__`` is C (a lock, not a Condition:
   ``Condition.__enter__`` is a Python function, and an exception raised as it returns keeps the
   lock); the lock is released however the block ends.
2. Calls first, stores after: the calls that may fail come before the first change of shared
   state, and between two changes there is no call but the last. A count or a bit taken before a
   ``try`` whose ``finally`` gives it back is taken inside that ``try``, by a store, after its
   last call (``flush()`` counts itself this way).
3. A move from one list to another pops in a ``try`` and appends in its ``finally``.

The race rule 3 prevents, told as it would happen (``_activate_locked`` moving a work that waited
for ``max_active`` to its pool, on the thread of a caller that raised the limit):

1. The caller's thread holds the workqueue's lock and the pool's lock, and pops the work off the
   workqueue's inactive list (``popleft``, a C call).
2. As ``popleft`` returns, the interpreter finds an exception pending for this thread and raises it.
3. The locks are released by their ``with`` blocks, but the work is on no list: not inactive, not
   on the worklist. It is pending, so it can be neither queued again nor cancelled; its in-flight
   count never drops, so every flush of its workqueue waits for ever, and interpreter exit with it.

With the append in the ``finally``, step 2 still raises, after the work is on its pool. A wakeup
lost the same way (a work appended, the wake not yet done) is made up by the watchdog, which wakes a
worker for a pool with works pending and nobody running.

Sections that must make several calls to stay consistent (cancelling a work, queueing a reusable
one, changing the limits) run inside :class:`deferred_interrupts` as well: a SIGINT that arrives
meanwhile is handled when the block ends, by the handler that was in force, so the user still gets
the ``KeyboardInterrupt``, just after the pools are consistent again. Only the main thread receives
signals, so on any other thread the block costs one comparison; an exception raised from another
thread is not deferred, which the rule above covers.

The rule is checked, not only stated: ``tests/test_interruptions.py`` injects an exception at
every call return of queueing, cancelling, flushing and submitting (with and without the deferral
of this block) and checks after each that no work is lost and the counts are consistent.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

_main_thread = threading.main_thread()


class deferred_interrupts:
    """``with deferred_interrupts():``: a SIGINT arriving in the block is handled at its end."""

    __slots__ = ("saved", "pending")

    def __init__(self) -> None:
        self.saved: Any = None
        self.pending: tuple[int, Any] | None = None

    def __enter__(self) -> None:
        if threading.current_thread() is not _main_thread:
            return
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            return  # SIG_IGN, SIG_DFL or not set from Python: no Python code would run anyway
        self.saved = handler
        try:
            signal.signal(signal.SIGINT, self._defer)
        except ValueError:  # not the main interpreter
            self.saved = None

    def _defer(self, signum: int, frame: Any) -> None:
        self.pending = (signum, frame)

    def __exit__(self, *exc_info: Any) -> None:
        saved = self.saved
        if saved is None:
            return
        self.saved = None
        signal.signal(signal.SIGINT, saved)
        pending, self.pending = self.pending, None
        if pending is not None:
            saved(*pending)


def _after_fork_in_child() -> None:
    global _main_thread
    _main_thread = threading.main_thread()


os.register_at_fork(after_in_child=_after_fork_in_child)
