"""Shared fixtures of the core test suite.

Most tests reuse the process's shared pools (``cmwq_exec.get_system()``): starting pools costs
threads, and sharing them is what the library does in production. A test that needs special settings
(a short ``idle_timeout``, a fault-injected pool) asks for ``reset_system`` and gets fresh pools; the
defaults come back when it ends.

Nothing here is autouse but the lock check: with ``CMWQ_LOCKDEP=1`` every test fails that took a
lock against the order written in ``cmwq_exec/core/lockdep.py``, or called a function documented as
called with a lock held without holding it (in any thread).

A test marked ``hotplug`` holds an exclusive lock on a file shared by every test run on the
machine while it runs, so that two runs (``tox -p``, two checkouts) never take CPU 1 offline at
once. That does not keep the other tests of those runs away meanwhile (CPU 1 going offline reaches
them too): ``.ci/run`` runs the hotplug tests after everything else, one environment at a time.

With ``CMWQ_TEST_THREAD_START_DELAY=s`` every worker and rescuer thread the pools start
starts ``s`` seconds late, as on a busy machine: slower than the 10 ms mayday timeout, so rescuers
step in all the time (the tox environment ``slowstart``).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import wait_for

import cmwq_exec
from cmwq_exec import CMWQExecutor
from cmwq_exec.core import system as _system
from cmwq_exec.core import worker as _worker

START_DELAY_VARIABLE = "CMWQ_TEST_THREAD_START_DELAY"
HOTPLUG_LOCK = os.path.join(tempfile.gettempdir(), "cmwq-exec-tests-hotplug.lock")


def pytest_configure(config: pytest.Config) -> None:
    value = os.environ.get(START_DELAY_VARIABLE, "")
    if not value:
        return
    try:
        delay = float(value)
    except ValueError:
        delay = -1.0
    if not 0 <= delay <= 10:
        raise pytest.UsageError(f"{START_DELAY_VARIABLE} must be a number of seconds from 0 to 10, "
                                f"got {value!r}")
    start_thread = _worker.start_thread

    def late_start_thread(target: Callable[[], None], name: str) -> threading.Thread:
        time.sleep(delay)
        return start_thread(target, name)

    _worker.start_thread = late_start_thread


def _check_invariants(pools: Any = None) -> None:
    """``pool.check_invariants()`` of every pool (of the current system by default), under its lock."""
    if pools is None:
        pools = cmwq_exec.get_system().pools
    for pool in pools:
        with pool.lock:
            pool.check_invariants()


def _is_quiet(pool: Any) -> bool:
    with pool.lock:
        return (not pool.worklist and pool.nr_running == 0 and not pool.managing
                and pool.nr_idle == pool.nr_workers and all(not w.woken for w in pool.idle))


def _quiesce(pools: Any = None, timeout: float = 10.0) -> None:
    """Wait until every pool is at rest: nothing pending, nobody running or managing, all idle.

    Then assert the invariants of a pool at rest, beyond those ``check_invariants`` asserts under
    load: nothing runs, and a pool that has started keeps at least one idle worker.
    """
    if pools is None:
        pools = cmwq_exec.get_system().pools
    for pool in pools:
        wait_for(f"{pool!r} to quiesce", lambda pool=pool: _is_quiet(pool), timeout)
        with pool.lock:
            pool.check_invariants()
            assert pool.nr_running == 0, pool
            if pool.next_worker_id and pool.online:
                assert pool.nr_idle >= 1, f"{pool!r} has no idle worker at rest"


@pytest.fixture(autouse=True)
def _lock_order_kept() -> Iterator[None]:
    """In lock debug mode, a test during which any thread broke the lock order, or called a function
    without the lock it documents as held, fails."""
    from cmwq_exec.core import lockdep

    seen = len(lockdep.violations)
    yield
    broken = lockdep.violations[seen:]
    assert not broken, "lock rules broken (cmwq_exec/core/lockdep.py):\n" + "\n".join(broken)


@pytest.fixture(autouse=True)
def _one_hotplug_test_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """A ``hotplug`` test runs under an exclusive lock (fcntl) on ``HOTPLUG_LOCK``; others do not."""
    if request.node.get_closest_marker("hotplug") is None:
        yield
        return
    with open(HOTPLUG_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, however the test ends
        yield


@pytest.fixture
def check_invariants() -> Callable[..., None]:
    """``check_invariants(pools=None)``: every pool's invariants, each under its lock."""
    return _check_invariants


@pytest.fixture
def quiesce() -> Callable[..., None]:
    """``quiesce(pools=None, timeout=10)``: wait until the pools rest, then check them at rest."""
    return _quiesce


def _fresh_pools(hotplug: bool) -> Iterator[Callable[..., Any]]:
    """The one implementation of both system fixtures: ``make(**config)`` replaces the process's
    pools by fresh ones with that config (the old ones are shut down: their threads exit);
    fresh default pools again when the test ends, if it made any."""
    used = False

    def make(**config: Any) -> Any:
        nonlocal used
        used = True
        config.setdefault("hotplug", hotplug)
        return _system._reset_for_tests(**config)

    yield make
    if used:
        _system._reset_for_tests(hotplug=hotplug)


@pytest.fixture
def reset_system() -> Iterator[Callable[..., Any]]:
    """``reset_system(**config)``: fresh pools with that config, hotplug monitor included."""
    yield from _fresh_pools(hotplug=True)


@pytest.fixture
def no_watchdog(reset_system: Callable[..., Any]) -> Any:
    """Fresh pools whose watchdog never looks (a tick of an hour), for tests of exact concurrency
    management: without it, a missing sleep notification would still be caught up by the watchdog
    within a tick and the test could not fail. Ask for it before any executor fixture."""
    return reset_system(watchdog_tick=3600.0)


def _shut_down(executor: CMWQExecutor, timeout: float = 15.0) -> None:
    """Shut ``executor`` down, waiting at most ``timeout`` (a stuck test must not hang the session)."""
    executor.shutdown(wait=False, cancel_futures=True)
    done = threading.Event()

    def flush() -> None:
        executor.workqueue.flush()
        done.set()

    threading.Thread(target=flush, daemon=True).start()
    if not done.wait(timeout):
        pytest.fail(f"{executor!r} did not drain within {timeout}s of shutdown")


@pytest.fixture
def make_executor() -> Iterator[Callable[..., CMWQExecutor]]:
    """``make_executor(**kwargs)``: a CMWQExecutor that is shut down (bounded) when the test ends."""
    made: list[CMWQExecutor] = []

    def make(*args: Any, **kwargs: Any) -> CMWQExecutor:
        executor = CMWQExecutor(*args, **kwargs)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        _shut_down(executor)


@pytest.fixture
def executor(make_executor: Callable[..., CMWQExecutor]) -> CMWQExecutor:
    """A default CMWQExecutor on the shared pools."""
    return make_executor()


@pytest.fixture
def release() -> Iterator[Callable[[threading.Event], threading.Event]]:
    """``release(event)`` registers an Event to set when the test ends, so that a failing test never
    leaves a work blocked forever on the shared pools."""
    events: list[threading.Event] = []

    def register(event: threading.Event) -> threading.Event:
        events.append(event)
        return event

    yield register
    for event in events:
        event.set()


@pytest.fixture
def fresh_system() -> Iterator[Callable[..., Any]]:
    """``fresh_system(**config)``: fresh pools with that config, without a hotplug monitor unless
    asked (``hotplug=True``)."""
    yield from _fresh_pools(hotplug=False)
