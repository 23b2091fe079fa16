"""Injecting an asynchronous exception at one chosen call return inside chosen functions.

A Celery time limit or ``revoke(terminate=True)`` raises into a task's thread with
``PyThreadState_SetAsyncExc``; the interpreter raises it where it next checks for one, at a call's
return at the latest. :func:`inject_at` reproduces that deterministically: on the calling thread it
counts every ``return`` and ``c_return`` event while a frame of one of those functions runs (the
calls they make included), and at the ``k``-th it makes
:class:`Injected` pending with ``PyThreadState_SetAsyncExc``. The profile function is where the
interpreter next checks, so the exception surfaces in the traced code as if the call that just
returned had raised it. A test runs its scenario for k = 1, 2, ... until a run ends with no injection
(``fired`` False): every call return of those functions has then been tried once.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

# A private prototype (the pool's own is private to cmwq_exec.celery): the GIL is held in the call.
_SetAsyncExc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


class Injected(BaseException):
    """The injected exception: a BaseException, as the pool's own are for code that catches Exception."""


@dataclass
class Injection:
    """One run: inject at the ``k``-th return; ``fired`` tells whether there were that many, and
    ``where`` names the event (function, and the C function for a ``c_return``)."""

    k: int
    codes: frozenset[CodeType]
    within: str
    besides: frozenset[str]
    once: bool = False
    seen: int = 0
    depth: int = 0
    fired: bool = False
    where: str = ""
    thread_id: int = field(default_factory=threading.get_ident)

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if frame.f_code in self.codes:
            if event == "call":
                self.depth += 1
                return
            if event == "return":
                self.depth -= 1  # its own return: the caller's next check is in the with block
                if not self.depth and self.once:
                    sys.setprofile(None)  # the functions ran: nothing more to count
                return
        if not self.depth or event not in ("return", "c_return"):
            return
        surfaces_in = frame.f_back if event == "return" else frame
        if surfaces_in is None or not self.ours(surfaces_in.f_code):
            return
        if frame.f_code.co_filename in self.besides:
            return
        self.seen += 1
        if self.seen == self.k and not self.fired:
            self.fired = True
            called = getattr(arg, "__qualname__", "") if event == "c_return" else frame.f_code.co_name
            self.where = f"{surfaces_in.f_code.co_name}:{surfaces_in.f_lineno} after {called}"
            sys.setprofile(None)
            _SetAsyncExc(self.thread_id, id(Injected))  # raised here, at the interpreter's next check

    def ours(self, code: CodeType) -> bool:
        filename = code.co_filename
        return code in self.codes or (filename.startswith(self.within) and filename not in self.besides)


@contextmanager
def inject_at(k: int, *functions: Any, within: str = "",
              besides: tuple[str, ...] = ()) -> Iterator[Injection]:
    """On the calling thread, for the block: inject :class:`Injected` at the ``k``-th call return
    (1-based) inside ``functions`` (plain functions or methods), counting only the returns into
    them and into code whose file is under ``within`` (all code if empty).

    The returns into other code (the standard library's) are left alone: an exception there
    breaks what that code guarantees (``Thread.is_alive()`` interrupted marks a live thread
    stopped), which no code of ours can make up for; the documentation of asynchronous
    exceptions says so. Nor are the returns in or out of the files ``besides`` (the lock checker
    of debug mode, whose wrappers are not the code under test)."""
    codes = frozenset(getattr(fn, "__func__", fn).__code__ for fn in functions)
    injection = Injection(k, codes, within, frozenset(besides))
    previous = sys.getprofile()
    sys.setprofile(injection.profile)
    try:
        yield injection
    finally:
        sys.setprofile(previous)


def install(k: int, *functions: Any, within: str = "", besides: tuple[str, ...] = ()) -> Injection:
    """Like :func:`inject_at`, for code that runs after the caller returns (the pool closing a
    task's window once the task's code is done): installed on the calling thread now, removed
    when the first call of ``functions`` returns."""
    codes = frozenset(getattr(fn, "__func__", fn).__code__ for fn in functions)
    injection = Injection(k, codes, within, frozenset(besides), once=True)
    sys.setprofile(injection.profile)
    return injection
