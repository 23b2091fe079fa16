"""Asynchronous exceptions into a task's thread, inside the task's injection window.

Every task-queue front-end raises its limits into the thread that runs a task this way: the Celery
pool (soft and hard time limits, ``revoke(terminate=True)``: cmwq_exec.celery_jobs), the Huey
consumer (task timeouts, the interrupting shutdown: cmwq_exec.huey), the RQ worker (job timeouts,
``send_stop_job_command``: cmwq_exec.rq) and the Dramatiq worker (time limits, shutdown
notifications: cmwq_exec.dramatiq). This module is the one implementation they share; it knows no
task queue.

A limit raises into the task's thread with ``PyThreadState_SetAsyncExc``; the interpreter raises it
where that thread next checks, a call's return at the latest, so it can land in any Python code the
thread runs, ours included. So a job has an injection *window*: the job's thread opens it just
before the task's code and closes it right after, and nothing is injected outside it. The window is
guarded by the job's ``gate``, a plain lock (like a worker's park lock, it is not one of the
lock-order classes): taking a C lock in a ``with`` block cannot be cut short by an asynchronous
exception, where the front-end's lock, a checked Python lock in lockdep's debug mode, could be left
held by one landing inside its ``acquire``. The numbered race the gate prevents:

1. the timer thread, holding the front-end's lock, sees the job in its target and decides to inject;
2. the job's thread returns from the target and starts closing the window;
3. the injection lands in the closing code, after the thread took a lock and before it recorded
   that it holds it: the lock is never released.

With the gate, step 3 can only land after the gate's release, in code that closes the window
again (idempotent) and clears what is pending. ``INJECTIONS`` says how many can reach the thread.

A job is any object with these fields (see :class:`WindowJob`): ``gate`` (a ``threading.Lock``),
``thread_id`` (the thread running it), ``in_target`` and ``finished`` (under ``gate``), ``unwind``
(why it was ended, or None) and ``revoked_early`` (ended before it started), and ``pool._lock``,
the front-end's lock that :func:`inject` is called with.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Protocol

from .core.lockdep import assert_held

__all__ = ["INJECTIONS", "WindowJob", "async_raise", "close_window", "close_window_surely", "inject",
           "open_window"]

# A private prototype rather than ctypes.pythonapi's shared function object, whose argtypes other
# code may set differently. ``exc`` is a class pointer (the interpreter raises ``exc()``), or NULL to
# clear a pending one. PyDLL-style: the GIL is held during the call.
_SetAsyncExc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))

#: The most asynchronous exceptions one job's thread can receive: one soft limit (Celery's
#: SoftTimeLimitExceeded, or a terminate with SIGUSR1 as prefork delivers it) and one unwind (a hard
#: limit, a timeout or a terminate, whichever comes first). The job's end closes the window once per
#: injection that may land in it, plus once (see close_window_surely).
INJECTIONS = 2


class WindowJob(Protocol):
    """What the window needs of a job (the front-ends' jobs have more)."""

    gate: threading.Lock
    thread_id: int
    in_target: bool
    finished: bool
    unwind: str | None
    revoked_early: bool
    pool: Any  # its ``_lock`` is held by whoever injects


def async_raise(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Make ``exc_type`` raise in thread ``thread_id`` at its next check; None clears it."""
    _SetAsyncExc(thread_id, None if exc_type is None else id(exc_type))


def open_window(job: WindowJob) -> bool:
    """On the job's thread, just before its target: open the injection window, unless the job
    was unwound or terminated before it could start (then False)."""
    with job.gate:
        if job.unwind is not None or job.revoked_early:
            return False
        job.in_target = True
        return True


def close_window(job: WindowJob) -> None:
    """On the job's thread, after its target: close the window for good and clear what is
    pending. Idempotent: called again if an exception injected before the close lands in it."""
    with job.gate:
        job.in_target = False
        job.finished = True
    async_raise(job.thread_id, None)


def close_window_surely(job: WindowJob) -> None:
    """Close the window even if injections made before the close land in it: each one that lands
    is caught by the next level, which closes again; there are at most ``INJECTIONS`` (the levels
    are written out, not looped: a loop's backward jump is a place one may land too)."""
    try:
        close_window(job)
    except BaseException:
        try:
            close_window(job)
        except BaseException:
            close_window(job)


def inject(job: WindowJob, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` in the job's thread if its window is open. P: held (``job.pool._lock``)."""
    assert_held(job.pool._lock)
    with job.gate:
        if job.in_target:
            async_raise(job.thread_id, exc_type)
