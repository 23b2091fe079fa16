"""CMWQExecutor: the ``concurrent.futures`` contract, as a drop-in for ThreadPoolExecutor, plus what
concurrency management adds (nested waits that cannot deadlock, fork and interpreter-exit safety)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import Concurrency, napper, run_python, wait_for

from cmwq_exec import CMWQExecutor, CMWQFuture, blocking

pytestmark = pytest.mark.timeout(90)

Make = Callable[..., CMWQExecutor]
Release = Callable[[threading.Event], threading.Event]


# -- submit, result, exception ----------------------------------------------------------------------


def test_submit_result_and_arguments(executor: CMWQExecutor) -> None:
    future = executor.submit(lambda a, b, *, c: (a, b, c), 1, 2, c=3)
    assert isinstance(future, cf.Future) and isinstance(future, CMWQFuture)
    assert future.result(timeout=10) == (1, 2, 3)
    assert future.done() and not future.cancelled() and not future.running()
    assert future.exception() is None


def test_submit_exception(executor: CMWQExecutor) -> None:
    def boom() -> None:
        raise KeyError("boom")

    future = executor.submit(boom)
    exc = future.exception(timeout=10)
    assert isinstance(exc, KeyError)
    with pytest.raises(KeyError, match="boom"):
        future.result()


def test_base_exceptions_are_delivered_too(executor: CMWQExecutor) -> None:
    def leave() -> None:
        raise SystemExit(3)

    future = executor.submit(leave)
    assert isinstance(future.exception(timeout=10), SystemExit)
    assert executor.submit(int, "7").result(timeout=10) == 7  # the worker survived


def test_result_timeout(executor: CMWQExecutor, release: Release) -> None:
    gate = release(threading.Event())
    future = executor.submit(gate.wait, 30)
    t0 = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    with pytest.raises(cf.TimeoutError):
        future.exception(timeout=0.01)
    assert future.running() and not future.done()
    gate.set()
    assert future.result(timeout=10) is True


def test_timeouts_raise_concurrent_futures_timeout_error(executor: CMWQExecutor, release: Release) -> None:
    """concurrent.futures.TimeoutError, which is not the builtin TimeoutError before 3.11."""
    gate = release(threading.Event())
    future = executor.submit(gate.wait, 30)
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.01)
    with pytest.raises(cf.TimeoutError):
        future.exception(timeout=0.01)
    with pytest.raises(cf.TimeoutError):
        list(executor.map(gate.wait, [30], timeout=0.01))


def test_done_callbacks(executor: CMWQExecutor, release: Release) -> None:
    gate = release(threading.Event())
    calls: list[Any] = []
    future = executor.submit(gate.wait, 30)
    future.add_done_callback(calls.append)
    future.add_done_callback(calls.append)
    assert calls == []
    gate.set()
    future.result(timeout=10)
    wait_for("both done callbacks", lambda: len(calls) >= 2)
    assert calls == [future, future]
    future.add_done_callback(calls.append)  # already done: called at once
    assert calls == [future, future, future]


def test_cancel_a_pending_future(make_executor: Make, release: Release) -> None:
    """A pending future cancels; a running one does not and runs to its end."""
    executor = make_executor(max_workers=1)
    gate = release(threading.Event())
    started = threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(30)

    first = executor.submit(hold)
    assert started.wait(10), "the first call never started"
    ran = []
    second = executor.submit(ran.append, 1)  # max_workers=1: it waits behind the first
    assert second.cancel() is True
    assert second.cancelled() and second.done()
    with pytest.raises(cf.CancelledError):
        second.result()
    assert first.running()
    assert first.cancel() is False
    assert not first.cancelled() and first.running()
    gate.set()
    assert first.result(timeout=10) is True
    executor.shutdown(wait=True)
    assert ran == []


@pytest.mark.parametrize("how", ["set_result", "set_exception"])
def test_set_result_on_a_running_future_wins_and_is_heard_once(executor: CMWQExecutor, release: Release,
                                                             caplog: pytest.LogCaptureFixture,
                                                             how: str) -> None:
    """Future.set_result/set_exception on a running call's future finish it (as with any Future);
    the call's own outcome is dropped with a warning, and waiters and done callbacks hear of the
    future once. (ThreadPoolExecutor's worker raises InvalidStateError there and its thread ends.)"""
    gate = release(threading.Event())
    started = threading.Event()

    def hold() -> str:
        started.set()
        gate.wait(30)
        return "the call's own"

    future = executor.submit(hold)
    assert started.wait(10), "the call never started"
    later = release(threading.Event())
    other = executor.submit(later.wait, 30)
    calls: list[Any] = []
    future.add_done_callback(calls.append)
    if how == "set_result":
        future.set_result("set by hand")
    else:
        future.set_exception(KeyError("set by hand"))
    assert calls == [future]
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.append(cf.wait([future, other], timeout=30)))
    with caplog.at_level("WARNING", logger="concurrent.futures"):
        # wait() counts the future done and waits for the other call; the held call ends, and
        # only once it is through does the other call end
        waiter.start()
        wait_for("wait() waiting on the other call", lambda: bool(other._waiter_list))
        gate.set()
        wait_for("the warning", lambda: "the call's own outcome is dropped" in caplog.text)
        later.set()
        waiter.join(30)
    done, not_done = waited[0]
    assert not not_done, "wait() heard of the finished future again and returned early"
    assert done == {future, other}
    assert calls == [future]
    if how == "set_result":
        assert future.result() == "set by hand"
    else:
        with pytest.raises(KeyError, match="set by hand"):
            future.result()
    assert executor.submit(lambda: "still works").result(timeout=10) == "still works"


def test_two_claimers_of_a_cancelled_future_tell_its_waiters_once() -> None:
    """A cancelled future can be claimed twice: by the worker that takes it off the worklist and by
    a worker that waits for it and helps. The first tells the waiters it was cancelled, in the
    hold where it read CANCELLED; the second gets False. (Told outside that hold, the second found
    it told already: set_running_or_notify_cancel raised RuntimeError on a worker's thread.) The
    first claimer is held just after it read the state, until the second is through or 0.5 s."""
    reached = threading.Event()
    second_through = threading.Event()

    class Held(CMWQFuture):
        __slots__ = ()

        def set_running_or_notify_cancel(self) -> bool:
            if threading.current_thread().name == "first":
                reached.set()
                second_through.wait(0.5)
            return super().set_running_or_notify_cancel()

    future = Held(int, (), {})
    assert future.cancel()
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.append(cf.wait([future], timeout=30)))
    waiter.start()
    wait_for("the waiter installed", lambda: bool(future._waiter_list))
    outcomes: dict[str, Any] = {}

    def claim() -> None:
        try:
            outcomes[threading.current_thread().name] = future._claim()
        except BaseException as exc:
            outcomes[threading.current_thread().name] = exc
        if threading.current_thread().name == "second":
            second_through.set()

    first = threading.Thread(target=claim, name="first")
    first.start()
    assert reached.wait(10)
    second = threading.Thread(target=claim, name="second")
    second.start()
    for thread in (first, second, waiter):
        thread.join(30)
    assert outcomes == {"first": False, "second": False}
    assert waited[0].done == {future} and not waited[0].not_done
    assert future.cancelled()


# -- map ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_keeps_order(executor: CMWQExecutor, chunksize: int) -> None:
    def slow_square(x: int) -> int:
        if x % 5 == 0:
            with blocking():
                time.sleep(0.002)
        return x * x

    assert list(executor.map(slow_square, range(50), chunksize=chunksize)) == [x * x for x in range(50)]
    assert list(executor.map(pow, range(10), range(3), chunksize=chunksize)) == [1, 1, 4]
    assert list(executor.map(abs, [], chunksize=chunksize)) == []


def test_map_raises_the_first_error_in_order(executor: CMWQExecutor) -> None:
    results = executor.map(lambda x: 1 // x, [1, 1, 0, 1], chunksize=2)
    assert next(results) == 1 and next(results) == 1
    with pytest.raises(ZeroDivisionError):
        next(results)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_timeout(executor: CMWQExecutor, release: Release, chunksize: int) -> None:
    gate = release(threading.Event())

    def wait(x: int) -> int:
        with blocking():
            gate.wait(30)
        return x

    t0 = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        list(executor.map(wait, range(4), timeout=0.1, chunksize=chunksize))
    assert 0.1 <= time.monotonic() - t0 < 10
    gate.set()


@pytest.mark.parametrize("chunksize", [0, -2, 1.5, True, None, "3"])
def test_map_takes_every_chunksize_thread_pool_executor_takes(executor: CMWQExecutor, chunksize: Any) -> None:
    # ThreadPoolExecutor.map accepts any chunksize and ignores it: so does this one, one call a work
    with cf.ThreadPoolExecutor(2) as tpe:
        assert list(tpe.map(abs, [-1, -2, 3], chunksize=chunksize)) == [1, 2, 3]
    assert list(executor.map(abs, [-1, -2, 3], chunksize=chunksize)) == [1, 2, 3]


# -- shutdown -----------------------------------------------------------------------------------------


def test_shutdown_wait_waits_for_everything(make_executor: Make) -> None:
    executor = make_executor(max_workers=2)
    done = []

    def nap(i: int) -> None:
        with blocking():
            time.sleep(0.01)
        done.append(i)

    futures = [executor.submit(nap, i) for i in range(10)]
    executor.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert sorted(done) == list(range(10))


def _race_submitters_with_shutdown(executor: CMWQExecutor) -> tuple[list[int], set[int], list[Exception]]:
    """Three threads submit until refused while shutdown(wait=True) runs: the calls accepted, the
    calls that had run when shutdown returned, and the refusals."""
    ran: set[int] = set()
    accepted: list[int] = []
    refused: list[Exception] = []
    go = threading.Barrier(4)

    def submitter(base: int) -> None:
        go.wait()
        for i in range(base, base + 100_000):
            try:
                executor.submit(ran.add, i)
            except RuntimeError as exc:
                refused.append(exc)
                return
            accepted.append(i)

    threads = [threading.Thread(target=submitter, args=(n * 1_000_000,)) for n in range(3)]
    for t in threads:
        t.start()
    go.wait()
    wait_for("the submitters to get going", lambda: len(accepted) >= 50)
    executor.shutdown(wait=True)
    ran_by_then = set(ran)
    for t in threads:
        t.join(timeout=30)
    return accepted, ran_by_then, refused


@pytest.mark.parametrize("max_workers", [None, 2])
def test_a_submit_racing_shutdown_either_is_waited_for_or_raises(make_executor: Make,
                                                                 max_workers: int | None) -> None:
    """submit takes no lock: shutdown closes the workqueue to calls before it waits. Every call a
    submit accepted has run when shutdown(wait=True) returns; the others raised."""
    for _ in range(20):
        executor = make_executor(max_workers=max_workers)
        accepted, ran_by_then, refused = _race_submitters_with_shutdown(executor)
        assert len(refused) == 3 and all("after shutdown" in str(e) for e in refused)
        assert accepted and set(accepted) <= ran_by_then, len(set(accepted) - ran_by_then)


def test_submit_after_shutdown_raises(make_executor: Make) -> None:
    executor = make_executor()
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(int)
    executor.shutdown()  # idempotent
    executor.shutdown(wait=False, cancel_futures=True)


def test_shutdown_cancel_futures_cancels_pending_and_loses_nothing(make_executor: Make,
                                                                   release: Release) -> None:
    executor = make_executor(max_workers=1)
    gate = release(threading.Event())
    first = executor.submit(gate.wait, 30)
    wait_for("the first call to run", first.running)
    ran = []
    rest = [executor.submit(ran.append, i) for i in range(20)]
    executor.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in rest), "pending futures not visibly cancelled"
    gate.set()
    done, not_done = cf.wait([first, *rest], timeout=10)
    assert not not_done, "futures lost after shutdown(cancel_futures=True)"
    assert first.result() is True
    assert ran == []


def test_shutdown_cancel_futures_unlimited_nothing_lost(executor: CMWQExecutor) -> None:
    ran = collections.Counter()

    def work(i: int) -> int:
        ran[i] += 1
        if i % 3 == 0:
            with blocking():
                time.sleep(0.001)
        return i

    futures = [executor.submit(work, i) for i in range(2000)]
    executor.shutdown(wait=True, cancel_futures=True)
    done, not_done = cf.wait(futures, timeout=10)
    assert not not_done
    for i, future in enumerate(futures):
        if future.cancelled():
            assert ran[i] == 0
        else:
            assert future.result() == i and ran[i] == 1


def test_shutdown_wait_from_own_task_is_refused(make_executor: Make) -> None:
    def stop(executor: CMWQExecutor, wait: bool) -> str:
        try:
            executor.shutdown(wait=wait)
        except RuntimeError as exc:
            return str(exc)
        return "ok"

    first = make_executor()
    assert "wait for itself" in first.submit(stop, first, True).result(timeout=10)
    second = make_executor()
    assert second.submit(stop, second, False).result(timeout=10) == "ok"
    for executor in (first, second):
        with pytest.raises(RuntimeError, match="after shutdown"):
            executor.submit(int)


def test_context_manager(make_executor: Make) -> None:
    done = []

    def nap(i: int) -> None:
        with blocking():
            time.sleep(0.005)
        done.append(i)

    with make_executor() as executor:
        futures = [executor.submit(nap, i) for i in range(20)]
    assert all(f.done() for f in futures) and sorted(done) == list(range(20))
    with pytest.raises(RuntimeError):
        executor.submit(int)


# -- initializer, thread names ------------------------------------------------------------------------


def test_initializer_runs_once_per_worker_thread(make_executor: Make) -> None:
    inits: list[tuple[int, tuple[Any, ...]]] = []
    executor = make_executor(initializer=lambda *a: inits.append((threading.get_ident(), a)),
                             initargs=(1, "two"))

    def task(_: int) -> int:
        with blocking():
            time.sleep(0.002)  # spread over several workers
        return threading.get_ident()

    threads = {f.result(timeout=10) for f in [executor.submit(task, i) for i in range(100)]}
    init_threads = collections.Counter(t for t, _ in inits)
    assert all(args == (1, "two") for _, args in inits)
    assert threads <= set(init_threads), "a task ran on a thread that did not run the initializer"
    assert all(n == 1 for n in init_threads.values()), "the initializer ran twice on one thread"


def test_failing_initializer_breaks_the_executor(make_executor: Make) -> None:
    def bad_init() -> None:
        raise OSError("no init for you")

    executor = make_executor(max_workers=1, initializer=bad_init)
    futures = [executor.submit(int, i) for i in range(5)]
    done, not_done = cf.wait(futures, timeout=10)
    assert not not_done
    for future in futures:
        exc = future.exception()
        assert isinstance(exc, cf.BrokenExecutor)
        assert isinstance(exc, cf.thread.BrokenThreadPool)
    assert isinstance(futures[0].exception().__cause__, OSError)
    with pytest.raises(cf.BrokenExecutor):
        executor.submit(int)


def test_failing_initializer_is_logged_critical_as_by_thread_pool_executor(
        make_executor: Make, caplog: pytest.LogCaptureFixture) -> None:
    def bad_init() -> None:
        raise OSError("no init for you")

    executor = make_executor(max_workers=1, initializer=bad_init)
    with caplog.at_level(logging.CRITICAL, logger="concurrent.futures"):
        assert isinstance(executor.submit(int).exception(timeout=10), cf.BrokenExecutor)
    records = [r for r in caplog.records if r.name == "concurrent.futures"]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.CRITICAL, "Exception in initializer:")]
    assert records[0].exc_info is not None and isinstance(records[0].exc_info[1], OSError)


def test_thread_name_prefix_visible_inside_tasks(make_executor: Make) -> None:
    executor = make_executor(thread_name_prefix="myprefix")
    names = [f.result(timeout=10) for f in
             [executor.submit(lambda: threading.current_thread().name) for _ in range(20)]]
    assert all(name.startswith("myprefix") for name in names), names
    # the worker's own name comes back afterwards (workers are shared with other executors)
    plain = make_executor()
    assert not any(plain.submit(lambda: threading.current_thread().name).result(timeout=10)
                   .startswith("myprefix") for _ in range(20))


def test_helped_tasks_still_get_initializer_and_thread_name(make_executor: Make) -> None:
    """A call run inline by a waiting worker of another executor (helping) is still a call of its
    own executor: initializer first, thread name prefix visible."""
    inits = set()
    prefixed = make_executor(thread_name_prefix="helped",
                             initializer=lambda: inits.add(threading.get_ident()))
    other = make_executor()

    def inner() -> tuple[str, bool]:
        return threading.current_thread().name, threading.get_ident() in inits

    def outer() -> tuple[str, bool]:
        return prefixed.submit(inner).result(timeout=10)  # type: ignore[no-any-return]

    for _ in range(5):
        name, initialized = other.submit(outer).result(timeout=10)
        assert name.startswith("helped") and initialized


# -- max_workers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
def test_max_workers_limits_concurrency(make_executor: Make, n: int) -> None:
    executor = make_executor(max_workers=n)
    inside = Concurrency()
    task = napper(inside, 0.003, threading.Barrier(n, timeout=10))
    for future in [executor.submit(task) for _ in range(4 * n)]:
        future.result(timeout=30)
    assert inside.max == n


def test_max_workers_holds_when_waited_on_from_other_workers(make_executor: Make) -> None:
    """Waiting workers of another executor must not run a limited executor's calls inline past
    its max_workers."""
    limited = make_executor(max_workers=1)
    other = make_executor()
    inside = Concurrency()
    task = napper(inside, 0.02)

    def via_other() -> None:
        limited.submit(task).result(timeout=30)

    for future in [other.submit(via_other) for _ in range(6)]:
        future.result(timeout=30)
    assert inside.max == 1


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"max_workers": 0}, ValueError),
    ({"max_workers": -1}, ValueError),
    ({"max_workers": "2"}, TypeError),
    ({"max_workers": 1.5}, TypeError),
    ({"initializer": 3}, TypeError),
    ({"thread_name_prefix": 3}, TypeError),
])
def test_constructor_arguments_checked(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        CMWQExecutor(**kwargs)


# -- asyncio, wait, as_completed ------------------------------------------------------------------------


def test_asyncio_run_in_executor(executor: CMWQExecutor) -> None:
    def slow(x: int) -> int:
        with blocking():
            time.sleep(0.01)
        return x + 1

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(executor, slow, i) for i in range(20))))

    assert asyncio.run(main()) == list(range(1, 21))


def test_asyncio_cancelling_the_awaiting_task_cancels_a_pending_call(make_executor: Make,
                                                                       release: Release) -> None:
    executor = make_executor(max_workers=1)
    gate = release(threading.Event())
    ran = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        blocker = loop.run_in_executor(executor, gate.wait, 30)
        pending = loop.run_in_executor(executor, ran.append, 1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pending, 0.05)
        gate.set()
        assert await blocker is True

    asyncio.run(main())
    executor.shutdown(wait=True)
    assert ran == []


def test_wait_and_as_completed(executor: CMWQExecutor, release: Release) -> None:
    gate = release(threading.Event())
    quick = executor.submit(lambda: "quick")
    slow = executor.submit(gate.wait, 30)
    done, not_done = cf.wait([quick, slow], timeout=10, return_when=cf.FIRST_COMPLETED)
    assert quick in done and slow in not_done
    done, not_done = cf.wait([quick, slow], timeout=0.05)
    assert not_done == {slow}
    with pytest.raises(cf.TimeoutError):
        list(cf.as_completed([quick, slow], timeout=0.05))
    gate.set()
    done, not_done = cf.wait([quick, slow], timeout=10)
    assert not not_done
    assert set(cf.as_completed([quick, slow], timeout=10)) == {quick, slow}


def test_wait_first_exception(executor: CMWQExecutor, release: Release) -> None:
    gate = release(threading.Event())

    def boom() -> None:
        raise ValueError

    slow = executor.submit(gate.wait, 30)
    bad = executor.submit(boom)
    done, not_done = cf.wait([slow, bad], timeout=10, return_when=cf.FIRST_EXCEPTION)
    assert done == {bad} and not_done == {slow}
    gate.set()


def test_wait_and_as_completed_mixed_with_other_futures(executor: CMWQExecutor) -> None:
    with cf.ThreadPoolExecutor(2) as tpe:
        plain: cf.Future[str] = cf.Future()
        threading.Timer(0.05, plain.set_result, ("plain",)).start()
        ours = [executor.submit(lambda i=i: ("cmwq", i)) for i in range(20)]
        theirs = [tpe.submit(lambda i=i: ("tpe", i)) for i in range(20)]
        everything = [plain, *ours, *theirs]
        results = {f.result() for f in cf.as_completed(everything, timeout=10)}
        assert results == {"plain"} | {("cmwq", i) for i in range(20)} | {("tpe", i) for i in range(20)}
        done, not_done = cf.wait(everything, timeout=10)
        assert not not_done


class _GatedCondition(threading.Condition):
    """A future's Condition whose ``with`` holds one thread (the worker finishing the call) at a
    gate: ``reached`` is set when it gets there, and it goes on once ``gate`` is set."""

    def __init__(self, held: int) -> None:
        super().__init__()
        self.held = held
        self.reached = threading.Event()
        self.gate = threading.Event()

    def __enter__(self) -> bool:
        if threading.get_ident() == self.held and not self.gate.is_set():
            self.reached.set()
            assert self.gate.wait(30), "the gate never opened"
        return super().__enter__()


class _OpensOnAppend(list):  # type: ignore[type-arg]
    """A future's waiter list that opens a gate once a waiter is installed."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def append(self, waiter: Any) -> None:
        super().append(waiter)
        self.gate.set()

    def told(self, future: Any) -> bool:
        """Whether the installed waiter has heard that ``future`` finished (or took what it heard
        and left, as as_completed does)."""
        return self.gate.is_set() and all(future in waiter.finished_futures for waiter in self)


@pytest.mark.parametrize("how", ["wait", "as_completed"])
def test_a_waiter_installed_while_a_call_finishes_hears_of_it_once(executor: CMWQExecutor,
                                                                    release: Release, how: str) -> None:
    """wait() and as_completed() read a future's state and install their waiter under its Condition;
    the run that finishes the future changes the state under that Condition too. Had it written
    FINISHED first and notified after, a waiter that counted the future done already would hear of
    it again: wait(ALL_COMPLETED) returned while another call still ran, as_completed saw it twice.
    The worker is held just before it takes the Condition, the waiter installed meanwhile."""
    later = release(threading.Event())
    go = release(threading.Event())
    ident: list[int] = []

    def call() -> str:
        ident.append(threading.get_ident())
        assert go.wait(30)
        return "first"

    first = executor.submit(call)
    second = executor.submit(later.wait, 30)
    wait_for("the first call running", lambda: bool(ident))
    cond = _GatedCondition(ident[0])
    first._cond = cond  # nobody waits on it yet
    waiters = first._waiter_list = _OpensOnAppend(cond.gate)  # type: ignore[assignment]
    go.set()
    assert cond.reached.wait(30)

    def end_the_second_once_the_first_is_told() -> None:
        deadline = time.monotonic() + 30
        while not waiters.told(first) and time.monotonic() < deadline:
            time.sleep(0.005)
        later.set()

    threading.Thread(target=end_the_second_once_the_first_is_told).start()
    if how == "wait":
        done, not_done = cf.wait([first, second], timeout=30)
        assert not not_done, f"wait() returned with {not_done} not done"
        assert done == {first, second}
    else:
        seen = list(cf.as_completed([first, second], timeout=30))
        assert sorted(map(id, seen)) == sorted(map(id, [first, second]))
    assert first.result() == "first" and second.result() is True


DEADLOCK_SCRIPT = """
    import concurrent.futures as cf, os, random, sys, threading, time
    from cmwq_exec import CMWQExecutor
    sys.setswitchinterval(1e-6)  # switch threads between the locks wait() takes
    ex = CMWQExecutor()
    ours = [ex.submit(int, i) for i in range(300)]
    plain = []
    for i in range(50):
        f = cf.Future()
        f.set_result(i)
        plain.append(f)
    cf.wait(ours)
    everything = ours + plain
    stop = time.monotonic() + 1.5
    rounds = []
    def loop(seed):
        rng = random.Random(seed)
        n = 0
        while time.monotonic() < stop:
            some = rng.sample(everything, 6)
            if n % 2:
                cf.wait(some)
            else:
                for _ in cf.as_completed(some):
                    pass
            n += 1
        rounds.append(n)
    threads = [threading.Thread(target=loop, args=(s,), daemon=True) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    print("deadlock" if any(t.is_alive() for t in threads) else "ok", len(rounds), flush=True)
    os._exit(0)
"""


def test_concurrent_waits_from_several_threads_do_not_deadlock() -> None:
    """wait()/as_completed lock every future's condition in id order; that is only deadlock-free if
    no two futures share a lock (an earlier striped-Condition design deadlocked here at once)."""
    proc = run_python(DEADLOCK_SCRIPT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "4"]


# -- nested waits: helping and handing over -------------------------------------------------------


@pytest.mark.parametrize("max_workers", [None, 4, 1])
def test_nested_submit_and_wait_fib(make_executor: Make, max_workers: int | None) -> None:
    executor = make_executor(max_workers=max_workers)

    def fib(n: int) -> int:
        if n < 2:
            return n
        a = executor.submit(fib, n - 1)
        b = executor.submit(fib, n - 2)
        return a.result() + b.result()  # type: ignore[no-any-return]

    assert executor.submit(fib, 14).result(timeout=60) == 377


@pytest.mark.parametrize("how", ["wait", "as_completed", "result"])
def test_wait_inside_a_worker_on_tasks_needing_another_worker(no_watchdog: Any, make_executor: Make,
                                                              how: str) -> None:
    """A task waits for two tasks that need each other (the first waits for an Event the second sets):
    no helping can run them inline; the pool must hand over to other workers."""
    executor = make_executor()

    def outer() -> list[str]:
        event = threading.Event()

        def needs_partner() -> str:
            with blocking():
                assert event.wait(10), "partner never ran"
            return "waited"

        first = executor.submit(needs_partner)
        second = executor.submit(lambda: event.set() or "set")
        if how == "wait":
            done, not_done = cf.wait([first, second], timeout=20)
            assert not not_done
            return sorted(f.result() for f in done)
        if how == "as_completed":
            return sorted(f.result() for f in cf.as_completed([first, second], timeout=20))
        return sorted([first.result(timeout=20), second.result(timeout=20)])

    for future in [executor.submit(outer) for _ in range(4)]:
        assert future.result(timeout=30) == ["set", "waited"]


def test_waiting_from_a_worker_hands_over(no_watchdog: Any, make_executor: Make, release: Release) -> None:
    """result() from a worker on a running future counts as sleeping: the pool runs others meanwhile
    (here the very call that lets the awaited future finish, queued behind the waiter on its pool)."""
    executor = make_executor()
    gate = release(threading.Event())

    def slow() -> bool:
        with blocking():
            return gate.wait(10)

    running = executor.submit(slow)
    wait_for("the slow call to run", running.running)

    def outer() -> bool:
        opener = executor.submit(gate.set)  # on this worker's pool, behind this running call
        result = running.result(timeout=20)  # not pending: no helping, only handing over
        opener.result(timeout=20)
        return result  # type: ignore[no-any-return]

    assert executor.submit(outer).result(timeout=30) is True


# -- processes: fork, interpreter exit ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_child_can_use_new_and_existing_executors(make_executor: Make) -> None:
    existing = make_executor()
    limited = make_executor(max_workers=2)
    assert existing.submit(pow, 2, 5).result(timeout=10) == 32
    assert limited.submit(pow, 3, 2).result(timeout=10) == 9
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            fresh = CMWQExecutor()
            ok = fresh.submit(pow, 2, 10).result(timeout=10) == 1024
            ok &= existing.submit(pow, 2, 6).result(timeout=10) == 64
            ok &= sum(limited.map(abs, range(-50, 0), timeout=10)) == 1275

            def nested(n: int) -> int:
                return n if n < 2 else fresh.submit(nested, n - 1).result() + 1

            ok &= fresh.submit(nested, 20).result(timeout=10) == 20
            fresh.shutdown()
            code = 0 if ok else 2
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("forked child hung using the executors")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    # the parent's executors are untouched
    assert existing.submit(pow, 2, 7).result(timeout=10) == 128
    assert list(limited.map(abs, [-1, -2], timeout=10)) == [1, 2]


FORK_FROM_A_WORKER_SCRIPT = r"""
import os, time, warnings
warnings.simplefilter("ignore")
from cmwq_exec import CMWQExecutor, Work, WorkQueue

ex = CMWQExecutor()

def eventually(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True

def task():
    pid = os.fork()
    if pid == 0:  # the child's only thread is the one that was a worker in the parent
        code = 1
        try:
            wq = WorkQueue("child")
            out = []
            wq.queue_work(Work(out.append, "work"))
            future = ex.submit(out.append, "call")
            ok = eventually(lambda: len(out) == 2) and future.done()
            print("child", sorted(out), flush=True)
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)

print("child exit", ex.submit(task).result(timeout=30), flush=True)
"""


def test_fork_from_inside_a_worker() -> None:
    """The child's only thread was a worker in the parent; in the child it is not one, so its works
    go to the child's fresh pools (not onto a dead pool's worklist)."""
    proc = run_python(FORK_FROM_A_WORKER_SCRIPT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "child exit 0" in proc.stdout, proc.stdout


@pytest.mark.parametrize("max_workers", [None, 2])
def test_interpreter_exit_runs_pending_tasks(max_workers: int | None) -> None:
    proc = run_python(f"""
        import sys, time
        from cmwq_exec import CMWQExecutor, blocking
        ex = CMWQExecutor(max_workers={max_workers})
        def slow(i):
            with blocking():
                time.sleep(0.05)
            sys.stdout.write(f"done {{i}}\\n")  # one write: lines from threads do not interleave
            sys.stdout.flush()
        for i in range(12):
            ex.submit(slow, i)
        print("exiting", flush=True)
    """, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("exiting\n")
    assert sorted(map(int, re.findall(r"^done (\d+)$", proc.stdout, re.M))) == list(range(12))
    assert "Traceback" not in proc.stderr


def test_interpreter_exit_is_quick() -> None:
    t0 = time.monotonic()
    proc = run_python("""
        from cmwq_exec import CMWQExecutor
        ex = CMWQExecutor()
        print(sum(ex.map(abs, range(-100, 0))))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5050"
    assert time.monotonic() - t0 < 15


def test_submit_at_exit_after_shutdown_raises() -> None:
    proc = run_python("""
        import atexit
        from cmwq_exec import CMWQExecutor
        ex = CMWQExecutor()
        def late():
            try:
                ex.submit(print, "should not run")
            except RuntimeError as exc:
                print("refused:", exc, flush=True)
        atexit.register(late)
        ex.submit(int).result()
    """)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "interpreter shutdown" in proc.stdout
    assert "should not run" not in proc.stdout


def test_asyncio_default_executor() -> None:
    """asyncio's set_default_executor takes only ThreadPoolExecutor instances (TypeError since 3.11)."""
    import asyncio

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(executor)
        return await loop.run_in_executor(None, sum, [1, 2, 3])

    executor = CMWQExecutor()
    try:
        assert asyncio.run(main()) == 6
    finally:
        executor.shutdown()


# -- a future that finished before anyone asked for its Condition ------------------------------------


def test_a_finished_future_gets_no_condition_and_keeps_the_future_contract(executor: CMWQExecutor) -> None:
    """Nothing of a FINISHED future changes any more, so whatever takes its Condition gets one
    that excludes nothing, and the future answers as before."""
    ok = executor.submit(lambda: 7)
    bad = executor.submit(lambda: 1 / 0)
    wait_for("both calls finished", lambda: ok._state == bad._state == "FINISHED")  # done() would make one
    assert ok._cond is None and bad._cond is None  # nobody waited while they ran
    done, not_done = cf.wait([ok, bad], timeout=10)
    assert done == {ok, bad} and not not_done
    assert set(cf.as_completed([ok, bad], timeout=10)) == {ok, bad}
    heard: list[cf.Future[Any]] = []
    ok.add_done_callback(heard.append)  # runs at once, on this thread
    assert heard == [ok]
    assert not ok.cancel() and not ok.cancelled() and ok.done() and not ok.running()
    with pytest.raises(cf.InvalidStateError):
        ok.set_result(8)
    with pytest.raises(cf.InvalidStateError):
        bad.set_exception(ValueError())
    assert ok.result(timeout=0) == 7 and ok.exception(timeout=0) is None
    with pytest.raises(ZeroDivisionError):
        bad.result(timeout=0)
    assert isinstance(bad.exception(timeout=0), ZeroDivisionError)
    assert "finished returned int" in repr(ok) and "raised ZeroDivisionError" in repr(bad)
    assert asyncio.run(_await_wrapped(ok)) == 7
    assert ok._cond is None and bad._cond is None  # none of that made a Condition


async def _await_wrapped(future: cf.Future[Any]) -> Any:
    return await asyncio.wrap_future(future)


def test_waiters_sharing_finished_and_running_futures_all_return(make_executor: Make,
                                                                  release: Release) -> None:
    """Many threads wait at once on overlapping sets of finished and running futures, in
    different orders: none fails on another's waiter (the finished futures' waiter lists are
    shared without a Condition) and none deadlocks (``wait`` takes the Conditions of all its
    futures, the finished ones' among them)."""
    executor = make_executor()
    finished = [executor.submit(int, i) for i in range(40)]
    wait_for("40 calls finished", lambda: all(f._state == "FINISHED" for f in finished))
    assert all(f._cond is None for f in finished)
    gate = release(threading.Event())

    def held() -> None:
        with blocking():
            assert gate.wait(30), "gate never opened"

    running = [executor.submit(held) for _ in range(4)]
    errors: list[BaseException] = []
    returned = []

    def waiter(i: int) -> None:
        fs = finished[i % 7::3] + [running[i % 4], running[(i + 1) % 4]]
        fs = fs[::-1] if i % 2 else fs
        try:
            if i % 3 == 0:
                got = list(cf.as_completed(fs, timeout=30))
                assert len(got) == len(set(fs))
            else:
                done, not_done = cf.wait(fs, timeout=30)
                assert not not_done and done == set(fs)
            returned.append(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    wait_for("every waiter waiting on its running calls",
             lambda: all(f._waiter_list and len(f._waiter_list) >= 2 for f in running))
    gate.set()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert sorted(returned) == list(range(24))
    assert all(not f._waiter_list for f in finished + running)  # every waiter took itself off
