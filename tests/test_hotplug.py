"""CPU hotplug: the explicit API, real CPU offlining through sysfs, and affinity changes."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import (
    CPU1_ONLINE,
    in_ci,
    need_sysfs_hotplug,
    need_two_cpus,
    read_cpu1,
    registered,
    wait_for,
    write_cpu1,
)

import cmwq_exec
from cmwq_exec import WQ, Work, WorkQueue, blocking
from cmwq_exec.core.manager import Manager, WorkerCreationError
from cmwq_exec.core.worker import ROGUE, current_worker

pytestmark = [pytest.mark.hotplug, pytest.mark.slow, pytest.mark.timeout(180)]

@pytest.fixture
def fresh_system(fresh_system: Callable[..., Any]) -> Callable[..., Any]:
    """conftest's, with a quick trustee."""

    def make(**config: Any) -> Any:
        config.setdefault("trustee_cooldown", 0.01)
        return fresh_system(**config)

    return make


class TrusteeStates:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.states: list[tuple[str, str]] = []

    @cmwq_exec.hookimpl
    def cmwq_trustee_state(self, pool: Any, state: str) -> None:
        with self.lock:
            self.states.append((pool.name, state))

    def of(self, name: str) -> list[str]:
        with self.lock:
            return [state for pool, state in self.states if pool == name]


@pytest.fixture
def trustee_states() -> Iterator[TrusteeStates]:
    with registered(TrusteeStates(), "hp-trustee") as rec:
        yield rec


class Flow:
    """``n`` works (no-op, and every ``blocking_every``-th a short wait inside blocking()) counted
    per id, queued by a thread with the given CPU mask alternately on a per-CPU and an unbound
    workqueue."""

    def __init__(self, n: int, cpus: set[int] | None, blocking_every: int = 7) -> None:
        self.n = n
        self.counts = [0] * n
        self.lock = threading.Lock()
        self.remaining = n
        self.finished = threading.Event()
        self.queued = 0
        self.blocking_every = blocking_every
        self.bound = WorkQueue(f"hp-bound-{uuid.uuid4().hex[:6]}", WQ.RESCUER)
        self.unbound = WorkQueue(f"hp-unbound-{uuid.uuid4().hex[:6]}", WQ.UNBOUND)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._produce, args=(cpus,), name="hp-producer")

    def start(self) -> Flow:
        self.thread.start()
        return self

    def work(self, i: int) -> None:
        if i % self.blocking_every == 0:
            with blocking():
                time.sleep(0.0002)
        with self.lock:
            self.counts[i] += 1
            self.remaining -= 1
            if self.remaining == 0:
                self.finished.set()

    def _produce(self, cpus: set[int] | None) -> None:
        try:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            for i in range(self.n):
                wq = self.bound if i % 3 else self.unbound
                assert wq.queue_work(Work(self.work, i))
                self.queued = i + 1
                if i % 500 == 499:
                    time.sleep(0.001)  # let the flow overlap the hotplug events
        except BaseException as exc:
            self.error = exc

    def check(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert self.error is None, f"producer failed: {self.error!r}"
        assert self.finished.wait(timeout), f"{self.remaining} of {self.n} works never ran"
        self.bound.flush()
        self.unbound.flush()
        wrong = [(i, c) for i, c in enumerate(self.counts) if c != 1]
        assert not wrong, f"works not run exactly once (id, count): {wrong[:20]}"


def pool_workers(pool: Any) -> list[Any]:
    with pool.lock:
        return list(pool.workers)


def test_explicit_cpu_down_up(fresh_system: Any, trustee_states: TrusteeStates) -> None:
    need_two_cpus()
    system = fresh_system()
    pool = system.cpu_pools[1]
    assert pool.online
    flow = Flow(6000, {1}).start()
    wait_for("works queued on cpu1", lambda: flow.queued >= 1500)
    system.cpu_down(1)
    flow.check(60)
    wait_for("cpu1's trustee DONE", lambda: pool.stats()["trustee_state"] == "DONE")
    assert pool.stats()["online"] is False
    assert pool not in system.online_pools and 1 not in system.usable
    wait_for("cpu1's workers gone or rogue",
             lambda: all(w.flags & ROGUE for w in pool_workers(pool)))
    # the trustee reports DONE after it has dropped the pool's lock: wait for the report
    wait_for("the trustee's DONE reported", lambda: "DONE" in trustee_states.of("cpu1"))
    states = trustee_states.of("cpu1")
    assert states[:2] == ["START", "IN_CHARGE"], states
    assert states[-1] == "DONE", states
    assert set(states) <= {"START", "IN_CHARGE", "BUTCHER", "RELEASE", "DONE"}
    with pool.lock:
        pool.check_invariants()

    system.cpu_up(1)
    assert pool.stats()["online"] is True
    assert pool in system.online_pools
    # works queued from CPU 1 run on cpu1's pool again, on a worker pinned there
    where: list[tuple[str, set[int]]] = []

    def on_cpu1() -> None:
        worker = current_worker()
        assert worker is not None
        where.append((worker.pool.name, os.sched_getaffinity(0)))

    wq = WorkQueue(f"hp-after-{uuid.uuid4().hex[:6]}")
    errors: list[BaseException] = []

    def queue_from_cpu1() -> None:
        try:
            os.sched_setaffinity(0, {1})
            for _ in range(20):
                wq.queue_work(Work(on_cpu1))
        except BaseException as exc:
            errors.append(exc)

    producer = threading.Thread(target=queue_from_cpu1)
    producer.start()
    producer.join(10)
    assert not errors, errors
    wq.flush()
    assert len(where) == 20
    assert all(name == "cpu1" for name, _ in where), where
    if system.config.pin_workers:
        assert all(mask == {1} for _, mask in where), where
    with pool.lock:
        assert pool.nr_workers >= 1
        pool.check_invariants()


def test_explicit_rapid_down_up_cycles(fresh_system: Any, trustee_states: TrusteeStates) -> None:
    """cpu_up while the trustee still drains hands the pool back (RELEASE); down again while it
    releases keeps it draining. Works flow all along and run exactly once."""
    need_two_cpus()
    system = fresh_system()
    pool = system.cpu_pools[1]
    # cycle 0 goes down while a work of cpu1's pool is held: its trustee cannot have drained the
    # pool (and be DONE) before cpu_up, so it must hand the pool back (RELEASE). The later cycles
    # race the trustee freely: each may end either way.
    gate = threading.Event()
    held_on: list[str] = []

    def hold() -> None:
        worker = current_worker()
        held_on.append(worker.pool.name if worker else "?")
        with blocking():
            assert gate.wait(30), "never let go"

    holder = WorkQueue(f"hp-hold-{uuid.uuid4().hex[:6]}")
    try:
        assert holder.queue_work_on(1, Work(hold))
        wait_for("the held work to start", lambda: held_on)
        assert held_on == ["cpu1"]
        flow = Flow(20_000, {1}).start()
        wait_for("works queued on cpu1", lambda: flow.queued >= 1000)
        for cycle in range(30):
            system.cpu_down(1)
            if cycle % 3 == 0:
                wait_for("trustee in charge", lambda: pool.stats()["trustee_state"] != "START")
            system.cpu_up(1)
            if cycle == 0:
                wait_for("cycle 0's trustee to hand the pool back",
                         lambda: "RELEASE" in trustee_states.of("cpu1"))
            if cycle % 5 == 0:
                wait_for("trustee done", lambda: pool.stats()["trustee_state"] == "DONE")
            if cycle == 0:
                gate.set()
    finally:
        gate.set()
    holder.flush()
    flow.check(60)
    wait_for("cpu1's trustee DONE", lambda: pool.stats()["trustee_state"] == "DONE")
    assert pool.stats()["online"]
    # each trustee reports DONE once, after the pool's lock is dropped: wait for the last report
    wait_for("every trustee's DONE reported",
             lambda: trustee_states.of("cpu1").count("DONE") >= trustee_states.of("cpu1").count("START"))
    states = trustee_states.of("cpu1")
    assert states[:2] == ["START", "IN_CHARGE"], states
    assert states.count("DONE") == states.count("START"), states
    assert set(states) <= {"START", "IN_CHARGE", "BUTCHER", "RELEASE", "DONE"}, states
    wait_for("cpu1's pool has a worker", lambda: pool.stats()["nr_workers"] >= 1, timeout=5)
    for worker in pool_workers(pool):
        assert not worker.flags & ROGUE, worker
    if system.config.pin_workers:
        wait_for("cpu1's workers pinned to CPU 1",
                 lambda: all(os.sched_getaffinity(w.native_id) == {1}
                             for w in pool_workers(pool) if w.native_id and w.thread.is_alive()))
    with pool.lock:
        pool.check_invariants()  # with the trustee DONE it also checks nr_running exactly
    # and it still serves works queued from CPU 1
    again = Flow(500, {1}).start()
    again.check(30)


def test_trustee_takes_charge_after_the_timer_created_the_first_worker(
        fresh_system: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU goes down while the timer thread creates its online pool's first worker (cpu_up's own
    start failed): the trustee waits for the manager role and takes charge once the worker exists
    (whoever gives the manager role up notifies a waiting trustee)."""
    need_two_cpus()
    system = fresh_system()
    pool = system.cpu_pools[1]
    system.cpu_down(1)
    wait_for("cpu1's pool drained to no worker",
             lambda: pool.stats()["trustee_state"] == "DONE" and pool.stats()["nr_workers"] == 0)
    gate = threading.Event()
    timer_creating = threading.Event()
    real_create = Manager.create_worker

    def create_worker(self: Any, rogue: bool = False) -> Any:
        if self is pool.manager:
            if threading.current_thread().name != "cmwq-timer":
                raise WorkerCreationError("injected: cpu_up's direct start fails")
            timer_creating.set()
            assert gate.wait(30)
        return real_create(self, rogue)

    monkeypatch.setattr(Manager, "create_worker", create_worker)
    try:
        system.cpu_up(1)  # its start() fails: the timer thread creates the first worker
        assert timer_creating.wait(10), "the timer thread never created the first worker"
        with pool.lock:
            assert pool.managing and pool.online
        system.cpu_down(1)  # the trustee waits for the manager role
        wait_for("the trustee to wait for the manager role", lambda: pool.trustee.cond._waiters)
        gate.set()  # the first worker is created (not rogue: the pool was online) and the role freed
        wait_for("the trustee to take charge", lambda: pool.stats()["trustee_state"] != "START", timeout=5)
    finally:
        gate.set()
        monkeypatch.undo()
        system.cpu_up(1)  # RELEASE wakes a stuck trustee too
        wait_for("cpu1's trustee DONE", lambda: pool.stats()["trustee_state"] == "DONE")


def bad_affinity_workers(system: Any, offline: set[int]) -> list[tuple[str, int, set[int]]]:
    """Live worker threads whose CPU mask holds no online CPU."""
    bad = []
    for pool in system.pools:
        for worker in pool_workers(pool):
            if not worker.native_id:
                continue
            try:
                mask = os.sched_getaffinity(worker.native_id)
            except OSError:
                continue  # exited
            if not mask or mask <= offline:
                bad.append((pool.name, worker.native_id, mask))
    return bad


def test_real_cpu_hotplug_sysfs(fresh_system: Any, trustee_states: TrusteeStates) -> None:
    need_sysfs_hotplug()
    try:
        write_cpu1("1")  # a no-op write: tells whether the kernel lets us at all
    except OSError as exc:
        if in_ci():
            raise
        pytest.skip(f"writing {CPU1_ONLINE} failed: {exc}")
    system = fresh_system(hotplug=True, hotplug_poll_interval=0.02)
    pool = system.cpu_pools[1]
    flow = Flow(30_000, None).start()
    wait_for("works flowing", lambda: flow.queued >= 2000)
    queued_at_cycle = []
    try:
        for cycle in range(5):
            queued_at_cycle.append(flow.queued)
            write_cpu1("0")
            wait_for(f"cycle {cycle}: cpu1's pool offline", lambda: not pool.stats()["online"])
            # cpu_down unbinds the pool's workers at once; a worker starting right then binds
            # itself and is unbound by the trustee's next pass (trustee_cooldown): allow for that
            wait_for(f"cycle {cycle}: no worker bound only to offline CPUs",
                     lambda: not bad_affinity_workers(system, {1}), timeout=2.0)
            write_cpu1("1")
            wait_for(f"cycle {cycle}: cpu1's pool online", lambda: pool.stats()["online"])
    finally:
        write_cpu1("1")
    flow.check(90)
    assert queued_at_cycle[0] < flow.n, "the flow ended before the first cycle"
    assert read_cpu1() == "1"
    wait_for("cpu1's trustee DONE", lambda: pool.stats()["trustee_state"] == "DONE")
    assert pool.stats()["online"]
    assert trustee_states.of("cpu1").count("START") >= 1
    assert not bad_affinity_workers(system, set())
    if system.config.pin_workers:
        wait_for("cpu1's workers pinned to CPU 1 again",
                 lambda: all(os.sched_getaffinity(w.native_id) == {1}
                             for w in pool_workers(pool) if w.native_id and w.thread.is_alive()))
    for p in system.pools:
        with p.lock:
            p.check_invariants()


def test_process_affinity_change_takes_pool_down(fresh_system: Any) -> None:
    need_two_cpus()
    old = os.sched_getaffinity(os.getpid())
    system = fresh_system(hotplug=True, hotplug_poll_interval=0.02)
    pool = system.cpu_pools[1]
    flow = Flow(8000, {1}).start()
    try:
        wait_for("works queued on cpu1", lambda: flow.queued >= 1000)
        os.sched_setaffinity(os.getpid(), {0})
        wait_for("the monitor takes cpu1's pool down", lambda: not pool.stats()["online"], timeout=10)
        assert 1 not in system.usable
        flow.check(60)
        wait_for("cpu1's trustee DONE", lambda: pool.stats()["trustee_state"] == "DONE")
    finally:
        os.sched_setaffinity(os.getpid(), old)
    wait_for("the monitor brings cpu1's pool back", lambda: pool.stats()["online"], timeout=10)
    assert 1 in system.usable
    fut_pool: list[str] = []
    done = threading.Event()

    def probe() -> None:
        worker = current_worker()
        fut_pool.append(worker.pool.name if worker else "?")
        done.set()

    def from_cpu1() -> None:
        os.sched_setaffinity(0, {1})
        WorkQueue(f"hp-probe-{uuid.uuid4().hex[:6]}").queue_work(Work(probe))

    t = threading.Thread(target=from_cpu1)
    t.start()
    t.join(10)
    assert done.wait(10)
    assert fut_pool == ["cpu1"]
