"""Opt-in detection of blocking standard-library calls: ``blocking()`` without writing it.

With detection on, a worker that calls a known blocking primitive (``time.sleep``, socket and
``select`` operations, lock/event/queue/condition waits, ``os.waitpid`` and friends) tells its pool it
sleeps for the duration of the call, exactly as if the call were wrapped in ``blocking()``.

* Python 3.12+: ``sys.monitoring`` CALL events. The callback looks at the callable once per call
  site: at a site whose callable is not a known blocking primitive it returns ``DISABLE``, and the
  interpreter never calls it there again, so warm code pays nothing. At a blocking site the matching
  C_RETURN/C_RAISE event ends the sleep. A site is judged by the first callable it calls.
* Python 3.10/3.11: the Python-level entry points are wrapped (``time.sleep``, ``select.select``,
  ``threading.Condition.wait``/``Thread.join``, ``socket.socket`` I/O methods, ``os.waitpid``,
  ``subprocess.Popen.wait``, ``selectors``' ``select``). Code that bound one of them by name before
  detection was enabled (``from time import sleep``) keeps the unwrapped function.

Calls made by cmwq_exec's own code are never counted (the pool's locks are not sleeps), except where
it calls the user's function (submitting ``time.sleep`` itself counts).
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
from types import BuiltinFunctionType, BuiltinMethodType, MethodDescriptorType
from typing import Any

from .core import hooks
from .core.worker import current
from .core.workqueue import Work

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()
_mechanism: str | None = None  # under _lock: None, "sys.monitoring" or "wrappers"

#: blocking functions of the stdlib's C modules
_FUNCTIONS: set[Any] = {time.sleep, select.select, os.waitpid, os.wait, os.read, os.write}
for _name in ("wait3", "wait4", "waitid", "readv", "pread"):
    if hasattr(os, _name):
        _FUNCTIONS.add(getattr(os, _name))
#: (type of the bound object, method name) of blocking C methods
_METHODS: set[tuple[type, str]] = {
    (type(threading.Lock()), "acquire"),
    (type(threading.RLock()), "acquire"),
    *((socket.socket.__mro__[1], name) for name in (
        "recv", "recv_into", "recvfrom", "recvfrom_into", "recvmsg", "_accept", "connect", "send",
        "sendall", "sendto", "sendmsg")),
}
if hasattr(select, "epoll"):
    _METHODS.add((select.epoll, "poll"))
if hasattr(select, "poll"):
    _METHODS.add((type(select.poll()), "poll"))
try:
    import _queue

    _METHODS.add((_queue.SimpleQueue, "get"))
except ImportError:  # pragma: no cover
    pass


def is_blocking_call(fn: object) -> bool:
    """Is ``fn`` one of the blocking primitives detection knows? ``fn`` may be a function, a bound
    method, or (as sys.monitoring reports ``obj.method(...)`` calls) the unbound method descriptor."""
    if type(fn) is MethodDescriptorType:
        return any((cls, fn.__name__) in _METHODS for cls in fn.__objclass__.__mro__)  # type: ignore[attr-defined]
    if type(fn) is BuiltinFunctionType or type(fn) is BuiltinMethodType:
        if fn in _FUNCTIONS:
            return True
        owner = getattr(fn, "__self__", None)
        if owner is None:
            return False
        name = fn.__name__  # type: ignore[attr-defined]
        return any((cls, name) in _METHODS for cls in type(owner).__mro__)
    return False


def enable() -> str:
    """Turn detection on for the whole process; returns the mechanism used. Idempotent."""
    global _mechanism
    with _lock:
        if _mechanism is None:
            if sys.version_info >= (3, 12):
                _enable_monitoring()
                _mechanism = "sys.monitoring"
            else:
                _enable_wrappers()
                _mechanism = "wrappers"
        return _mechanism


def disable() -> None:
    """Turn detection off again."""
    global _mechanism
    with _lock:
        if _mechanism == "sys.monitoring":
            _disable_monitoring()
        elif _mechanism == "wrappers":
            _disable_wrappers()
        _mechanism = None


def enabled() -> str | None:
    return _mechanism


# -- Python 3.12+: sys.monitoring -----------------------------------------------------------------

_tool_id: int | None = None


#: Code objects of cmwq_exec that call the user's functions (a submitted ``time.sleep`` counts):
#: the core's Work here, and what the front-ends add with :func:`add_user_call_site`.
_user_sites: set[Any] = {Work._execute.__code__}


def add_user_call_site(function: Any) -> None:
    """``function`` calls the user's code (a front-end's run of a submitted call, a task queue's
    run of a task): the waits below it are its works' sleeps, and with sys.monitoring its own
    calls are watched. Each front-end registers its function as it is imported; one registered
    while detection is on counts for the walk out from a wait at once."""
    with _lock:
        _user_sites.add(function.__code__)
        if _mechanism is not None:
            _USER_SITES.add(function.__code__)


def _user_call_sites() -> set[Any]:
    return set(_user_sites)


_USER_SITES: set[Any] = set()
_DISABLE: Any = getattr(getattr(sys, "monitoring", None), "DISABLE", None)


def _for_the_user(frame: Any, user_sites: set[Any]) -> bool:
    """Is the blocking call made from ``frame`` one of the user's waits, not the pools' own?

    The first frame of cmwq_exec's own code outward from the call decides: one that runs the
    user's function (a user call site) says yes, any other says no. A stdlib wait reached from the
    pools' own code (``Thread.is_alive`` taking a lock with ``acquire(False)`` while the timer is
    started under a pool lock, a plugin hook called by the pool) is not a sleep of the work: telling
    the pool about it would take the pool lock this thread may hold, and wait for itself.
    """
    while frame is not None:
        code = frame.f_code
        if code in user_sites:
            return True
        if code.co_filename.startswith(_PACKAGE_DIR):
            return False
        frame = frame.f_back
    return False


def _on_call(code: Any, offset: int, fn: object, arg0: object) -> Any:
    if not is_blocking_call(fn):
        # where cmwq_exec calls the user's function, the next callable may block: keep watching
        return None if code in _USER_SITES else _DISABLE
    if code.co_filename.startswith(_PACKAGE_DIR) and code not in _USER_SITES:
        return _DISABLE
    worker = current.worker
    if (worker is not None and worker.current_work is not None
            and _for_the_user(sys._getframe(1), _USER_SITES)):
        worker.sleep_begin()
        stack = current.detected
        if stack is None:
            stack = current.detected = []
        stack.append((code, offset))
    return None


def _on_return(code: Any, offset: int, fn: object, arg0: object) -> Any:
    stack = current.detected
    if stack and stack[-1] == (code, offset):
        stack.pop()
        worker = current.worker
        if worker is not None:
            worker.sleep_end()
    return None


def _enable_monitoring() -> None:
    global _tool_id
    _USER_SITES.update(_user_call_sites())
    mon = sys.monitoring  # type: ignore[attr-defined]
    for tool_id in (4, 3):
        if mon.get_tool(tool_id) is None:
            mon.use_tool_id(tool_id, "cmwq_exec")
            _tool_id = tool_id
            break
    else:
        raise RuntimeError("blocking detection needs a free sys.monitoring tool id (3 or 4); both are taken")
    events = mon.events
    mon.register_callback(_tool_id, events.CALL, _on_call)
    mon.register_callback(_tool_id, events.C_RETURN, _on_return)
    mon.register_callback(_tool_id, events.C_RAISE, _on_return)
    mon.set_events(_tool_id, events.CALL | events.C_RETURN | events.C_RAISE)


def _disable_monitoring() -> None:
    global _tool_id
    if _tool_id is None:
        return
    mon = sys.monitoring  # type: ignore[attr-defined]
    mon.set_events(_tool_id, 0)
    for event in (mon.events.CALL, mon.events.C_RETURN, mon.events.C_RAISE):
        mon.register_callback(_tool_id, event, None)
    mon.free_tool_id(_tool_id)
    _tool_id = None


# -- Python 3.10/3.11: wrappers -------------------------------------------------------------------

_wrapped: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)


def _wrap(owner: Any, name: str) -> None:
    original = getattr(owner, name, None)
    if original is None:
        return
    from .blocking import blocking

    def call_blocking(*args: Any, **kwargs: Any) -> Any:
        # only a work's own waits, as with sys.monitoring: a worker between works (a manager
        # starting a thread waits on an Event) is not running, and its wait is no sleep to learn
        worker = current.worker
        if (worker is None or worker.current_work is None
                or not _for_the_user(sys._getframe(1), _user_sites)):
            return original(*args, **kwargs)
        with blocking():
            return original(*args, **kwargs)

    call_blocking.__wrapped__ = original  # type: ignore[attr-defined]
    call_blocking.__name__ = getattr(original, "__name__", name)
    call_blocking.__doc__ = getattr(original, "__doc__", None)
    _wrapped.append((owner, name, original))
    setattr(owner, name, call_blocking)


def _enable_wrappers() -> None:
    targets: list[tuple[Any, tuple[str, ...]]] = [
        (time, ("sleep",)),
        (select, ("select",)),
        (os, ("waitpid", "wait", "wait3", "wait4", "waitid")),
        (threading.Condition, ("wait",)),
        (threading.Thread, ("join",)),
        (socket.socket, ("recv", "recv_into", "recvfrom", "recvfrom_into", "accept", "connect",
                         "send", "sendall", "sendto")),
        (subprocess.Popen, ("wait", "communicate")),
    ]
    for cls in (getattr(selectors, n, None) for n in ("SelectSelector", "PollSelector", "EpollSelector")):
        if cls is not None:
            targets.append((cls, ("select",)))
    for owner, names in targets:
        for name in names:
            _wrap(owner, name)


def _disable_wrappers() -> None:
    while _wrapped:
        owner, name, original = _wrapped.pop()
        setattr(owner, name, original)




# the process's pools turn detection on when their configuration asks for it
hooks.on_system_start(lambda config: enable() if config.detect_blocking else None)
