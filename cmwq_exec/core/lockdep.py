"""The lock order of the package, written down once, and checked in debug mode.

Every lock the package owns is made here, by :func:`make_lock` with the name of its class. A thread
that holds a lock takes only locks of a higher rank, so no two threads can wait for each other:

======  ====================  ===========================================================
rank    class                 the lock
======  ====================  ===========================================================
3       ``celery-callbacks``  ``Outbox.drain_lock`` (cmwq_exec.celery_outbox): held while callbacks run
5       ``celery-outbox``     ``Outbox.lock``: the Celery pool's callbacks on their way (makes a workqueue)
10      ``system-registry``   ``system._system_lock``: creating or replacing the process's System
20      ``system``            ``System.lock``: online pools, the workqueue registry
25      ``executor``          ``CMWQExecutor._shutdown_lock``: shutdown against a broken pool
27      ``celery``            ``TaskPool._lock`` (cmwq_exec.celery): its jobs and limits
30      ``workqueue``         ``WorkQueue._lock``: limits, inactive list, pending state of its works
40      ``pool``              ``WorkerPool.lock`` and its conditions
50      leaves                ``rescuer``, ``flush``, ``timer``, ``threads``, ``watchdog``,
                              ``plugin``, ``stripe``: they never take another lock
======  ====================  ===========================================================

Two locks of one class are never held together (two pools, two workqueues).

Who may touch a field: one legend for the whole core, like the table at the top of the kernel's
workqueue.c. Every field comment in ``cmwq_exec/core`` begins with one of these letters:

====  =========================================================================================
I     set at init, never changed once others can see the object (read without a lock)
P     under the lock of the pool the object belongs to (``WorkerPool.lock``)
W     under the workqueue's lock (``WorkQueue._lock``)
F     under a flush lock (``WorkQueue._flush_lock``, or ``work_flush.lock`` for single works)
S     under the system's lock (``System.lock``)
N     under ``System.threads_lock`` (the count of worker threads)
T     under the timer's lock (the timer wheel's ``lock``)
R     under the rescuer's lock (``Rescuer.lock``)
D     under the watchdog's lock (``Watchdog.lock``)
X     only by one thread: a worker's or rescuer's own thread, or the timer thread (named next)
====  =========================================================================================

Two letters joined, as ``W+P``, mean changed with both locks held and read under either. A field
that is also read without its lock says so after the letter, with why a stale value does no harm
(``P; read racily by ...``).

A function called with a lock held says so in its docstring (``P: held``) and checks it, as the
kernel's begin with ``lockdep_assert_held(&pool->lock)``: it begins with ``assert_held(lock)``, or,
on the per-work path (queueing, waking, running, completing), it is decorated with
``@must_hold("lock")`` (the lock named by its attribute path from ``self``, like sparse's
``__must_hold``). A worker's park lock and a work's pending bit are not locks in this sense (another
thread releases them: they are a binary semaphore and a test-and-set bit) and are not checked.

Debug mode: with ``CMWQ_LOCKDEP=1`` in the environment when the package is imported, every lock is
a :class:`CheckedLock` that checks the order on every blocking acquisition, records a violation in
:data:`violations` and raises :class:`LockOrderError` instead of taking the lock; and
:func:`assert_held` and :func:`must_hold` raise :class:`LockNotHeldError` (recorded likewise) when
the calling thread does not hold the lock (a lock from :func:`make_lock`, or a
``threading.Condition`` over one). Without it, :func:`make_lock` returns a plain
``threading.Lock``, :func:`assert_held` is a function that does nothing (chosen once at import) and
:func:`must_hold` returns the method unchanged: nothing at all on the per-work path, where even a
call to a no-op (~35 ns) would show in the per-work figures.
"""

from __future__ import annotations

import functools
import operator
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

RANKS = {
    "celery-callbacks": 3,
    "celery-outbox": 5,
    "system-registry": 10,
    "system": 20,
    "executor": 25,
    "celery": 27,
    "workqueue": 30,
    "pool": 40,
    "rescuer": 50,
    "flush": 50,
    "timer": 50,
    "threads": 50,
    "watchdog": 50,
    "plugin": 50,
    "stripe": 50,
}

ENABLED = os.environ.get("CMWQ_LOCKDEP", "").strip().lower() not in ("", "0", "false", "no", "off")

#: Every violation seen in this process (debug mode), as messages; the test suite asserts it stays empty.
violations: list[str] = []


class LockOrderError(AssertionError):
    """A lock was about to be taken against the documented order (debug mode only)."""


class LockNotHeldError(AssertionError):
    """A function documented as called with a lock held was called without it (debug mode only)."""


class _Held(threading.local):
    stack: list[CheckedLock] = []  # noqa: RUF012 (a per-thread default, replaced on first push)


_held = _Held()


class CheckedLock:
    """A ``threading.Lock`` that checks the lock order (debug mode). Usable by ``threading.Condition``."""

    __slots__ = ("_lock", "name", "rank")

    def __init__(self, name: str) -> None:
        self._lock = threading.Lock()
        self.name = name
        self.rank = RANKS[name]

    def _check(self) -> None:
        for held in _held.stack:
            if held.rank >= self.rank:
                message = (f"lock order violated: taking {self.name!r} (rank {self.rank}) while holding "
                           f"{held.name!r} (rank {held.rank}); see cmwq_exec/core/lockdep.py")
                violations.append(message)
                raise LockOrderError(message)

    def _push(self) -> None:
        stack = _held.stack
        if not stack:
            stack = _held.stack = []
        stack.append(self)

    def _pop(self) -> None:
        stack = _held.stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is self:
                del stack[i]
                return

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking:  # a try-lock cannot deadlock
            self._check()
        got = self._lock.acquire(blocking, timeout)
        if got:
            self._push()
        return got

    def release(self) -> None:
        self._pop()
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    # threading.Condition uses these when the lock has them
    def _is_owned(self) -> bool:
        return any(held is self for held in _held.stack)

    def _release_save(self) -> None:
        self.release()

    def _acquire_restore(self, _state: Any) -> None:
        self.acquire()

    def __repr__(self) -> str:
        return f"<CheckedLock {self.name} rank={self.rank} {'locked' if self.locked() else 'unlocked'}>"


def make_lock(name: str) -> Any:
    """A new lock of class ``name`` (a key of :data:`RANKS`)."""
    if name not in RANKS:
        raise ValueError(f"unknown lock class {name!r}; known: {', '.join(sorted(RANKS))}")
    if ENABLED:
        return CheckedLock(name)
    return threading.Lock()


def _assert_held_checked(lock: Any) -> None:
    """Raise :class:`LockNotHeldError` unless this thread holds ``lock`` (debug mode)."""
    # A CheckedLock knows its holders; a Condition asks its lock (Condition._is_owned delegates).
    # A plain Lock does not know its owner: being locked by someone is all that can be checked.
    is_owned = getattr(lock, "_is_owned", None)
    held = is_owned() if is_owned is not None else lock.locked()
    if not held:
        inner = getattr(lock, "_lock", None)  # a Condition's lock
        name = getattr(lock, "name", None) or getattr(inner, "name", None) or repr(lock)
        message = f"lock {name!r} not held by thread {threading.current_thread().name!r}"
        violations.append(message)
        raise LockNotHeldError(message)


def _assert_held_noop(lock: Any) -> None:
    """Does nothing: debug mode is off (see :data:`ENABLED`)."""


#: ``assert_held(lock)``: in debug mode, raise :class:`LockNotHeldError` unless this thread holds ``lock``.
assert_held = _assert_held_checked if ENABLED else _assert_held_noop


def must_hold(path: str) -> Callable[[_F], _F]:
    """Decorate a method called with the lock at ``self.<path>`` held (``"lock"``, ``"pool.lock"``).

    In debug mode the method first checks it as :func:`assert_held` does; otherwise the method is
    returned unchanged and the check costs nothing."""
    if not isinstance(path, str) or not all(part.isidentifier() for part in path.split(".")):
        raise ValueError(f"must_hold(path): path must be a dotted attribute name, got {path!r}")
    if not ENABLED:
        return _unchanged
    lock_of = operator.attrgetter(path)

    def decorate(method: _F) -> _F:
        @functools.wraps(method)
        def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
            _assert_held_checked(lock_of(self))
            return method(self, *args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate


def _unchanged(method: _F) -> _F:
    return method


def _after_fork_in_child() -> None:
    _held.stack = []  # the forking thread's locks are fresh copies in the child, none held


os.register_at_fork(after_in_child=_after_fork_in_child)
