"""Deferring Ctrl-C over a state change that takes several steps.

Python runs signal handlers in the main thread, between bytecodes, at points that vary with the
interpreter version (a call's return, a function's entry, a backward jump): so ``KeyboardInterrupt``
can land between any two calls of a critical section. Sections that are a run of plain stores
followed by one C call (queueing a submitted call) need nothing; the few that must make several
calls to stay consistent (cancelling a work, queueing a reusable one, changing the limits) run
inside :class:`deferred_interrupts`: a SIGINT that arrives meanwhile is handled when the block
ends, by the handler that was in force, so the user still gets the ``KeyboardInterrupt``, just
after the pools are consistent again. Only the main thread receives signals, so on any other
thread the block costs one comparison.
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
