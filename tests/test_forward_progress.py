"""Forward progress: the rescuer under a worker cap, failing thread creation, and raising plugins."""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import uuid
from typing import Any

import pytest
from helpers import wait_for

import cmwq_exec
from cmwq_exec import WQ, Work, WorkQueue, blocking, plugin
from cmwq_exec.core import system as _system
from cmwq_exec.core import worker as _worker

pytestmark = pytest.mark.timeout(120)






CAPPED = dict(max_total_workers=4, create_cooldown=0.02, mayday_initial_timeout=0.01,
              mayday_interval=0.05, stall_timeout=0.5)


class Chain:
    """``depth`` blockers on ``blockers_wq`` (each waits inside blocking() for its event) and then
    ``depth`` setters on ``setters_wq`` (setter i sets event i). Blocker i+1 only runs once blocker i
    returned, so the chain is ``depth`` deep; the setters are all queued behind the blockers, so with
    every capped worker blocked only a rescuer can run them (helping cannot apply: no one waits on a
    future)."""

    def __init__(self, blockers_wq: WorkQueue, setters_wq: WorkQueue, depth: int) -> None:
        self.events = [threading.Event() for _ in range(depth)]
        self.done = collections.Counter[str]()
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        self.total = 2 * depth
        self.abort = threading.Event()
        for i in range(depth):
            assert blockers_wq.queue_work(Work(self.blocker, i))
        for i in range(depth):
            assert setters_wq.queue_work(Work(self.setter, i))

    def _finish(self, key: str) -> None:
        with self.lock:
            self.done[key] += 1
            if sum(self.done.values()) == self.total:
                self.all_done.set()

    def blocker(self, i: int) -> None:
        with blocking():
            deadline = time.monotonic() + 60
            while not self.events[i].wait(0.05):
                if self.abort.is_set() or time.monotonic() > deadline:
                    break
        self._finish(f"b{i}")

    def setter(self, i: int) -> None:
        self.events[i].set()
        self._finish(f"s{i}")

    def release(self) -> None:
        for event in self.events:
            event.set()


def test_rescuer_completes_chain_deeper_than_cap(fresh_system: Any) -> None:
    system = fresh_system(**CAPPED)
    depth = 3 * system.config.max_total_workers
    blockers_wq = WorkQueue(f"fp-blockers-{uuid.uuid4().hex[:6]}", WQ.UNBOUND)
    setters_wq = WorkQueue(f"fp-setters-{uuid.uuid4().hex[:6]}", WQ.UNBOUND | WQ.RESCUER)
    chain = Chain(blockers_wq, setters_wq, depth)
    try:
        assert chain.all_done.wait(30), f"chain stuck: done={dict(chain.done)} pools={system.pools}"
        assert all(count == 1 for count in chain.done.values()) and len(chain.done) == 2 * depth
        stats = setters_wq.stats()
        assert stats["mayday"] > 0, stats
        assert stats["rescued"] > 0, stats
        assert system.unbound_pool.stats()["mayday"] > 0
        assert system.nr_threads <= system.config.max_total_workers
    finally:
        chain.abort.set()
        chain.release()


def test_rescuer_executor_default_completes_chain(fresh_system: Any) -> None:
    """CMWQExecutor reserves a rescuer by default: the same chain, setters submitted to it."""
    system = fresh_system(**CAPPED)
    depth = 2 * system.config.max_total_workers
    blockers = cmwq_exec.CMWQExecutor(unbound=True, rescuer=False)
    setters = cmwq_exec.CMWQExecutor(unbound=True)
    events = [threading.Event() for _ in range(depth)]

    def block(i: int) -> int:
        with blocking():
            assert events[i].wait(60)
        return i

    try:
        bfuts = [blockers.submit(block, i) for i in range(depth)]
        sfuts = [setters.submit(events[i].set) for i in range(depth)]
        assert [f.result(timeout=30) for f in bfuts] == list(range(depth))
        for f in sfuts:
            f.result(timeout=30)
        stats = setters.workqueue.stats()
        assert stats["mayday"] > 0 and stats["rescued"] > 0, stats
    finally:
        for event in events:
            event.set()
        blockers.shutdown(wait=False)
        setters.shutdown(wait=False)


def test_without_rescuer_chain_stalls_and_watchdog_warns(fresh_system: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cmwq_exec.watchdog")
    system = fresh_system(**CAPPED)
    depth = 3 * system.config.max_total_workers
    blockers_wq = WorkQueue(f"fp-blockers-{uuid.uuid4().hex[:6]}", WQ.UNBOUND)
    setters_wq = WorkQueue(f"fp-setters-{uuid.uuid4().hex[:6]}", WQ.UNBOUND)
    chain = Chain(blockers_wq, setters_wq, depth)
    try:
        wait_for("the stall warning of the unbound pool",
                 lambda: any("pool unbound" in r.getMessage() and "started none" in r.getMessage()
                             for r in caplog.records if r.name == "cmwq_exec.watchdog"),
                 timeout=10)
        # a bound on the absence of progress: no setter ran, the chain is not done
        assert not chain.all_done.wait(0.5)
        assert not any(key.startswith("s") for key in chain.done), dict(chain.done)
        assert setters_wq.stats()["rescued"] == 0
        assert system.nr_threads <= system.config.max_total_workers
    finally:
        chain.release()
    # released: every work completes exactly once, the pool is not wedged
    assert chain.all_done.wait(30), f"chain did not finish after release: {dict(chain.done)}"
    assert all(count == 1 for count in chain.done.values()) and len(chain.done) == 2 * depth


class FlakyStart:
    """Replaces ``cmwq_exec.core.worker.start_thread``: every second call raises like a thread limit."""

    def __init__(self) -> None:
        self.real = _worker.start_thread
        self.calls = itertools.count()
        self.failures = 0
        self.lock = threading.Lock()

    def __call__(self, target: Any, name: str) -> threading.Thread:
        if name.startswith("cmwq/rescuer:"):
            # a rescuer is reserved when its workqueue is made; failing that fails the constructor
            return self.real(target, name)
        with self.lock:
            n = next(self.calls)
            if n % 2 == 1:
                self.failures += 1
                raise RuntimeError("can't start new thread")
        return self.real(target, name)


def run_10k(system: _system.System, bound: WorkQueue, unbound: WorkQueue, timeout: float) -> list[int]:
    n = 10_000
    counts = [0] * n
    lock = threading.Lock()
    finished = threading.Event()
    remaining = [n]

    def work(i: int) -> None:
        if i % 10 == 0:
            with blocking():
                time.sleep(0.0005)
        with lock:
            counts[i] += 1
            remaining[0] -= 1
            if remaining[0] == 0:
                finished.set()

    for i in range(n):
        assert (bound if i % 2 else unbound).queue_work(Work(work, i))
    assert finished.wait(timeout), f"{remaining[0]} works never ran; pools={system.pools}"
    bound.flush()
    unbound.flush()
    return counts


FLAKY = dict(create_cooldown=0.01, mayday_initial_timeout=0.005, mayday_interval=0.02)


def test_failing_thread_creation_every_second_call(fresh_system: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Pools up, then every second thread start fails: 10k works all run exactly once."""
    system = fresh_system(**FLAKY)
    bound = WorkQueue(f"fp-flaky-bound-{uuid.uuid4().hex[:6]}", WQ.RESCUER)
    unbound = WorkQueue(f"fp-flaky-unbound-{uuid.uuid4().hex[:6]}", WQ.UNBOUND)
    flaky = FlakyStart()
    monkeypatch.setattr(_worker, "start_thread", flaky)
    counts = run_10k(system, bound, unbound, timeout=60)
    assert counts == [1] * len(counts)
    assert flaky.failures > 0, "the fault was never injected"
    for pool in system.pools:
        with pool.lock:
            pool.check_invariants()


def test_failing_thread_creation_from_the_first_worker(fresh_system: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every second thread start fails from the moment the pools start (some first workers fail)."""
    flaky = FlakyStart()
    monkeypatch.setattr(_worker, "start_thread", flaky)
    system = fresh_system(**FLAKY)
    bound = WorkQueue(f"fp-flaky-bound-{uuid.uuid4().hex[:6]}", WQ.RESCUER)
    unbound = WorkQueue(f"fp-flaky-unbound-{uuid.uuid4().hex[:6]}", WQ.UNBOUND)
    counts = run_10k(system, bound, unbound, timeout=8)
    assert counts == [1] * len(counts)


def test_a_rescued_work_that_blocks_holds_up_only_itself(fresh_system: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The rescuer runs one work at a time and leaves the others on the worklist: when it runs a
    work that waits for a later work of the same workqueue, the worker that creation brings at last
    runs the later one. (A rescuer that took every work to its own list stalled here until the
    first one gave up: the kernel's rescuer did that until 2025.)"""
    system = fresh_system(**FLAKY)
    real = _worker.start_thread
    refusing = threading.Event()
    refusing.set()

    def refuse_workers(target: Any, name: str) -> threading.Thread:
        if refusing.is_set() and not name.startswith("cmwq/rescuer:"):
            raise RuntimeError("can't start new thread")
        return real(target, name)

    monkeypatch.setattr(_worker, "start_thread", refuse_workers)
    wq = WorkQueue(f"fp-rescued-{uuid.uuid4().hex[:6]}", WQ.UNBOUND | WQ.RESCUER)
    second_ran = threading.Event()
    first: dict[str, Any] = {}

    def waits_for_the_second() -> None:
        worker = cmwq_exec.core.worker.current_worker()
        first["rescued"] = worker is not None and bool(worker.flags & _worker.RESCUER)
        with blocking():
            first["saw_second"] = second_ran.wait(20)

    assert wq.queue_work(Work(waits_for_the_second))
    assert wq.queue_work(Work(second_ran.set))
    wait_for("the rescuer to run the first work", lambda: "rescued" in first, timeout=20)
    assert first["rescued"], "the first work ran on a worker, not the rescuer: nothing was tested"
    refusing.clear()  # workers can be created again
    assert second_ran.wait(20), "the second work stayed behind the blocked rescued work"
    wq.flush()
    assert first["saw_second"] is True
    assert wq.stats()["rescued"] >= 1
    for pool in system.pools:
        with pool.lock:
            pool.check_invariants()


class RaisingKeepWorking:
    def __init__(self) -> None:
        self.calls = 0

    @cmwq_exec.hookimpl
    def cmwq_keep_working(self, pool: Any) -> bool:
        self.calls += 1
        raise RuntimeError("policy plugin bug")

    @cmwq_exec.hookimpl
    def cmwq_need_more_worker(self, pool: Any) -> bool:
        raise ZeroDivisionError("another policy plugin bug")


def test_raising_policy_plugin_never_wedges_pool(fresh_system: Any,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cmwq_exec.plugin")
    system = fresh_system()
    raiser = RaisingKeepWorking()
    name = plugin.register(raiser, name=f"raiser-{uuid.uuid4().hex[:6]}")
    try:
        n = 3000
        counts = collections.Counter[int]()
        lock = threading.Lock()

        def work(i: int) -> None:
            if i % 50 == 0:
                with blocking():
                    time.sleep(0.001)
            with lock:
                counts[i] += 1

        with cmwq_exec.CMWQExecutor() as bound, cmwq_exec.CMWQExecutor(unbound=True) as unbound:
            futs = [(bound if i % 2 else unbound).submit(work, i) for i in range(n)]
            for f in futs:
                f.result(timeout=30)
        assert counts == collections.Counter(range(n))
        assert raiser.calls > 0, "the raising policy hook was never consulted"
        logged = [r for r in caplog.records if name in r.getMessage()]
        assert {h for r in logged for h in ("cmwq_keep_working", "cmwq_need_more_worker")
                if h in r.getMessage()} == {"cmwq_keep_working", "cmwq_need_more_worker"}
        # logged once per (plugin, hook), not once per call
        assert len(logged) == 2, [r.getMessage() for r in logged]
    finally:
        plugin.unregister(name=name)
    assert not any(isinstance(p, RaisingKeepWorking) for p in plugin.get_plugin_manager().get_plugins())
    for pool in system.pools:
        with pool.lock:
            pool.check_invariants()


def test_rescuer_that_cannot_be_created_fails_the_workqueue_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rescuer is reserved up front (as in the kernel): if its thread cannot start, the workqueue is
    not made, and the error names it."""
    cmwq_exec.get_system()
    real = _worker.start_thread

    def refuse_rescuers(target: Any, name: str) -> threading.Thread:
        if name.startswith("cmwq/rescuer:"):
            raise RuntimeError("can't start new thread")
        return real(target, name)

    monkeypatch.setattr(_worker, "start_thread", refuse_rescuers)
    with pytest.raises(RuntimeError, match="rescuer thread of workqueue 'fp-no-rescuer'"):
        WorkQueue("fp-no-rescuer", WQ.RESCUER)


def test_paced_pool_at_the_cap_calls_its_rescuers_every_interval(fresh_system: Any) -> None:
    """Beyond ``unpaced_workers`` the timer thread creates a pool's workers; at the cap it retries
    only after ``create_cooldown``. Meanwhile the mayday timer calls the rescuers every
    ``mayday_interval``, as the manager's own loop does: works that arrive after the first mayday
    (the rescuer went back to sleep) are rescued within an interval, not a cooldown (60 s here).
    Every pool starts with one worker: the cap of 3 leaves this pool two."""
    system = fresh_system(unpaced_workers=2, max_total_workers=3, create_cooldown=60.0,
                          mayday_initial_timeout=0.01, mayday_interval=0.01, watchdog_tick=3600.0)
    cpu = min(system.cpu_pools)
    pool = system.cpu_pools[cpu]
    blockers = WorkQueue(f"fp-cap-blockers-{uuid.uuid4().hex[:6]}")
    rescued = WorkQueue(f"fp-cap-rescued-{uuid.uuid4().hex[:6]}", WQ.RESCUER)
    gate = threading.Event()

    def hold() -> None:
        with blocking():
            assert gate.wait(60)

    try:
        for _ in range(2):
            assert blockers.queue_work_on(cpu, Work(hold))
        wait_for("both workers asleep in blocking()",
                 lambda: pool.nr_workers == 2 and pool.nr_idle == 0 and not pool.nr_running)
        for i in range(4):
            done = threading.Event()
            assert rescued.queue_work_on(cpu, Work(done.set))
            assert done.wait(20), f"work {i} waited for the next creation attempt (create_cooldown)"
            wait_for("the rescuer done with the pool", lambda: not rescued._rescuer.pools)
        assert rescued.stats()["rescued"] >= 4
        assert system.nr_threads <= 3
    finally:
        gate.set()
        blockers.flush()
        rescued.flush()
