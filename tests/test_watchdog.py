"""The watchdog: un-annotated blocking, CPU hogs, stall warnings."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import registered, wait_for

import cmwq_exec
from cmwq_exec import WQ, Work, WorkQueue
from cmwq_exec.core import system as _system
from cmwq_exec.core import watchdog
from cmwq_exec.core.worker import STUCK, current_worker

pytestmark = pytest.mark.timeout(120)






@pytest.fixture
def pinned_cpu0() -> Iterator[None]:
    """Run the test thread on CPU 0 so per-CPU works go to cpu0's pool."""
    old = os.sched_getaffinity(0)
    if 0 not in old:
        pytest.skip("CPU 0 is not in this process's affinity mask")
    os.sched_setaffinity(0, {0})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blocked: list[tuple[Any, Any, Any]] = []
        self.intensive: list[tuple[Any, Any, Any]] = []
        self.stalls: list[tuple[Any, float, dict[int, str]]] = []

    @cmwq_exec.hookimpl
    def cmwq_worker_blocked(self, pool: Any, worker: Any, work: Any) -> None:
        with self.lock:
            self.blocked.append((pool, worker, work))

    @cmwq_exec.hookimpl
    def cmwq_cpu_intensive(self, pool: Any, worker: Any, work: Any) -> None:
        with self.lock:
            self.intensive.append((pool, worker, work))

    @cmwq_exec.hookimpl
    def cmwq_stall(self, pool: Any, seconds: float, stacks: dict[int, str]) -> None:
        with self.lock:
            self.stalls.append((pool, seconds, stacks))


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with registered(Recorder(), "wd-recorder") as rec:
        yield rec


def test_unannotated_sleep_is_found_blocked_and_work_behind_it_runs(
        fresh_system: Any, pinned_cpu0: None, recorder: Recorder) -> None:
    system = fresh_system()
    pool = system.cpu_pools[0]
    release = threading.Event()
    started = threading.Event()
    seen: dict[str, Any] = {}

    def sleeper() -> str:
        seen["worker"] = current_worker()
        started.set()
        deadline = time.monotonic() + 30
        while not release.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)  # un-annotated: no blocking()
        return "slept"

    def behind() -> str:
        worker = current_worker()
        return worker.pool.name if worker is not None else "?"

    with cmwq_exec.CMWQExecutor(unbound=False, rescuer=False) as ex:
        try:
            sleeping = ex.submit(sleeper)
            assert started.wait(10)
            assert seen["worker"].pool is pool
            quick = ex.submit(behind)
            # runs while the sleeper still sleeps
            assert quick.result(timeout=10) == "cpu0"
            assert not sleeping.done()
            wait_for("the sleeper's worker_blocked event",
                     lambda: any(work is sleeping for _, _, work in recorder.blocked))
            worker = seen["worker"]
            assert worker.flags & STUCK, f"sleeping worker not STUCK: {worker!r}"
            assert not any(work is sleeping for _, _, work in recorder.intensive)
        finally:
            release.set()
        assert sleeping.result(timeout=10) == "slept"
    # STUCK is cleared once the worker idles
    wait_for("the sleeper's worker idle and no longer STUCK", lambda: not seen["worker"].flags & STUCK)


def test_spinning_worker_is_cpu_intensive_not_blocked(
        fresh_system: Any, pinned_cpu0: None, recorder: Recorder) -> None:
    system = fresh_system()
    pool = system.cpu_pools[0]
    before = pool.stats()["cpu_intensive"]

    def spin() -> int:
        n = 0
        end = time.thread_time() + 0.1
        while time.thread_time() < end:
            n += 1
        return n

    with cmwq_exec.CMWQExecutor(unbound=False, rescuer=False) as ex:
        spinning = ex.submit(spin)
        # pending works behind it: the watchdog only looks at pools with a backlog
        behind = [ex.submit(time.monotonic) for _ in range(5)]
        assert spinning.result(timeout=10) > 0
        for f in behind:
            f.result(timeout=10)
    assert pool.stats()["cpu_intensive"] > before
    assert ex.workqueue.stats()["cpu_intensive"] >= 1
    assert any(work is spinning for _, _, work in recorder.intensive), recorder.intensive
    assert not any(work is spinning for _, _, work in recorder.blocked), "the spinner was judged blocked"


def stuck_in_test_watchdog(release: threading.Event) -> None:
    release.wait(60)  # un-annotated


def test_stall_warned_once_per_stall_with_stacks(fresh_system: Any, recorder: Recorder,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cmwq_exec.watchdog")
    # two CPU pools hold a worker each; the unbound pool can have two: one runs the stuck work, the
    # other becomes the manager and fails at the cap, so nothing else starts there
    system = fresh_system(max_total_workers=len(_system.usable_cpus()) + 2, create_cooldown=0.02,
                          stall_timeout=0.3)
    pool = system.unbound_pool
    wq = WorkQueue(f"wd-stall-{uuid.uuid4().hex[:6]}", WQ.UNBOUND)

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records
                if r.name == "cmwq_exec.watchdog" and "pool unbound" in r.getMessage()]

    for stall in (1, 2):
        release = threading.Event()
        try:
            for _ in range(6):
                assert wq.queue_work(Work(stuck_in_test_watchdog, release))
            target = stall
            wait_for(f"stall warning #{stall}", lambda: len(warnings()) >= target, timeout=10)  # noqa: B023
            # still stalled for several more stall_timeouts: no second warning for this stall
            deadline = time.monotonic() + 4 * system.config.stall_timeout
            while time.monotonic() < deadline:
                assert len(warnings()) == stall, [r.getMessage()[:200] for r in warnings()]
                time.sleep(0.02)
            message = warnings()[-1].getMessage()
            assert "started none" in message
            assert "--- thread" in message and "stuck_in_test_watchdog" in message, message
            stalls = [s for s in recorder.stalls if s[0] is pool]
            assert len(stalls) == stall
            assert stalls[-1][1] >= system.config.stall_timeout
            assert any("stuck_in_test_watchdog" in stack for stack in stalls[-1][2].values())
        finally:
            release.set()
        wq.flush()



def held_by_caller(lock: Any) -> bool:
    """Does the calling thread hold ``lock``? A thread cannot take a plain Lock it holds again,
    while any other holder of a pool lock lets go within microseconds."""
    if lock.acquire(timeout=1.0):
        lock.release()
        return False
    return True


def test_clocks_and_proc_are_read_without_the_pool_lock(
        fresh_system: Any, pinned_cpu0: None, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog's slow reads (thread CPU clocks, /proc) happen with the pool lock released, so
    a worker never waits for them to queue, wake or complete."""
    fresh_system()
    calls: dict[str, list[bool]] = {"thread_cpu_ns": [], "_runnable": []}
    real_cpu_ns, real_runnable = watchdog.thread_cpu_ns, watchdog._runnable

    def probe(name: str, worker: Any) -> None:
        seen = calls[name]
        if len(seen) < 5:  # on a wrong watchdog each probe costs a second
            seen.append(held_by_caller(worker.pool.lock))

    def thread_cpu_ns(worker: Any) -> int | None:
        probe("thread_cpu_ns", worker)
        return real_cpu_ns(worker)

    def runnable(worker: Any) -> bool:
        probe("_runnable", worker)
        return real_runnable(worker)

    monkeypatch.setattr(watchdog, "thread_cpu_ns", thread_cpu_ns)
    monkeypatch.setattr(watchdog, "_runnable", runnable)
    release = threading.Event()
    started = threading.Event()

    def sleeper() -> None:
        started.set()
        deadline = time.monotonic() + 30
        while not release.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)  # un-annotated: the watchdog must judge it

    with cmwq_exec.CMWQExecutor(unbound=False, rescuer=False) as ex:
        try:
            sleeping = ex.submit(sleeper)
            assert started.wait(10)
            assert ex.submit(time.monotonic).result(timeout=20)
            wait_for("the sleeper's worker_blocked event",
                     lambda: any(work is sleeping for _, _, work in recorder.blocked))
        finally:
            release.set()
        sleeping.result(timeout=10)
    assert calls["thread_cpu_ns"] and calls["_runnable"], calls
    assert not any(calls["thread_cpu_ns"]), f"thread_cpu_ns called under pool.lock: {calls}"
    assert not any(calls["_runnable"]), f"/proc read under pool.lock: {calls}"


def test_stall_stacks_are_taken_without_the_pool_lock(
        fresh_system: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    system = fresh_system(max_total_workers=len(_system.usable_cpus()) + 2, create_cooldown=0.02,
                          stall_timeout=0.3)
    held: list[bool] = []
    warn_stall = type(system.watchdog).warn_stall

    def probed(self: Any, pool: Any, seconds: float, busy: list[Any]) -> None:
        held.append(held_by_caller(pool.lock))
        warn_stall(self, pool, seconds, busy)

    monkeypatch.setattr(type(system.watchdog), "warn_stall", probed)
    wq = WorkQueue(f"wd-stall-lock-{uuid.uuid4().hex[:6]}", WQ.UNBOUND)
    release = threading.Event()
    try:
        for _ in range(6):
            assert wq.queue_work(Work(stuck_in_test_watchdog, release))
        wait_for("a stall warning", lambda: held, timeout=10)
    finally:
        release.set()
    wq.flush()
    assert not any(held), "warn_stall ran under pool.lock"


@pytest.mark.parametrize("saturated", [False, True])
def test_looks_are_spaced_out_while_the_process_is_saturated(
        fresh_system: Any, pinned_cpu0: None, monkeypatch: pytest.MonkeyPatch, saturated: bool) -> None:
    """A look that finds a new work comes back after an eighth of a tick, unless the process is
    saturated: then no rule can add a runner, and the next look comes after four ticks, so a
    stream of short CPU-bound works does not lose the GIL to the watchdog every 1.25 ms."""
    system = fresh_system(watchdog_tick=3600.0)  # no look of its own during the test
    tick = system.config.watchdog_tick
    pool = system.cpu_pools[0]
    release = threading.Event()
    delays: list[float] = []
    monkeypatch.setattr(type(system.watchdog), "cpu_load", lambda self, now: 2.0 if saturated else 0.0)
    # the watchdog's timers only (arm's first look, and the re-arm after a look): recorded, not run
    monkeypatch.setattr(watchdog, "timer", SimpleNamespace(add_timer=lambda delay, fn: delays.append(delay)))
    with cmwq_exec.CMWQExecutor(unbound=False, rescuer=False) as ex:
        running = ex.submit(release.wait, 30)  # un-annotated: counts as running
        behind = ex.submit(time.monotonic)  # pending behind it: the watchdog looks at the pool
        wait_for("the first work running", lambda: pool.stats()["nr_pending"] == 1)
        del delays[:]  # arm's
        system.watchdog.check(pool)  # a new work on the runner
        release.set()
        assert running.result(timeout=10) and behind.result(timeout=10)
    assert delays == [tick * (watchdog.SATURATED_LOOK if saturated else watchdog.QUICK_LOOK)]
