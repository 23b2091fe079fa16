"""Opt-in detection of blocking stdlib calls (cmwq_exec.detect): sys.monitoring on 3.12+, wrappers
before. Each test turns detection on and off again."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import cmwq_exec
from cmwq_exec import CMWQExecutor, detect, get_system
from cmwq_exec.core import worker as worker_module
from cmwq_exec.core.worker import Worker, current_worker


@pytest.fixture
def detecting() -> Iterator[str]:
    mechanism = cmwq_exec.detect_blocking()
    try:
        yield mechanism
    finally:
        cmwq_exec.undetect_blocking()


def test_mechanism_matches_the_interpreter(detecting: str) -> None:
    assert detecting == ("sys.monitoring" if sys.version_info >= (3, 12) else "wrappers")
    assert detect.enabled() == detecting
    assert cmwq_exec.detect_blocking() == detecting  # idempotent


def test_known_blocking_primitives() -> None:
    assert detect.is_blocking_call(time.sleep)
    assert detect.is_blocking_call(threading.Lock().acquire)
    a, b = socket.socketpair()
    try:
        assert detect.is_blocking_call(socket.socket.__mro__[1].recv.__get__(a))
    finally:
        a.close()
        b.close()
    assert not detect.is_blocking_call(len)
    assert not detect.is_blocking_call(threading.Lock().release)
    assert not detect.is_blocking_call(lambda: None)


def _pin_to_cpu0() -> set[int]:
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    return old


def _sleeper_then_setter_completes(executor: CMWQExecutor, timeout: float) -> bool:
    """A work that sleeps in plain time.sleep (polling an Event) and a later work that sets the
    Event: both on cpu0's pool. Only a pool that knows the first one sleeps runs the second while
    the first still sleeps."""
    event = threading.Event()
    deadline = time.monotonic() + timeout

    def sleeper() -> bool:
        while not event.is_set():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    first = executor.submit(sleeper)
    executor.submit(event.set)
    return bool(first.result(timeout=timeout + 5))


def _seen_sleeping(work_fn: object, timeout: float = 5.0) -> bool:
    """Run ``work_fn`` (which sleeps ~0.3 s) and watch the pools: True if its worker was flagged
    SLEEPING (told the pool it sleeps) while running it. The watchdog never sets that flag."""
    from cmwq_exec.core.worker import SLEEPING

    with CMWQExecutor() as ex:
        future = ex.submit(work_fn)
        rescuer = ex.workqueue._rescuer  # it runs the work if no worker can be made in time
        deadline = time.monotonic() + timeout
        seen = False
        while not future.done() and time.monotonic() < deadline and not seen:
            for pool in get_system().pools:
                with pool.lock:
                    workers = [*pool.workers, *([rescuer.worker] if rescuer is not None else [])]
                    seen = seen or any(w.flags & SLEEPING and w.current_work is future
                                       for w in workers)
            time.sleep(0.002)
        future.result(timeout=timeout)
    return seen


def _user_sleep() -> None:
    time.sleep(0.3)


def test_plain_sleep_is_a_sleep_notification(detecting: str) -> None:
    assert _seen_sleeping(_user_sleep)
    assert _seen_sleeping(lambda: threading.Event().wait(0.3))


def test_without_detection_plain_sleep_is_not_announced() -> None:
    assert detect.enabled() is None
    assert not _seen_sleeping(_user_sleep)


def test_submitted_sleep_itself_is_detected(detecting: str) -> None:
    """The site where cmwq_exec calls the user's function stays watched even after it called a
    non-blocking function first."""
    with CMWQExecutor() as ex:
        ex.submit(int).result()
    assert _seen_sleeping(lambda: time.sleep(0.3))


def test_sleeper_then_setter_on_one_pool(detecting: str) -> None:
    old = _pin_to_cpu0()
    try:
        with CMWQExecutor() as ex:
            assert _sleeper_then_setter_completes(ex, timeout=5.0)
    finally:
        os.sched_setaffinity(0, old)


def test_lock_wait_in_user_code_is_detected(detecting: str) -> None:
    """An Event.wait (a lock acquire underneath) inside a work releases its pool."""
    old = _pin_to_cpu0()
    try:
        with CMWQExecutor() as ex:
            gate = threading.Event()
            waiter = ex.submit(gate.wait, 10)
            setter = ex.submit(gate.set)
            assert waiter.result(timeout=10) is True
            setter.result(timeout=10)
    finally:
        os.sched_setaffinity(0, old)


def test_pool_invariants_hold_with_detection(detecting: str) -> None:
    with CMWQExecutor() as ex:
        futures = [ex.submit(time.sleep, 0.001) if i % 3 else ex.submit(sum, range(100))
                   for i in range(600)]
        for f in futures:
            f.result(timeout=30)
    for pool in get_system().pools:
        with pool.lock:
            pool.check_invariants()
            assert all(w.sleep_depth == 0 for w in pool.workers)


def test_disable_restores_everything() -> None:
    original_sleep = time.sleep
    cmwq_exec.detect_blocking()
    cmwq_exec.undetect_blocking()
    assert detect.enabled() is None
    assert time.sleep is original_sleep
    assert threading.Condition.wait.__name__ == "wait"
    assert not hasattr(threading.Condition.wait, "__wrapped__")


def test_unbound_method_descriptors_count() -> None:
    """sys.monitoring reports ``lock.acquire(...)`` as the descriptor ``_thread.lock.acquire``."""
    assert detect.is_blocking_call(type(threading.Lock()).acquire)
    assert detect.is_blocking_call(socket.socket.__mro__[1].recv)
    assert not detect.is_blocking_call(type(threading.Lock()).release)


def test_only_a_works_own_waits_count_as_sleeps(fresh_system: Any, monkeypatch: Any) -> None:
    """A worker between works is not running: a manager starting a thread waits on an Event
    inside ``Thread.start``, and that wait must neither mark it sleeping (it would count among the
    young sleepers) nor feed the pool's average sleep. Both mechanisms, on fresh pools so that
    managers do start threads while detection is on."""
    system = fresh_system()
    outside: list[Any] = []
    by_managers: list[str] = []
    sleep_begin = Worker.sleep_begin
    start_thread = worker_module.start_thread

    def spy_sleep(self: Worker) -> None:
        if self.current_work is None:
            outside.append(self)
        sleep_begin(self)

    def spy_start(target: Any, name: str) -> threading.Thread:
        if current_worker() is not None:
            by_managers.append(name)
        return start_thread(target, name)

    monkeypatch.setattr(Worker, "sleep_begin", spy_sleep)
    monkeypatch.setattr(worker_module, "start_thread", spy_start)
    cmwq_exec.detect_blocking()
    try:
        with CMWQExecutor() as ex:
            for f in [ex.submit(time.sleep, 0.001) for _ in range(300)]:
                f.result(timeout=30)
    finally:
        cmwq_exec.undetect_blocking()
    assert by_managers, "no manager started a thread: nothing tested"
    assert outside == []
    for pool in system.pools:
        with pool.lock:
            assert all(w.sleep_depth == 0 for w in pool.workers)


_POOL_CODE_WAITS = """
import faulthandler, queue, sys, time
faulthandler.dump_traceback_later(60, exit=True)  # a deadlock fails with every thread's stack
import cmwq_exec
from cmwq_exec import CMWQExecutor
cmwq_exec.detect_blocking()
ex = CMWQExecutor(max_workers=2)
def producer(q, i): q.put(i)
def consumer(i):                  # queues a work (the pools' own code runs here), then waits
    q = queue.Queue()
    ex.submit(producer, q, i)
    try:
        return q.get(timeout=0.2)  # the producer may wait behind this call's slot: then it times out
    except queue.Empty:
        return i
for _ in range(3):
    print(sum(f.result() for f in [ex.submit(consumer, i) for i in range(4)]))
"""


def test_waits_inside_the_pools_own_code_are_not_a_works_sleeps() -> None:
    # A work that queues a work runs the pools' own code on its thread; there (under a pool lock)
    # the timer is started, and Thread.is_alive takes a lock with acquire(False). Detection took
    # that for the work's sleep and asked for the pool lock its thread held: a deadlock.
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _POOL_CODE_WAITS], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["6"] * 3


def _deep_sleep(n: int = 20) -> None:
    if n:
        return _deep_sleep(n - 1)
    time.sleep(0.3)


def test_a_user_wait_below_a_user_call_site_still_counts(detecting: str) -> None:
    # the walk out from a blocking call stops at the first frame of cmwq_exec: the user's function
    # runs below a user call site, so its waits count, however deep in its own calls
    assert _seen_sleeping(_deep_sleep)
