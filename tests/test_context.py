"""The context a call runs in: a call that a waiting worker runs inline (join helping) behaves like
a call run on a worker thread of its own. Its ContextVar sets and ``decimal`` changes stay inside it,
and it sees what a call run by a worker sees, not the waiting caller's context.

Every helped call here belongs to an executor with ``max_workers=1`` whose only slot the waiting
caller holds: no worker can start it, so it runs inline, on the caller's thread (checked)."""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import decimal
import threading
from collections.abc import Callable
from typing import Any

import pytest

from cmwq_exec import CMWQExecutor

pytestmark = pytest.mark.timeout(90)

Make = Callable[..., CMWQExecutor]
REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="unset")


def probe() -> tuple[str, int]:
    """What a call sees of the context: the request variable and ``decimal``'s precision."""
    return REQUEST.get(), decimal.getcontext().prec


def in_own_context(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run in a context of its own, so that a caller's sets never stay on the shared workers."""
    return lambda: contextvars.Context().run(fn)


def request_scoped_caller(executor: cf.Executor, inner: Callable[[], Any], tag: str, precision: int
                          ) -> Callable[[], tuple[Any, tuple[str, int], bool]]:
    """A call that sets its request-scoped context, submits ``inner`` to ``executor`` and waits for
    it; returns inner's result, its own context after the wait, and whether inner ran on its thread."""

    def caller() -> tuple[Any, tuple[str, int], bool]:
        REQUEST.set(tag)
        decimal.getcontext().prec = precision
        me = threading.get_ident()

        def traced() -> tuple[Any, int]:
            return inner(), threading.get_ident()

        result, ran_on = executor.submit(traced).result(timeout=30)
        return result, probe(), ran_on == me

    return in_own_context(caller)


def changer() -> tuple[str, int]:
    """A call that changes the context it runs in, as a request handler would."""
    seen = probe()
    REQUEST.set("changed by the call")
    decimal.getcontext().prec = 5
    return seen


def test_a_helped_call_does_not_change_its_callers_context(make_executor: Make) -> None:
    executor = make_executor(max_workers=1)
    seen, after, helped = executor.submit(request_scoped_caller(executor, changer, "caller", 50)).result(30)
    assert helped
    assert after == ("caller", 50)  # the caller's context comes out of the wait as it went in
    assert seen[0] == "unset"  # and the helped call did not see the caller's variable


def leaks_in_200_calls(executor: cf.Executor, inner_executor: cf.Executor) -> tuple[int, int]:
    """The experiment: 200 request-scoped callers, each waiting on a call that changes its context;
    how many callers found their context changed, and how many of the calls ran on their thread."""
    leaked = inline = 0
    for i in range(200):
        tag = f"request-{i}"
        _seen, after, helped = executor.submit(
            request_scoped_caller(inner_executor, changer, tag, 30 + i % 20)).result(timeout=30)
        leaked += after != (tag, 30 + i % 20)
        inline += helped
    return leaked, inline


def test_200_helped_calls_leak_nothing_like_thread_pool_executor(make_executor: Make) -> None:
    executor = make_executor(max_workers=1)
    assert leaks_in_200_calls(executor, executor) == (0, 200)  # every call helped, none leaked
    with cf.ThreadPoolExecutor(max_workers=2) as tpe:
        assert leaks_in_200_calls(tpe, tpe) == (0, 0)  # ran on the other thread


def test_a_helped_call_sees_what_a_call_on_a_worker_sees(reset_system: Callable[..., Any],
                                                         make_executor: Make) -> None:
    reset_system()  # worker threads that no earlier call changed the context of
    executor = make_executor(max_workers=1)
    on_worker = executor.submit(probe).result(timeout=30)
    helped, after, inline = executor.submit(request_scoped_caller(executor, probe, "caller", 50)).result(30)
    assert inline
    assert helped == on_worker == ("unset", decimal.DefaultContext.prec)
    assert after == ("caller", 50)


def test_a_helped_call_sees_what_the_initializer_set_on_its_thread(reset_system: Callable[..., Any],
                                                                  make_executor: Make) -> None:
    """A worker's calls see what the executor's initializer set on its thread (as with
    ThreadPoolExecutor); so does a call it helps, and what that call changes stays inside it."""
    reset_system()

    def initializer() -> None:
        REQUEST.set("initialized")
        decimal.getcontext().prec = 40

    executor = make_executor(max_workers=1, initializer=initializer)
    on_worker = executor.submit(probe).result(timeout=30)
    assert on_worker == ("initialized", 40)

    def caller() -> tuple[tuple[str, int], tuple[str, int], bool, tuple[str, int]]:
        seen, after, inline = request_scoped_caller(executor, changer, "caller", 50)()
        again, _after, _inline = request_scoped_caller(executor, probe, "caller", 50)()
        return seen, after, inline, again

    seen, after, inline, again = executor.submit(caller).result(timeout=30)
    assert inline
    assert seen == ("initialized", 40)
    assert after == ("caller", 50)
    assert again == ("initialized", 40)  # the first helped call's changes did not stay either
    assert executor.submit(probe).result(timeout=30) == on_worker
