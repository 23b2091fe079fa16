"""The context a call helped inline runs in: the one it would have on a worker thread of its own.

A submitted call runs on a worker thread in that thread's context, as with ``ThreadPoolExecutor``:
it does not see the submitter's context variables (wrap it in ``contextvars.copy_context().run`` to
pass them), and a thread started by ``threading`` begins with an empty context. A worker that waits
on a still-pending future runs the call itself (join helping, see :mod:`cmwq_exec.executor`). In the
waiting caller's context that call would see the caller's request-scoped variables and, worse, leave
its own sets there when it returns: a request id, a tracing span, ``decimal`` precision (``decimal``
keeps its thread's context in a ContextVar). So a helped call gets a context of its own:

* a new empty ``contextvars.Context``: what a worker thread starts with;
* for an executor with an initializer, a copy of the context the initializer left on the helping
  thread (a call that a worker runs sees what the initializer set on its thread, as with
  ``ThreadPoolExecutor``), taken once per thread right after the initializer ran.

``decimal``'s context is a mutable object that the ContextVar holds: a copied Context shares it, and
a call's ``getcontext().prec = 5`` would reach the caller's. Each copy therefore gets its own copy of
that object (only when ``decimal`` is imported: importing it costs ~1 ms).
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_fresh(fn: Callable[[], T]) -> T:
    """``fn()`` in a new empty context; its sets end with it."""
    return contextvars.Context().run(fn)


def snapshot() -> contextvars.Context:
    """A copy of the current thread's context, with a ``decimal`` context of its own."""
    base = contextvars.copy_context()
    base.run(_own_decimal_context)
    return base


def run_in_copy(base: contextvars.Context, fn: Callable[[], T]) -> T:
    """``fn()`` in a copy of ``base`` (from :func:`snapshot`); neither sees the other's sets."""
    return base.copy().run(_with_own_decimal_context, fn)


def _own_decimal_context() -> None:
    decimal = sys.modules.get("decimal")
    if decimal is not None:
        decimal.setcontext(decimal.getcontext().copy())


def _with_own_decimal_context(fn: Callable[[], T]) -> T:
    _own_decimal_context()
    return fn()
