"""blocking(): the sleep notification that takes a worker out of nr_running, and nothing outside one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import run_as_work, wait_for

from cmwq_exec import WQ, Work, WorkQueue, blocking
from cmwq_exec.core.worker import SLEEPING, current_worker

pytestmark = pytest.mark.timeout(60)


def nr_running() -> int:
    worker = current_worker()
    assert worker is not None
    with worker.pool.lock:
        return worker.pool.nr_running  # type: ignore[no-any-return]


def run_in_worker(fn: Callable[[], Any], flags: WQ = WQ.UNBOUND) -> Any:
    """Run ``fn`` as a work on a fresh workqueue and return what it returned (or raise what it raised)."""
    return run_as_work(WorkQueue("blocking-test", flags), fn)


# -- outside a worker -------------------------------------------------------------------------------


def test_noop_outside_a_worker() -> None:
    assert current_worker() is None
    b = blocking()
    with b as entered:
        assert entered is b
        with blocking():
            pass
    with pytest.raises(KeyError):  # exceptions pass through
        with blocking():
            raise KeyError("x")


def test_decorator_outside_a_worker() -> None:
    @blocking()
    def add(a: int, b: int) -> int:
        return a + b

    assert add(2, 3) == 5


@pytest.mark.usefixtures("no_watchdog")  # alone on its pool: see "inside a worker" below
def test_noop_in_a_plain_thread_started_by_a_work() -> None:
    """The state lives on the worker: a thread a work starts is not a worker."""
    def body() -> tuple[int, int, int]:
        before = nr_running()
        seen = []

        def side() -> None:
            with blocking():
                seen.append(nr_running_of(pool))

        worker = current_worker()
        assert worker is not None
        pool = worker.pool
        thread = threading.Thread(target=side, daemon=True)
        thread.start()
        thread.join(10)
        return before, seen[0], nr_running()

    def nr_running_of(pool: Any) -> int:
        with pool.lock:
            return pool.nr_running  # type: ignore[no-any-return]

    assert run_in_worker(body) == (1, 1, 1)


# -- inside a worker --------------------------------------------------------------------------------
#
# The tests that read nr_running run alone on fresh pools without a watchdog (no_watchdog): on the
# shared pools other tests' works run too, and the watchdog takes workers it finds blocked or
# hogging the CPU out of nr_running (a busy machine makes both likely), so the count would move under
# the test. Alone, the work's worker is the pool's only runner: the counts are exact.


@pytest.mark.usefixtures("no_watchdog")
@pytest.mark.parametrize("flags", [WQ.UNBOUND, WQ(0)], ids=["unbound", "per-cpu"])
def test_nr_running_drops_inside_and_comes_back(flags: WQ) -> None:
    def body() -> list[Any]:
        worker = current_worker()
        assert worker is not None
        seen: list[Any] = [nr_running(), bool(worker.flags & SLEEPING)]
        with blocking():
            seen += [nr_running(), bool(worker.flags & SLEEPING), worker.sleep_depth]
        seen += [nr_running(), bool(worker.flags & SLEEPING), worker.sleep_depth]
        return seen

    before, sleeping0, inside, sleeping1, depth1, after, sleeping2, depth2 = run_in_worker(body, flags)
    assert (before, inside, after) == (1, 0, 1)
    assert (sleeping0, sleeping1, sleeping2) == (False, True, False)
    assert (depth1, depth2) == (1, 0)


@pytest.mark.usefixtures("no_watchdog")
def test_nesting_counts_once() -> None:
    def body() -> list[int]:
        worker = current_worker()
        assert worker is not None
        seen = [nr_running()]
        shared = blocking()
        with shared:
            seen.append(nr_running())
            with shared:  # one instance may be entered again (state lives on the worker)
                with blocking():
                    seen.append(nr_running())
                    seen.append(worker.sleep_depth)
                seen.append(nr_running())
            seen.append(nr_running())
        seen.append(nr_running())
        seen.append(worker.sleep_depth)
        return seen

    b, in1, in3, depth, in2, in1b, after, depth_after = run_in_worker(body)
    assert (b, in1, in3, in2, in1b, after) == (1, 0, 0, 0, 0, 1)
    assert depth == 3 and depth_after == 0


@pytest.mark.usefixtures("no_watchdog")
def test_decorator_inside_a_worker() -> None:
    @blocking()
    def sleepy() -> int:
        return nr_running()

    def body() -> tuple[int, int, int]:
        return nr_running(), sleepy(), nr_running()

    assert run_in_worker(body) == (1, 0, 1)


@pytest.mark.usefixtures("no_watchdog")
def test_exception_inside_restores_the_count() -> None:
    def body() -> tuple[int, int, bool]:
        before = nr_running()
        worker = current_worker()
        assert worker is not None
        try:
            with blocking():
                raise ValueError("inside")
        except ValueError:
            pass
        return before, nr_running(), bool(worker.flags & SLEEPING)

    assert run_in_worker(body) == (1, 1, False)


def test_blocking_wakes_a_worker_only_when_work_is_pending(no_watchdog: Any) -> None:
    """Entering blocking() with nothing pending is free: no wakeup is counted."""
    def body() -> tuple[int, int]:
        worker = current_worker()
        assert worker is not None
        pool = worker.pool
        with pool.lock:
            before = pool.cm_wakeups
        with blocking():
            pass
        with pool.lock:
            return before, pool.cm_wakeups

    before, after = run_in_worker(body, WQ(0))
    assert after == before


def test_shared_instance_across_concurrent_works() -> None:
    """One blocking() object entered by several workers at once: each is accounted on its own."""
    shared = blocking()
    wq = WorkQueue("blocking-shared", WQ.UNBOUND)
    gate = threading.Event()
    inside = []
    pool_ref: list[Any] = []

    def body() -> None:
        worker = current_worker()
        assert worker is not None
        pool_ref.append(worker.pool)
        with shared:
            inside.append(worker.sleep_depth)
            assert gate.wait(30)

    try:
        for _ in range(4):
            wq.queue_work(Work(body))
        wait_for("len(inside) == 4", lambda: len(inside) == 4)
        pool = pool_ref[0]
        with pool.lock:
            pool.check_invariants()
            sleeping = [w for w in pool.workers if w.flags & SLEEPING]
        assert len(sleeping) == 4 and inside == [1, 1, 1, 1]
    finally:
        gate.set()
    wq.flush()
    with pool.lock:
        assert not any(w.flags & SLEEPING for w in pool.workers)
        pool.check_invariants()
