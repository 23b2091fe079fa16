"""How a pool grows: it adopts the spare idle workers of other pools before it creates a thread,
and beyond ``unpaced_workers`` it paces creation, letting runners that come back take the works,
without ever leaving a work stranded while every worker sleeps."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import invariants_sampled, need_two_cpus, registered, wait_for

from cmwq_exec import Work, WorkQueue, blocking, hookimpl
from cmwq_exec.core.pacing import sleepers_due
from cmwq_exec.core.pool import WorkerPool
from cmwq_exec.core.worker import IDLE, SLEEP_AVG_WEIGHT, SLEEPING

pytestmark = pytest.mark.timeout(60)


def hold_on(wq: WorkQueue, cpu: int, n: int, gate: threading.Event) -> list[tuple[int, frozenset[int]]]:
    """Queue ``n`` works on ``cpu``'s pool that note their thread and the CPUs it may run on, then
    wait in blocking() for ``gate``; return their notes once all ``n`` run."""
    seen: list[tuple[int, frozenset[int]]] = []

    def hold() -> None:
        seen.append((threading.get_ident(), frozenset(os.sched_getaffinity(0))))
        with blocking():
            assert gate.wait(30), "gate never opened"

    for _ in range(n):
        assert wq.queue_work_on(cpu, Work(hold))
    wait_for(f"{n} works running on cpu{cpu}", lambda: len(seen) == n)
    return seen


def let_go(wq: WorkQueue, gate: threading.Event, quiesce: Callable[..., None]) -> None:
    """Open ``gate``, wait for the workqueue's works, and for the pools to settle."""
    gate.set()
    wq.flush()
    quiesce()


def test_a_pool_adopts_spare_idle_workers_instead_of_creating_threads(
        fresh_system: Callable[..., Any], quiesce: Callable[..., None],
        release: Callable[[threading.Event], threading.Event]) -> None:
    need_two_cpus()
    system = fresh_system(idle_timeout=600.0)  # pool 0's idle workers stay for the test
    pool0, pool1 = system.cpu_pools[0], system.cpu_pools[1]
    wq = WorkQueue("adopt")
    first, second = release(threading.Event()), release(threading.Event())
    seen0 = hold_on(wq, 0, 12, first)
    let_go(wq, first, quiesce)
    threads = system.nr_threads
    with pool0.lock:
        spare = pool0.nr_idle - 2
    assert spare >= 10

    class Creations:
        """The events that say a thread was created."""

        def __init__(self) -> None:
            self.seen: list[str] = []

        @hookimpl
        def cmwq_worker_created(self, pool: Any, worker: Any) -> None:
            self.seen.append(f"worker_created {pool.name}")

        @hookimpl
        def cmwq_manager_ran(self, pool: Any, created: int, destroyed: int) -> None:
            if created:
                self.seen.append(f"manager_ran created={created} {pool.name}")

    with registered(Creations(), "creations") as creations:
        seen1 = hold_on(wq, 1, 8, second)
    assert creations.seen == []  # adopting is not creating
    # cpu1's pool needed 8 busy workers and a spare idle one: it took them from cpu0's idle ones
    assert system.nr_threads == threads
    with pool1.lock:
        assert pool1.manager.nr_adopted >= 8
        pool1.check_invariants()
    with pool0.lock:
        assert pool0.manager.nr_given == pool1.manager.nr_adopted
        assert pool0.nr_idle >= 2  # a pool keeps two idle workers of its own
        pool0.check_invariants()
    # an adopted worker binds itself to its new pool's CPU before it runs a work there
    assert {cpus for _, cpus in seen0} == {frozenset({0})}
    assert {cpus for _, cpus in seen1} == {frozenset({1})}
    assert {thread for thread, _ in seen1} & {thread for thread, _ in seen0}
    let_go(wq, second, quiesce)
    assert system.nr_threads == threads
    # idle ones too: the adopter binds a worker as it adopts it, not only when it wakes
    for pool, cpu in ((pool0, 0), (pool1, 1)):
        with pool.lock:
            workers = list(pool.workers)
        assert all(os.sched_getaffinity(w.native_id) == {cpu} for w in workers), pool


def test_life_cycle_events_account_for_every_worker_of_every_pool(
        fresh_system: Callable[..., Any], quiesce: Callable[..., None],
        release: Callable[[threading.Event], threading.Event]) -> None:
    """A plugin that counts each pool's workers from ``cmwq_worker_created``,
    ``cmwq_worker_destroyed`` and ``cmwq_worker_adopted`` agrees with every pool once idle workers
    moved between pools: an adoption says from which pool to which."""
    need_two_cpus()

    class Counts:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.workers: dict[Any, int] = {}  # pool -> workers, from the events alone
            self.adopted: list[tuple[Any, Any]] = []  # (pool, donor)

        def add(self, pool: Any, n: int) -> None:
            with self.lock:
                self.workers[pool] = self.workers.get(pool, 0) + n

        @hookimpl
        def cmwq_worker_created(self, pool: Any, worker: Any) -> None:
            self.add(pool, 1)

        @hookimpl
        def cmwq_worker_destroyed(self, pool: Any, worker: Any, reason: str) -> None:
            self.add(pool, -1)

        @hookimpl
        def cmwq_worker_adopted(self, pool: Any, worker: Any, donor: Any) -> None:
            assert worker.pool is pool and donor is not pool
            self.add(donor, -1)
            self.add(pool, 1)
            with self.lock:
                self.adopted.append((pool, donor))

    with registered(Counts(), "counts") as counts:
        system = fresh_system(idle_timeout=600.0)  # nothing reaped: only adoption moves workers
        pool0, pool1 = system.cpu_pools[0], system.cpu_pools[1]
        wq = WorkQueue("accounted")
        first, second = release(threading.Event()), release(threading.Event())
        hold_on(wq, 0, 12, first)
        let_go(wq, first, quiesce)
        hold_on(wq, 1, 8, second)
        let_go(wq, second, quiesce)
        with counts.lock:
            adopted = list(counts.adopted)
            workers = dict(counts.workers)
        for pool in system.pools:
            with pool.lock:
                assert workers.get(pool, 0) == pool.nr_workers, pool.name
        with pool1.lock:
            assert pool1.manager.nr_adopted >= 8
            assert adopted == [(pool1, pool0)] * pool1.manager.nr_adopted


def test_pacing_still_gives_every_work_a_worker_when_none_comes_back(
        fresh_system: Callable[..., Any], quiesce: Callable[..., None]) -> None:
    """Works that only finish once all of them run at once: every worker sleeps until the last
    one starts. Beyond ``unpaced_workers`` the pool creates them one per interval; none is lost."""
    system = fresh_system(unpaced_workers=2, create_interval=0.002)
    n = 24
    barrier = threading.Barrier(n)

    def meet() -> None:
        with blocking():
            barrier.wait(30)

    wq = WorkQueue("paced")
    works = [Work(meet) for _ in range(n)]
    for work in works:
        assert wq.queue_work_on(0, work)
    wq.flush()
    assert not barrier.broken
    pool = system.cpu_pools[0] if 0 in system.cpu_pools else system.online_pools[0]
    with pool.lock:
        assert pool.nr_workers + pool.manager.nr_given - pool.manager.nr_adopted >= n
    quiesce()


def test_pacing_lets_a_runner_that_comes_back_take_the_work(
        fresh_system: Callable[..., Any], release: Callable[[threading.Event], threading.Event]) -> None:
    """All workers asleep and a work pending, but a runner came back within the interval: the pool
    waits another interval rather than create a thread, and creates one when nothing comes back."""
    system = fresh_system(unpaced_workers=2, create_interval=1.5, watchdog_tick=3600.0)
    cpu = min(system.cpu_pools)
    pool = system.cpu_pools[cpu]
    wq = WorkQueue("gate")
    gate_a, gate_b, gate_c = (release(threading.Event()) for _ in range(3))
    started: list[str] = []
    ran_d = threading.Event()

    def hold(name: str, gate: threading.Event) -> Callable[[], None]:
        def run() -> None:
            started.append(name)
            with blocking():
                assert gate.wait(30)
        return run

    assert wq.queue_work_on(cpu, Work(hold("a", gate_a)))
    assert wq.queue_work_on(cpu, Work(hold("b", gate_b)))
    wait_for("a and b asleep", lambda: len(started) == 2)
    with pool.lock:
        workers = pool.nr_workers
        assert pool.pacer.timer is not None  # the pool is at unpaced_workers with nobody idle
    assert wq.queue_work_on(cpu, Work(hold("c", gate_c)))
    assert wq.queue_work_on(cpu, Work(ran_d.set))
    gate_a.set()  # a's runner comes back and takes c, which sleeps too; d still waits
    wait_for("c started", lambda: "c" in started)
    assert ran_d.wait(20), "d never ran: the paced creation did not come"
    with pool.lock:
        assert pool.pacer.nr_paced >= 1  # the first interval saw a's runner come back
        assert pool.nr_workers == workers + 1
    gate_b.set()
    gate_c.set()
    wq.flush()


def _pool_that_learned(fresh_system: Callable[..., Any], sleep: float,
                       learn: int) -> tuple[Any, int, WorkerPool, WorkQueue]:
    """Fresh pools pacing from the third worker, with a long hold cap and no watchdog; ``learn``
    works sleep ``sleep`` seconds in blocking() on one CPU pool, which learns that average."""
    system = fresh_system(unpaced_workers=2, create_interval=0.001, create_hold_max=5.0,
                          watchdog_tick=3600.0)
    cpu = min(system.cpu_pools)
    pool = system.cpu_pools[cpu]
    wq = WorkQueue("learned")

    def nap() -> None:
        with blocking():
            time.sleep(sleep)

    for _ in range(learn):
        assert wq.queue_work_on(cpu, Work(nap))
    wq.flush()
    return system, cpu, pool, wq


def test_pacing_waits_for_sleepers_due_back_then_creates(
        fresh_system: Callable[..., Any], release: Callable[[threading.Event], threading.Event]) -> None:
    """A pool learns how long its sleeps last. While at least half of its busy workers fell asleep
    within twice that, it adds no thread (they are due back); works that wait for each other
    outlive the window and then get a worker each, one per interval, so nothing stalls."""
    learn = 16
    system, cpu, pool, wq = _pool_that_learned(fresh_system, 0.25, learn)
    with pool.lock:
        # every measured sleep lasted at least 0.25 s; the average started at 0
        assert pool.sleep_avg >= 0.25 * (1 - (1 - SLEEP_AVG_WEIGHT) ** learn) - 1e-9, pool.sleep_avg
        window = min(2 * pool.sleep_avg, system.config.create_hold_max)
        workers, paced, adopted = pool.nr_workers, pool.pacer.nr_paced, pool.manager.nr_adopted
    assert workers >= 2

    n = workers + 4  # more works than workers: the last four need created workers
    gate = release(threading.Event())
    started: list[float] = []
    lock = threading.Lock()

    def meet() -> None:
        with lock:
            started.append(time.monotonic())
            if len(started) == n:
                gate.set()
        with blocking():
            assert gate.wait(30), "not every work got a worker"

    for _ in range(n):
        assert wq.queue_work_on(cpu, Work(meet))
    wq.flush()
    with pool.lock:
        assert pool.manager.nr_adopted == adopted  # every extra worker was created here
        assert pool.nr_workers >= n
        assert pool.pacer.nr_paced > paced
    # no worker was created before the first sleeper of the wave had slept for the whole window
    assert started[workers] - started[0] >= window, (started[workers] - started[0], window)


def test_works_waiting_for_each_other_get_workers_without_a_hold_per_wave(
        fresh_system: Callable[..., Any], release: Callable[[threading.Event], threading.Event]) -> None:
    """Once the sleepers of a wave outlive the window with none coming back, the learned average is
    stale: the workers created for the rest of the waiting works are not held again, however many
    of them are young sleepers (they wait for each other too). Checked on every decision the
    pacing timer takes, not on timing: a hold is decided only while no sleeper is overdue."""
    system, cpu, pool, wq = _pool_that_learned(fresh_system, 0.1, 16)
    with pool.lock:
        workers = pool.nr_workers

    decisions: list[tuple[float, list[float], float]] = []  # (due, sleepers' slept_at, window)
    sleepers_due = pool.pacer.sleepers_due

    def spy(now: float) -> float:  # called by the pacing timer under pool.lock
        due = sleepers_due(now)
        window = min(2 * pool.sleep_avg, system.config.create_hold_max)
        decisions.append((due - now, [w.slept_at for w in pool.workers if w.flags & SLEEPING],
                          now - window))
        return due

    pool.pacer.sleepers_due = spy  # type: ignore[method-assign]
    n = 2 * workers + 8  # the second wave alone is more than half of the busy workers
    gate = release(threading.Event())
    count = [0]
    lock = threading.Lock()

    def meet() -> None:
        with lock:
            count[0] += 1
            if count[0] == n:
                gate.set()
        with blocking():
            assert gate.wait(30), "not every work got a worker"

    try:
        for _ in range(n):
            assert wq.queue_work_on(cpu, Work(meet))
        wq.flush()
    finally:
        del pool.pacer.sleepers_due
    holds = [(slept, cutoff) for wait, slept, cutoff in decisions if wait > 0]
    assert holds, "the first wave was not held: nothing tested"
    for slept, cutoff in holds:
        assert min(slept) > cutoff, "held while a sleeper was overdue and none had come back"
    assert len(decisions) > len(holds), "creation never went on after the hold"


def _pool_with_sleepers(slept_at: list[float], busy: int, avg: float, hold_max: float = 0.05,
                        woke_at: float = 0.0) -> Any:
    """The fields sleepers_due() reads: ``busy`` busy workers, the first len(slept_at) asleep."""
    workers = [SimpleNamespace(flags=SLEEPING, slept_at=at) for at in slept_at]
    workers += [SimpleNamespace(flags=0, slept_at=0.0) for _ in range(busy - len(slept_at))]
    workers.append(SimpleNamespace(flags=IDLE, slept_at=0.0))
    return SimpleNamespace(sleep_avg=avg, woke_at=woke_at, system=SimpleNamespace(config=SimpleNamespace(
        create_hold_max=hold_max)), nr_workers=busy + 1, nr_idle=1, workers=workers)


def test_sleepers_due_holds_while_half_the_busy_workers_are_young_sleepers() -> None:
    """The hold's arithmetic: young means asleep for less than twice the average sleep (capped);
    the hold lasts until fewer than half of the busy workers (rounded up) are young. The answer
    comes when the oldest young sleeper turns overdue, which may end the hold (next test)."""
    due = sleepers_due
    starts = [100.000, 100.001, 100.002, 100.003]
    assert due(_pool_with_sleepers(starts, 4, avg=0.0), 100.004) == 0.0  # nothing measured yet
    pool = _pool_with_sleepers(starts, 4, avg=0.010)  # window 20 ms; 2 young needed of 4 busy
    assert due(pool, 100.004) == pytest.approx(100.020)  # the oldest turns 20 ms old: ask again
    pool.woke_at = 100.0205  # a sleeper came back meanwhile: the average is not stale
    assert due(pool, 100.0205) == pytest.approx(100.022)  # the 2nd youngest turns 20 ms old
    assert due(pool, 100.0215) == pytest.approx(100.022)  # same answer with 2 young left
    assert due(pool, 100.0225) == 0.0  # one young sleeper left: create
    assert due(_pool_with_sleepers(starts, 5, avg=0.010), 100.004) == pytest.approx(100.020)  # need 3
    assert due(_pool_with_sleepers(starts[:1], 4, avg=0.010), 100.004) == 0.0  # 1 young of 4 busy
    capped = _pool_with_sleepers(starts, 4, avg=1.0, hold_max=0.05)  # window capped at 50 ms
    assert due(capped, 100.004) == pytest.approx(100.050)


def test_sleepers_due_holds_nothing_once_a_sleeper_is_overdue_and_none_came_back() -> None:
    """Sleepers that outlive the window while none returns (works waiting for each other) show
    that the learned average is stale: no hold then, however many young sleepers there are; a
    return within the window restores the hold for at most a window after that return."""
    due = sleepers_due
    # one sleeper since 100.000 (overdue at 100.030), three young ones of a new wave; 4 busy
    starts = [100.000, 100.025, 100.026, 100.027]
    assert due(_pool_with_sleepers(starts, 4, avg=0.010, woke_at=99.999), 100.030) == 0.0
    back = _pool_with_sleepers(starts, 4, avg=0.010, woke_at=100.015)
    assert due(back, 100.030) == pytest.approx(100.035)  # the return ages past the window
    assert due(back, 100.035) == 0.0
    # without the overdue sleeper the same young wave is held, asked again when its oldest ages
    young = _pool_with_sleepers(starts[1:], 4, avg=0.010, woke_at=99.999)
    assert due(young, 100.030) == pytest.approx(100.045)


def test_adoption_pacing_and_reaping_race_under_load(
        fresh_system: Callable[..., Any], quiesce: Callable[..., None]) -> None:
    """Bursts of blocking works queued on every pool from several threads at once, with pacing
    from the fifth worker, idle workers reaped after 20 ms and adopted across pools meanwhile:
    every work runs once, the invariants hold whenever sampled, and at rest every worker is
    bound to its pool's CPU."""
    system = fresh_system(unpaced_workers=4, create_interval=0.0005, idle_timeout=0.02)
    cpus = sorted(system.cpu_pools)
    wq = WorkQueue("churn")
    ran: list[int] = []

    def nap(i: int) -> None:
        with blocking():
            time.sleep(0.001 + (i % 7) * 0.001)
        ran.append(i)

    def submitter(first: int) -> None:
        for burst in range(6):
            cpu = cpus[(first + burst) % len(cpus)]
            for i in range(first * 1000 + burst * 100, first * 1000 + burst * 100 + 100):
                assert wq.queue_work_on(cpu, Work(nap, i))
            wq.flush()

    with invariants_sampled(system.pools):
        submitters = [threading.Thread(target=submitter, args=(k,)) for k in range(3)]
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join(45)
        wq.flush()
    assert sorted(ran) == sorted(k * 1000 + n for k in range(3) for n in range(600))
    quiesce()
    adopted = sum(pool.manager.nr_adopted for pool in system.pools)
    given = sum(pool.manager.nr_given for pool in system.pools)
    assert adopted == given
    if system.config.pin_workers and len(cpus) > 1:
        for cpu in cpus:
            pool = system.cpu_pools[cpu]
            with pool.lock:
                workers = [w for w in pool.workers if w.native_id]
            assert all(os.sched_getaffinity(w.native_id) == {cpu} for w in workers), pool
