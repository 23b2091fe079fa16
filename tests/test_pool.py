"""Worker pools: invariants, batching by a single runner, the spare idle worker, reaping, handing over
when a runner blocks, and progress through the rescuer when no worker can be created."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import cannot_start_thread, hold_works, invariants_sampled, wait_for

import cmwq_exec
from cmwq_exec import WQ, CMWQExecutor, Work, WorkQueue, blocking
from cmwq_exec.core.system import usable_cpus
from cmwq_exec.core.worker import RESCUER, current_worker

pytestmark = pytest.mark.timeout(60)


def settled(pool: Any) -> bool:
    """No manager at work and a spare idle worker ready (worker counts are stable)."""
    with pool.lock:
        return not pool.managing and pool.nr_idle >= 1 and not pool.worklist


# -- invariants -------------------------------------------------------------------------------------


def test_invariants_at_quiescence(executor: CMWQExecutor, quiesce: Callable[..., None]) -> None:
    def nap(_: int) -> None:
        with blocking():
            time.sleep(0.001)

    futures = [executor.submit(nap if i % 10 == 0 else int, i) for i in range(500)]
    for future in futures:
        future.result(timeout=30)
    quiesce()
    for pool in cmwq_exec.get_system().pools:
        with pool.lock:
            assert pool.nr_idle == pool.nr_workers == len(pool.workers)


def test_invariants_sampled_during_load(make_executor: Callable[..., CMWQExecutor],
                                        quiesce: Callable[..., None]) -> None:
    def nap(_: int) -> None:
        with blocking():
            time.sleep(0.002)

    with invariants_sampled(cmwq_exec.get_system().pools):
        executors = [make_executor(), make_executor(unbound=True), make_executor(max_workers=3)]
        futures = []
        for i in range(3000):
            ex = executors[i % 3]
            futures.append(ex.submit(nap if i % 25 == 0 else int, i))
        for future in futures:
            future.result(timeout=30)
    quiesce()


# -- batching ---------------------------------------------------------------------------------------


def test_single_runner_drains_a_batch(no_watchdog: Any, quiesce: Callable[..., None]) -> None:
    """Works queued on a pool while its only runner is busy do not wake anyone: that runner drains
    them all afterwards, and nr_running stays 1 (the kernel's batching)."""
    wq = WorkQueue("batch")
    records: list[tuple[int, int, Any]] = []
    batch_thread: list[int] = []

    def noop() -> None:
        worker = current_worker()
        assert worker is not None
        with worker.pool.lock:
            records.append((threading.get_ident(), worker.pool.nr_running, worker.pool))

    def batch() -> None:
        batch_thread.append(threading.get_ident())
        for _ in range(300):
            wq.queue_work(Work(noop))

    wq.queue_work(Work(batch))
    wq.drain()  # not flush(): the noops are queued after it began, so it need not wait for them
    assert len(records) == 300
    assert {n for _, n, _ in records} == {1}, "another runner joined a pure no-op batch"
    assert {t for t, _, _ in records} == set(batch_thread), "the batch was not drained by its runner"
    assert len({p for _, _, p in records}) == 1
    quiesce()


def test_nr_running_at_most_one_for_noop_work(no_watchdog: Any, executor: CMWQExecutor) -> None:
    """Pure no-op work submitted from outside: each pool never has more than one runner, and every
    worker that runs one is counted. The executor's rescuer is the one runner that is never
    counted (as in the kernel): on a busy machine a worker's creation can outlast the mayday
    timeout, and the rescuer then runs works on a pool that may have no counted runner."""
    def record() -> tuple[bool, int]:
        worker = current_worker()
        assert worker is not None
        with worker.pool.lock:
            return bool(worker.flags & RESCUER), worker.pool.nr_running

    by_workers: set[int] = set()
    for _ in range(20):  # the rescuer may run a whole round while workers are slow to start
        futures = [executor.submit(record) for _ in range(3000)]
        seen = {f.result(timeout=30) for f in futures}
        by_workers |= {nr_running for rescuer, nr_running in seen if not rescuer}
        if by_workers:
            break
    assert by_workers == {1}, "more than one runner (or an uncounted one) on a pool for no-op work"


# -- the spare idle worker and reaping ------------------------------------------------------------


def test_manager_keeps_an_idle_worker_ready(reset_system: Callable[..., Any],
                                            release: Callable[[threading.Event], threading.Event],
                                            quiesce: Callable[..., None]) -> None:
    system = reset_system()
    wq = WorkQueue("spare", WQ.UNBOUND)
    pool = system.unbound_pool
    wait_for("the unbound pool's first worker", lambda: settled(pool) and pool.nr_workers == 1)
    gate = release(threading.Event())
    _, started = hold_works(wq, 1, gate)
    wait_for("started() == 1", lambda: started() == 1)
    # the last idle worker made another one before it started working
    wait_for("a spare idle worker", lambda: settled(pool))
    with pool.lock:
        assert pool.nr_workers == 2 and pool.nr_idle == 1
        pool.check_invariants()
    gate.set()
    wq.flush()
    quiesce([pool])
    with pool.lock:
        assert pool.nr_idle == pool.nr_workers >= 1


def test_one_idle_worker_kept_after_work(executor: CMWQExecutor, quiesce: Callable[..., None]) -> None:
    def nap() -> None:
        with blocking():
            time.sleep(0.01)

    for future in [executor.submit(nap) for _ in range(20)]:
        future.result(timeout=30)
    quiesce()  # asserts nr_idle >= 1 on every started pool


def test_idle_workers_reaped_after_idle_timeout(reset_system: Callable[..., Any],
                                                release: Callable[[threading.Event], threading.Event],
                                                quiesce: Callable[..., None]) -> None:
    timeout = 0.2
    system = reset_system(idle_timeout=timeout)
    pool = system.unbound_pool
    wq = WorkQueue("reap", WQ.UNBOUND)
    gate = release(threading.Event())
    _, started = hold_works(wq, 8, gate)
    wait_for("8 blocked works and a spare worker", lambda: started() == 8 and settled(pool))
    with pool.lock:
        peak = pool.nr_workers
        assert peak >= 9
    t0 = time.monotonic()
    gate.set()
    wq.flush()
    first_drop = None
    deadline = time.monotonic() + 10
    while True:
        with pool.lock:
            nr = pool.nr_workers
        if nr < peak and first_drop is None:
            first_drop = time.monotonic()
        if nr == 2:
            break
        assert time.monotonic() < deadline, f"idle workers not reaped: {pool!r}"
        time.sleep(0.002)
    assert first_drop is not None and first_drop - t0 >= timeout, "a worker was reaped before idle_timeout"
    quiesce([pool])
    with pool.lock:
        assert pool.nr_idle == pool.nr_workers == 2  # the kernel keeps two idle workers


def test_each_idle_worker_gets_its_full_idle_timeout(
        reset_system: Callable[..., Any],
        release: Callable[[threading.Event], threading.Event], quiesce: Callable[..., None]) -> None:
    """Workers that went idle later are not reaped with the earlier ones: the idle timer re-arms for
    the next expiry instead of reaping everyone beyond the ratio at once."""
    timeout = 0.2
    system = reset_system(idle_timeout=timeout)
    pool = system.unbound_pool
    wq = WorkQueue("reap-late", WQ.UNBOUND)
    gate_a = release(threading.Event())
    gate_b = release(threading.Event())
    _, started_a = hold_works(wq, 4, gate_a)
    wait_for("started_a() == 4 and settled(pool)", lambda: started_a() == 4 and settled(pool))
    _, started_b = hold_works(wq, 4, gate_b)
    wait_for("started_b() == 4 and settled(pool)", lambda: started_b() == 4 and settled(pool))
    gate_a.set()
    time.sleep(timeout / 2)  # the second group goes idle half a timeout after the first
    t_b = time.monotonic()
    gate_b.set()
    low = None
    while True:
        with pool.lock:
            nr = pool.nr_workers
        read_by = time.monotonic()
        if read_by >= t_b + timeout:
            break
        low = nr if low is None else min(low, nr)
        time.sleep(0.001)
    # the 4 workers of the second group went idle after t_b: none may be gone before t_b + timeout
    assert low is not None and low >= 4, f"{4 - low} workers reaped before their idle_timeout"
    wait_for("reaping down to two idle workers", lambda: pool.nr_workers == 2)
    quiesce([pool])


def test_reaping_keeps_idle_workers_in_ratio_to_busy_ones(
        reset_system: Callable[..., Any],
        release: Callable[[threading.Event], threading.Event], quiesce: Callable[..., None]) -> None:
    """With 8 busy workers, idle ones are reaped down to 3: (3 - 2) * 4 < 8 <= (4 - 2) * 4."""
    system = reset_system(idle_timeout=0.1)
    pool = system.unbound_pool
    wq = WorkQueue("ratio", WQ.UNBOUND)
    gate_a = release(threading.Event())
    gate_b = release(threading.Event())
    _, started_a = hold_works(wq, 8, gate_a)
    wait_for("started_a() == 8 and settled(pool)", lambda: started_a() == 8 and settled(pool))
    _, started_b = hold_works(wq, 8, gate_b)
    wait_for("started_b() == 8 and settled(pool)", lambda: started_b() == 8 and settled(pool))
    gate_a.set()

    def ratio_reached() -> bool:
        with pool.lock:
            return pool.nr_workers - pool.nr_idle == 8 and pool.nr_idle == 3

    wait_for("idle workers reaped down to 3 beside 8 busy ones", ratio_reached)
    # and not below: wait past two more idle timeouts
    time.sleep(0.25)
    assert ratio_reached()
    gate_b.set()
    wq.flush()
    wait_for("reaping down to two idle workers", lambda: pool.nr_workers == 2)
    quiesce([pool])


# -- concurrency management: handing over -----------------------------------------------------------


def test_blocking_hands_over_to_another_worker(no_watchdog: Any,
                                               release: Callable[[threading.Event], threading.Event],
                                               quiesce: Callable[..., None]) -> None:
    """Two works on one per-CPU pool: the first waits inside blocking() for an Event the second
    sets. blocking() takes the first out of nr_running, so the pool wakes a worker for the second."""
    wq = WorkQueue("handover")
    event = release(threading.Event())
    info: dict[str, Any] = {}

    def second() -> None:
        worker = current_worker()
        assert worker is not None
        info["second"] = (worker.pool, threading.get_ident())
        event.set()

    def first() -> None:
        worker = current_worker()
        assert worker is not None
        with worker.pool.lock:
            info["cm_wakeups_before"] = worker.pool.cm_wakeups
        info["first"] = (worker.pool, threading.get_ident())
        wq.queue_work(Work(second))  # from a worker: same pool
        with blocking():
            info["set"] = event.wait(10)

    before = wq.stats()["cm_wakeups"]
    wq.queue_work(Work(first))
    wq.flush()
    assert info["set"], "the second work never ran while the first slept in blocking()"
    pool, first_thread = info["first"]
    assert pool.cpu is not None
    assert info["second"][0] is pool
    assert info["second"][1] != first_thread
    with pool.lock:
        assert pool.cm_wakeups > info["cm_wakeups_before"]
    assert wq.stats()["cm_wakeups"] > before
    quiesce()


def test_cm_wakeups_grow_with_each_handover(no_watchdog: Any, executor: CMWQExecutor) -> None:
    pools = cmwq_exec.get_system().pools
    before = sum(p.stats()["cm_wakeups"] for p in pools)

    def pair() -> None:
        event = threading.Event()
        helper = executor.submit(event.set)
        with blocking():
            assert event.wait(10)
        helper.result()

    for future in [executor.submit(pair) for _ in range(10)]:
        future.result(timeout=30)
    assert sum(p.stats()["cm_wakeups"] for p in pools) >= before + 1


def test_pool_stats_is_a_snapshot(executor: CMWQExecutor, quiesce: Callable[..., None]) -> None:
    executor.submit(int).result(timeout=10)
    quiesce()
    for pool in cmwq_exec.get_system().pools:
        stats = pool.stats()
        assert stats["pool"] == pool.name and stats["cpu"] == pool.cpu
        assert stats["nr_running"] == 0 and stats["nr_pending"] == 0
        assert stats["nr_idle"] == stats["nr_workers"]
        assert stats["managing"] is False
        for key in ("cm_wakeups", "cpu_intensive", "mayday"):
            assert isinstance(stats[key], int) and stats[key] >= 0


# -- when no worker can be created ----------------------------------------------------------------


def test_rescuer_runs_works_when_worker_creation_fails(reset_system: Callable[..., Any],
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       quiesce: Callable[..., None]) -> None:
    system = reset_system(create_cooldown=0.05)
    wq = WorkQueue("rescued", WQ.UNBOUND | WQ.RESCUER)
    pool = system.unbound_pool
    wait_for("settled(pool) and pool.nr_workers == 1", lambda: settled(pool) and pool.nr_workers == 1)
    monkeypatch.setattr("cmwq_exec.core.worker.start_thread", cannot_start_thread)
    ran: list[str] = []
    for _ in range(3):
        wq.queue_work(Work(lambda: ran.append(threading.current_thread().name)))
    wait_for("works to run although no worker can be created", lambda: len(ran) == 3)
    assert any(name.startswith("cmwq/rescuer:") for name in ran), ran
    monkeypatch.undo()
    stats = wq.stats()
    assert stats["rescued"] >= 1 and stats["mayday"] >= 1
    assert pool.stats()["mayday"] >= 1
    wq.flush()
    quiesce([pool])
    # and the pool recovers: works run on regular workers again (a work queued while the new
    # worker is still starting may be rescued once more, if starting it outlasts the mayday timeout)
    def runs_on_a_worker() -> bool:
        names: list[str] = []
        wq.queue_work(Work(lambda: names.append(threading.current_thread().name)))
        wq.flush()
        return names[0].startswith("cmwq/unbound:")

    wait_for("a work to run on a regular worker again", runs_on_a_worker)


def test_worker_cap_is_respected_and_works_still_progress(
        reset_system: Callable[..., Any],
        release: Callable[[threading.Event], threading.Event], quiesce: Callable[..., None]) -> None:
    cap = len(usable_cpus()) + 2  # one worker per CPU pool, the unbound pool's first and its spare
    system = reset_system(max_total_workers=cap, create_cooldown=0.05)
    wq = WorkQueue("capped", WQ.UNBOUND | WQ.RESCUER)
    pool = system.unbound_pool
    gate = release(threading.Event())
    # the holder's workqueue has no rescuer, so it holds a regular worker however slowly threads start
    holder = WorkQueue("holder", WQ.UNBOUND)
    _, started = hold_works(holder, 1, gate)
    wait_for("started() == 1 and settled(pool)", lambda: started() == 1 and settled(pool))
    assert system.nr_threads == cap
    ran: list[str] = []
    for _ in range(3):
        wq.queue_work(Work(lambda: ran.append(threading.current_thread().name)))
    wait_for("works to progress at the worker cap (via the rescuer)", lambda: len(ran) == 3)
    assert system.nr_threads <= cap
    assert all(name.startswith("cmwq/rescuer:") for name in ran), ran
    gate.set()
    wq.flush()
    holder.flush()
    quiesce([pool])
    assert system.nr_threads <= cap


def test_per_cpu_pools_pin_their_workers(executor: CMWQExecutor) -> None:
    system = cmwq_exec.get_system()
    if not system.config.pin_workers:
        pytest.skip("pinning disabled by configuration")

    def where() -> tuple[Any, set[int]]:
        worker = current_worker()
        assert worker is not None
        return worker.pool.cpu, os.sched_getaffinity(0)

    for future in [executor.submit(where) for _ in range(200)]:
        cpu, mask = future.result(timeout=10)
        assert cpu is not None and mask == {cpu}


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize("batch", [True, False])
def test_workers_and_rescuers_run_under_sched_batch_unless_told_not_to(
        fresh_system: Callable[..., Any], batch: bool) -> None:
    """batch_workers (default True): every worker and rescuer thread is SCHED_BATCH, so that a
    woken worker does not preempt the thread that woke it (and holds the GIL)."""
    fresh_system(batch_workers=batch)
    wanted = os.SCHED_BATCH if batch else os.SCHED_OTHER
    with CMWQExecutor() as ex, CMWQExecutor(unbound=True) as unbound:
        policies = {f.result(timeout=10) for f in [*(ex.submit(os.sched_getscheduler, 0) for _ in range(20)),
                                                   unbound.submit(os.sched_getscheduler, 0)]}
        rescuer = ex.workqueue._rescuer
        assert rescuer is not None
        wait_for("the rescuer thread to start", lambda: rescuer.worker.native_id)
        wait_for("the rescuer's policy", lambda: os.sched_getscheduler(rescuer.worker.native_id) == wanted)
    assert policies == {wanted}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own thread is left alone


# -- a worker that dies ---------------------------------------------------------------------------

DYING_WORKER_SCRIPT = r"""
import os, sys, threading, time
import concurrent.futures as cf
from cmwq_exec import CMWQExecutor
from cmwq_exec.core.worker import IDLE, current_worker

ex = CMWQExecutor()
gate = threading.Event()
pools = []

def first():
    pools.append(current_worker().pool)
    gate.wait(5)

future = ex.submit(first)
# a done callback runs on the worker that completes the call; a BaseException escapes it
future.add_done_callback(lambda f: sys.exit(3))
while not pools:
    time.sleep(0.001)
gate.set()
pool = pools[0]
deadline = time.monotonic() + 5
while time.monotonic() < deadline:  # until its worker is back (or dead)
    with pool.lock:
        if future.done() and (pool.nr_running == 0 or any(not w.thread.is_alive() for w in pool.workers)):
            break
    time.sleep(0.001)

results = []
def submit_on(cpu):
    os.sched_setaffinity(0, {cpu})  # this thread only: its works go to that CPU's pool
    results.extend(ex.submit(int, i) for i in range(20))

t = threading.Thread(target=submit_on, args=(pool.cpu,))
t.start()
t.join()
try:
    total = sum(f.result(timeout=3) for f in results)
except cf.TimeoutError:
    total = None
with pool.lock:
    dead = [w for w in pool.workers if not w.thread.is_alive()]
    print("result", total, "dead", len(dead), "running", pool.nr_running, flush=True)
os._exit(0)
"""


def test_a_dying_worker_does_not_wedge_its_pool() -> None:
    proc = subprocess.run([sys.executable, "-c", DYING_WORKER_SCRIPT], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "CMWQ_WATCHDOG_TICK": "3600"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["result", "190", "dead", "0", "running", "0"], proc.stdout
