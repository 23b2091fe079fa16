"""Works and workqueues: the pending bit, non-reentrancy, cancel, flush, delayed works, drain,
max_active, ordered workqueues, destroy, argument checking and counters."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import Concurrency, hold_works, napper, wait_for

from cmwq_exec import WQ, CMWQExecutor, DelayedWork, Work, WorkQueue, blocking
from cmwq_exec.core.worker import current_worker

pytestmark = pytest.mark.timeout(60)

Release = Callable[[threading.Event], threading.Event]


class Gate:
    """A work that waits inside blocking() until opened, telling when it started."""

    def __init__(self, release: Release) -> None:
        self.started = threading.Event()
        self.open = release(threading.Event())
        self.runs = 0
        self.work = Work(self.run)

    def run(self) -> None:
        self.runs += 1
        self.started.set()
        with blocking():
            assert self.open.wait(30), "gate never opened"


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, threading.Event, list[Any]]:
    """Run ``fn`` in a thread; return the thread, an Event set when fn returned, and its result."""
    done = threading.Event()
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done, result


# -- the pending bit --------------------------------------------------------------------------------


def test_queue_work_returns_false_while_pending(release: Release) -> None:
    wq = WorkQueue("pending", max_active=1)
    gate = Gate(release)
    assert wq.queue_work(gate.work)
    assert gate.started.wait(10)
    runs = []
    work = Work(runs.append, 1)
    assert wq.queue_work(work)  # waits behind the gate (max_active=1)
    assert work.pending
    assert not wq.queue_work(work)
    assert not wq.queue_work(work)
    gate.open.set()
    wq.flush()
    assert runs == [1]
    assert not work.pending and not work.running
    assert wq.queue_work(work)  # no longer pending: may be queued again
    wq.flush()
    assert runs == [1, 1]


def test_work_requeued_while_running_runs_again_but_never_concurrently() -> None:
    wq = WorkQueue("nonreentrant")
    overlap = Concurrency()
    runs = []

    def body() -> None:
        with overlap:
            runs.append(1)
            with blocking():  # let other workers loose while we run
                time.sleep(0.0005)

    work = Work(body)
    queued = []
    stop = time.monotonic() + 0.5

    def requeue() -> None:
        n = 0
        while time.monotonic() < stop:
            n += wq.queue_work(work)
            time.sleep(0)
        queued.append(n)

    threads = [threading.Thread(target=requeue, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    work.flush()
    wq.flush()
    assert overlap.max == 1, "a work ran concurrently with itself"
    assert len(runs) == sum(queued) > 10  # each successful queue_work ran it once


def test_work_shared_by_a_per_cpu_and_an_unbound_workqueue_never_overlaps() -> None:
    """Non-reentrancy holds across workqueues too (the kernel guarantees it system-wide)."""
    bound, unbound = WorkQueue("shared-bound"), WorkQueue("shared-unbound", WQ.UNBOUND)
    overlap = Concurrency()
    runs = []

    def body() -> None:
        with overlap:
            runs.append(1)
            with blocking():
                time.sleep(0.0002)

    work = Work(body)
    queued = []
    stop = time.monotonic() + 0.5

    def requeue(seed: int) -> None:
        n = 0
        i = seed
        while time.monotonic() < stop:
            i += 1
            n += (bound if i % 2 else unbound).queue_work(work)
            time.sleep(0.0001)
        queued.append(n)

    threads = [threading.Thread(target=requeue, args=(s,), daemon=True) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    wait_for("the shared work to settle", lambda: not (work.pending or work.running))
    bound.flush()
    unbound.flush()
    assert overlap.max == 1
    assert len(runs) == sum(queued) > 10
    assert bound.stats()["inflight"] == unbound.stats()["inflight"] == 0


class _CountsOwnedBy(dict):  # type: ignore[type-arg]
    """A PoolWorkqueue's in_flight counts that note every change made while its pool's lock is free
    (PoolWorkqueue fields are ``L:`` under ``pool.lock``)."""

    def __init__(self, pool: Any, counts: dict[int, int]) -> None:
        super().__init__(counts)
        self.pool = pool
        self.unlocked: list[tuple[str, int]] = []

    def __setitem__(self, color: int, n: int) -> None:
        if not self.pool.lock.locked():
            self.unlocked.append(("set", color))
        super().__setitem__(color, n)

    def __delitem__(self, color: int) -> None:
        if not self.pool.lock.locked():
            self.unlocked.append(("del", color))
        super().__delitem__(color)


def test_work_shared_with_an_unbound_workqueue_is_accounted_under_its_pools_lock(
        release: Release) -> None:
    import cmwq_exec

    bound, unbound = WorkQueue("handoff-bound"), WorkQueue("handoff-unbound", WQ.UNBOUND)
    upool = cmwq_exec.get_system().unbound_pool
    pwq = unbound._pwqs[upool.index]
    with upool.lock:
        counts = pwq.in_flight = _CountsOwnedBy(upool, pwq.in_flight)
    gate = Gate(release)
    bound.queue_work(gate.work)
    assert gate.started.wait(10)
    assert unbound.queue_work(gate.work)  # it runs on a per-CPU worker: handed over to that one
    wait_for("an unbound worker to take it", lambda: gate.work not in upool.worklist)
    gate.open.set()
    wait_for("the work to run twice and settle",
             lambda: gate.runs == 2 and not gate.work.pending and not gate.work.running)
    unbound.flush()
    assert counts.unlocked == [], "the unbound pool's in_flight changed without its lock"


def test_requeue_from_inside_runs_after_the_current_run() -> None:
    wq = WorkQueue("self-requeue")
    overlap = Concurrency()
    runs = []

    def body() -> None:
        with overlap:
            runs.append(1)
            if len(runs) < 50:
                assert wq.queue_work(work)  # running, not pending: queued again
                assert not wq.queue_work(work)  # now pending
            with blocking():
                time.sleep(0.0002)

    work = Work(body)
    wq.queue_work(work)
    deadline = time.monotonic() + 20
    while len(runs) < 50 or work.pending or work.running:
        assert time.monotonic() < deadline
        work.flush()
    assert len(runs) == 50 and overlap.max == 1


# -- cancel -----------------------------------------------------------------------------------------


def test_cancel_pending_inactive_work(release: Release) -> None:
    wq = WorkQueue("cancel-inactive", max_active=1)
    gate = Gate(release)
    wq.queue_work(gate.work)
    assert gate.started.wait(10)
    runs = []
    work = Work(runs.append, 1)
    wq.queue_work(work)
    assert work.cancel() is True
    assert not work.pending
    assert work.cancel() is False
    gate.open.set()
    wq.flush()
    assert runs == []
    assert wq.stats()["inflight"] == 0


def test_cancel_pending_work_on_a_worklist() -> None:
    """Queued from a running work (the only runner), the work waits on the pool's worklist."""
    wq = WorkQueue("cancel-worklist")
    runs = []
    results = []

    def queue_and_cancel() -> None:
        work = Work(runs.append, 1)
        results.append(wq.queue_work(work))
        results.append(work.pending)
        results.append(work.cancel())
        results.append(work.pending)
        results.append(work.cancel())

    wq.queue_work(Work(queue_and_cancel))
    wq.flush()
    assert results == [True, True, True, False, False]
    assert runs == []
    assert wq.stats()["inflight"] == 0


def test_cancel_not_pending_returns_false(release: Release) -> None:
    wq = WorkQueue("cancel-idle")
    work = Work(int)
    assert work.cancel() is False
    wq.queue_work(work)
    wq.flush()
    assert work.cancel() is False
    gate = Gate(release)
    wq.queue_work(gate.work)
    assert gate.started.wait(10)
    assert gate.work.cancel() is False  # running is not pending: a started run is not interrupted
    gate.open.set()
    wq.flush()
    assert gate.runs == 1


def test_cancel_of_a_requeue_while_running(release: Release) -> None:
    wq = WorkQueue("cancel-requeued")
    gate = Gate(release)
    wq.queue_work(gate.work)
    assert gate.started.wait(10)
    assert wq.queue_work(gate.work)  # queued again behind its own run
    assert gate.work.pending and gate.work.running
    assert gate.work.cancel() is True
    gate.open.set()
    wq.flush()
    gate.work.flush()
    assert gate.runs == 1
    assert wq.stats()["inflight"] == 0


def test_cancel_sync_waits_for_the_running_work(release: Release) -> None:
    wq = WorkQueue("cancel-sync")
    gate = Gate(release)
    wq.queue_work(gate.work)
    assert gate.started.wait(10)
    assert wq.queue_work(gate.work)  # and pending again
    _, returned, result = in_thread(gate.work.cancel_sync)
    assert not returned.wait(0.2), "cancel_sync returned while the work was running"
    gate.open.set()
    assert returned.wait(10)
    assert result == [True]
    assert not gate.work.pending and not gate.work.running
    wq.flush()
    assert gate.runs == 1
    assert gate.work.cancel_sync() is False  # idle: nothing to cancel or wait for


# -- flushing a work --------------------------------------------------------------------------------


def test_flush_work_waits_for_its_run(release: Release) -> None:
    wq = WorkQueue("flush-work")
    assert Work(int).flush() is False  # never queued
    gate = Gate(release)
    wq.queue_work(gate.work)
    assert gate.started.wait(10)
    _, returned, result = in_thread(gate.work.flush)
    assert not returned.wait(0.2), "flush returned while the work was running"
    gate.open.set()
    assert returned.wait(10)
    assert result == [True]
    assert not gate.work.running
    assert gate.work.flush() is False  # idle


def test_flush_waits_for_pending_work(release: Release) -> None:
    wq = WorkQueue("flush-pending", max_active=1)
    gate = Gate(release)
    wq.queue_work(gate.work)
    assert gate.started.wait(10)
    runs = []
    work = Work(runs.append, 1)
    wq.queue_work(work)
    _, returned, _ = in_thread(work.flush)
    assert not returned.wait(0.2)
    gate.open.set()
    assert returned.wait(10)
    assert runs == [1]


def test_work_cannot_flush_itself() -> None:
    wq = WorkQueue("flush-self")
    errors = []

    def body() -> None:
        try:
            work.flush()
        except RuntimeError as exc:
            errors.append(exc)

    work = Work(body)
    wq.queue_work(work)
    wq.flush()
    assert len(errors) == 1 and "itself" in str(errors[0])


# -- delayed works ----------------------------------------------------------------------------------


def test_delayed_work_runs_after_the_delay() -> None:
    wq = WorkQueue("delayed")
    ran_at = []
    work = DelayedWork(lambda: ran_at.append(time.monotonic()))
    queued_at = time.monotonic()
    assert wq.queue_delayed_work(work, 0.15)
    assert work.pending
    assert not wq.queue_delayed_work(work, 0.15)  # pending
    assert not wq.queue_work(work)
    wait_for("the delayed work to run", lambda: ran_at)
    assert ran_at[0] - queued_at >= 0.15
    work.flush()
    assert len(ran_at) == 1


def test_delayed_work_can_be_cancelled() -> None:
    wq = WorkQueue("delayed-cancel")
    runs = []
    work = DelayedWork(runs.append, 1)
    assert wq.queue_delayed_work(work, 0.1)
    assert work.cancel() is True
    assert not work.pending
    assert work.cancel() is False
    time.sleep(0.3)  # past the delay: the cancelled timer never fires
    assert runs == []
    assert wq.stats()["started"] == 0


def test_delayed_work_flush_runs_it_now() -> None:
    wq = WorkQueue("delayed-flush")
    runs = []
    work = DelayedWork(runs.append, 1)
    t0 = time.monotonic()
    wq.queue_delayed_work(work, 30)
    assert work.flush() is True
    assert runs == [1]
    assert time.monotonic() - t0 < 10


def test_delayed_work_zero_delay_queues_at_once() -> None:
    wq = WorkQueue("delayed-zero")
    runs = []
    work = DelayedWork(runs.append, 1)
    assert wq.queue_delayed_work(work, 0)
    wq.flush()
    assert runs == [1]


# -- flushing and draining a workqueue ------------------------------------------------------------


def test_flush_waits_for_works_queued_before_it_only(release: Release) -> None:
    wq = WorkQueue("flush-wq")
    before = threading.Event()
    release(before)
    done = []

    def old(i: int) -> None:
        with blocking():
            assert before.wait(30)
        done.append(i)

    for i in range(5):
        wq.queue_work(Work(old, i))
    color = wq._work_color
    _, returned, _ = in_thread(wq.flush)
    wait_for("flush to start", lambda: wq._work_color != color)
    later = Gate(release)
    wq.queue_work(later.work)  # queued after flush began: flush does not wait for it
    assert later.started.wait(10)
    assert not returned.wait(0.1)
    before.set()
    assert returned.wait(10), "flush waited for a work queued after it"
    assert sorted(done) == list(range(5))
    assert later.work.running
    later.open.set()
    wq.flush()


SELF_FLUSH_SCRIPT = r"""
import os, threading
from cmwq_exec import Work, WorkQueue
wq = WorkQueue("self-flush")
outcome = []
done = threading.Event()
def body():
    try:
        wq.{method}()
        outcome.append("returned")
    except RuntimeError as exc:
        outcome.append("refused")
    done.set()
wq.queue_work(Work(body))
print(outcome[0] if done.wait(2) else "hangs", flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("method", ["flush", "drain"])
def test_workqueue_flush_from_its_own_work_is_refused(method: str) -> None:
    """Its own work is in the color it would wait for: a silent self-deadlock unless refused (like
    Work.flush() on itself and shutdown(wait=True) from an executor's own call). In a subprocess, so
    a regression cannot leave a stuck worker behind."""
    proc = subprocess.run([sys.executable, "-c", SELF_FLUSH_SCRIPT.replace("{method}", method)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "refused", proc.stdout + proc.stderr[-1000:]


def test_flush_of_an_empty_workqueue_returns() -> None:
    wq = WorkQueue("flush-empty")
    wq.flush()
    wq.flush()


def test_drain_allows_chained_requeue_and_refuses_others(release: Release) -> None:
    wq = WorkQueue("drain")
    start = release(threading.Event())
    chain: list[int] = []
    errors: list[BaseException] = []

    def link() -> None:
        if not chain:
            with blocking():
                assert start.wait(30)
        chain.append(1)
        if len(chain) < 20:
            try:
                assert wq.queue_work(Work(link))  # chained: allowed while draining
            except BaseException as exc:
                errors.append(exc)

    wq.queue_work(Work(link))
    _, drained, _ = in_thread(wq.drain)
    outsider = Work(int)

    def refused() -> bool:
        try:
            wq.queue_work(outsider)
        except RuntimeError as exc:
            assert "draining" in str(exc)
            return True
        outsider.flush()
        return False

    wait_for("queue_work from outside to be refused during drain", refused)
    with pytest.raises(RuntimeError, match="draining"):
        wq.queue_delayed_work(DelayedWork(int), 0.01)
    assert not outsider.pending
    start.set()
    assert drained.wait(10)
    assert errors == []
    assert len(chain) == 20
    assert wq.stats()["inflight"] == 0
    assert wq.queue_work(outsider)  # open again
    wq.flush()


def test_executor_submit_refused_while_draining(make_executor: Callable[..., CMWQExecutor],
                                                release: Release) -> None:
    executor = make_executor()
    gate = release(threading.Event())
    executor.submit(gate.wait, 30)
    _, drained, _ = in_thread(executor.workqueue.drain)

    def refused() -> bool:
        try:
            executor.submit(int)
        except RuntimeError:
            return True
        return False

    wait_for("refused", refused)
    gate.set()
    assert drained.wait(10)


# -- max_active -------------------------------------------------------------------------------------


def test_max_active_limits_concurrency() -> None:
    wq = WorkQueue("limited", max_active=3)
    inside = Concurrency()
    # a barrier of 3: passes only if 3 run at once, and max shows if more ever did
    body = napper(inside, 0.005, threading.Barrier(3, timeout=10))
    for _ in range(12):
        wq.queue_work(Work(body))
    wq.flush()
    assert inside.calls == 12
    assert inside.max == 3


def test_max_active_limits_unbound_workqueues_too() -> None:
    wq = WorkQueue("limited-unbound", WQ.UNBOUND, max_active=2)
    inside = Concurrency()
    body = napper(inside, 0.005)
    for _ in range(20):
        wq.queue_work(Work(body))
    wq.flush()
    assert inside.calls == 20 and inside.max <= 2


# -- max_running -------------------------------------------------------------------------------------


def hold_plain(wq: WorkQueue, n: int, gate: threading.Event) -> Callable[[], int]:
    """Like hold_works, but the works wait *without* blocking(): they count as running."""
    started: list[int] = []

    def hold() -> None:
        started.append(1)
        assert gate.wait(30), "gate never opened"

    for _ in range(n):
        assert wq.queue_work(Work(hold))
    return lambda: len(started)


def test_max_running_bounds_works_that_do_not_sleep(release: Release) -> None:
    wq = WorkQueue("max-running-plain", max_active=6, max_running=2)
    gate = release(threading.Event())
    started = hold_plain(wq, 8, gate)
    wait_for("two works to start", lambda: started() == 2)
    time.sleep(0.1)  # bounded absence check: nothing tells that a third did not start
    assert started() == 2
    gate.set()
    wq.flush()
    assert started() == 8


def test_max_running_lets_sleeping_works_hand_their_slot_on_up_to_max_active(
        release: Release) -> None:
    wq = WorkQueue("max-running-sleep", max_active=6, max_running=2)
    gate = release(threading.Event())
    _, started = hold_works(wq, 10, gate)
    wait_for("six sleeping works to start", lambda: started() == 6)
    time.sleep(0.1)  # bounded absence check: max_active still bounds them
    assert started() == 6
    with wq._lock:
        assert (wq._nr_active, wq._nr_sleeping, len(wq._inactive)) == (6, 6, 4)
    gate.set()
    wq.flush()
    assert started() == 10
    with wq._lock:
        assert (wq._nr_active, wq._nr_sleeping, len(wq._inactive)) == (0, 0, 0)


def test_max_running_counts_a_work_again_once_it_wakes(release: Release) -> None:
    """Two works sleep, so two more start; the sleepers wake and keep running: now four run, above
    max_running, and nothing else starts until enough of them finish."""
    wq = WorkQueue("max-running-wake", max_active=10, max_running=2)
    nap, hold = release(threading.Event()), release(threading.Event())
    started: list[str] = []

    def napper() -> None:
        started.append("napper")
        with blocking():
            assert nap.wait(30)
        assert hold.wait(30)  # awake, running, not sleeping

    def holder() -> None:
        started.append("holder")
        assert hold.wait(30)

    for fn in (napper, napper, holder, holder, holder, holder):
        wq.queue_work(Work(fn))
    wait_for("two nappers and two holders to start", lambda: len(started) == 4)
    nap.set()
    wait_for("the nappers to wake", lambda: wq._nr_sleeping == 0)
    time.sleep(0.1)  # bounded absence check
    assert len(started) == 4 and wq._nr_active == 4
    hold.set()
    wq.flush()
    assert started.count("holder") == 4


def test_max_running_set_at_run_time(release: Release) -> None:
    wq = WorkQueue("max-running-set", max_active=8, max_running=1)
    gate = release(threading.Event())
    started = hold_plain(wq, 6, gate)
    wait_for("one work to start", lambda: started() == 1)
    wq.set_max_active(8, max_running=3)
    wait_for("two more to start", lambda: started() == 3)
    assert wq.max_running == 3 and wq.max_active == 8
    wq.set_max_active(8, max_running=None)
    wait_for("the rest to start without a running limit", lambda: started() == 6)
    gate.set()
    wq.flush()


def test_an_unbalanced_sleep_is_settled_when_the_work_ends() -> None:
    """A blocking() whose exit is skipped (an exception injected into the task at the wrong moment)
    must not leave the workqueue thinking a work sleeps forever."""
    wq = WorkQueue("max-running-unbalanced", max_active=4, max_running=1)
    seen = []

    def sleeps_and_never_wakes() -> None:
        worker = current_worker()
        assert worker is not None
        worker.sleep_begin()
        seen.append(wq._nr_sleeping)
        # as if an exception landed in sleep_end between the pool's part and the workqueue's
        sleeping, worker.sleeping_wq = worker.sleeping_wq, None
        worker.sleep_end()
        worker.sleeping_wq = sleeping

    wq.queue_work(Work(sleeps_and_never_wakes))
    wq.flush()
    assert seen == [1]
    with wq._lock:
        assert (wq._nr_active, wq._nr_sleeping) == (0, 0)


@pytest.mark.parametrize("max_running", [0, -1, True, 1.5, "2"])
def test_max_running_checked(max_running: Any) -> None:
    with pytest.raises(ValueError, match="max_running"):
        WorkQueue("bad-max-running", max_active=4, max_running=max_running)
    wq = WorkQueue("set-bad-max-running", max_active=4)
    with pytest.raises(ValueError, match="max_running"):
        wq.set_max_active(4, max_running=max_running)
    with pytest.raises(ValueError, match="ordered"):
        WorkQueue("ordered-max-running", WQ.ORDERED, max_running=2)


# -- queue_work_on -----------------------------------------------------------------------------------


def test_queue_work_on_runs_on_that_cpus_pool(fresh_system: Any) -> None:
    system = fresh_system()
    ran: list[Any] = []
    work = Work(lambda: ran.append(current_worker().pool))  # type: ignore[union-attr]

    def run_on(wq: WorkQueue, cpu: int) -> Any:
        ran.clear()
        assert wq.queue_work_on(cpu, work)
        work.flush()
        assert len(ran) == 1
        return ran[0]

    wq = WorkQueue("queue-on")
    for cpu in system.cpu_pools:
        assert run_on(wq, cpu) is system.cpu_pools[cpu]
    if len(system.cpu_pools) > 1:
        cpu = max(system.cpu_pools)
        system.cpu_down(cpu)
        try:
            pool = run_on(wq, cpu)
            assert pool is not system.cpu_pools[cpu] and pool.online
        finally:
            system.cpu_up(cpu)
    unbound = WorkQueue("queue-on-unbound", WQ.UNBOUND)
    assert run_on(unbound, min(system.cpu_pools)) is system.unbound_pool


@pytest.mark.parametrize("cpu", [-1, 4096, True, "0", None])
def test_queue_work_on_checks_the_cpu(cpu: Any) -> None:
    wq = WorkQueue("queue-on-bad")
    work = Work(lambda: None)
    with pytest.raises(ValueError, match="cpu must be one of"):
        wq.queue_work_on(cpu, work)
    assert not work.pending
    with pytest.raises(TypeError, match="work must be"):
        wq.queue_work_on(0, lambda: None)  # type: ignore[arg-type]


def test_set_max_active_raises_the_limit_at_run_time(release: Release) -> None:
    wq = WorkQueue("raise-limit", max_active=1)
    gate = release(threading.Event())
    _, started = hold_works(wq, 4, gate)
    wait_for("started() == 1", lambda: started() == 1)
    time.sleep(0.1)  # an absence: no second work may start meanwhile
    assert started() == 1
    wq.set_max_active(4)
    assert wq.max_active == 4
    wait_for("waiting works to start once max_active rose", lambda: started() == 4)
    gate.set()
    wq.flush()


def test_set_max_active_lowers_the_limit_at_run_time(release: Release) -> None:
    wq = WorkQueue("lower-limit", max_active=4)
    gate = release(threading.Event())
    _, started = hold_works(wq, 4, gate)
    wait_for("started() == 4", lambda: started() == 4)
    wq.set_max_active(2)
    inside = Concurrency()
    second = napper(inside, 0.005, threading.Barrier(2, timeout=10))
    for i in range(8):
        wq.queue_work(Work(second, i))
    time.sleep(0.05)
    assert inside.calls == 0  # 4 still run, above the new limit
    gate.set()
    wq.flush()
    assert inside.calls == 8 and inside.max == 2


def test_set_max_active_none_removes_the_limit(release: Release) -> None:
    wq = WorkQueue("unlimit", max_active=1)
    gate = release(threading.Event())
    _, started = hold_works(wq, 6, gate)
    wait_for("started() == 1", lambda: started() == 1)
    wq.set_max_active(None)
    assert wq.max_active is None
    wait_for("started() == 6", lambda: started() == 6)
    gate.set()
    wq.flush()
    # and back to a limit, with the accounting right
    wq.set_max_active(2)
    inside = Concurrency()
    third = napper(inside, 0.003)
    for _ in range(10):
        wq.queue_work(Work(third))
    wq.flush()
    assert inside.calls == 10 and 1 <= inside.max <= 2


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every 10 us instead of 5 ms, so narrow races show up in a few hundred tries."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def test_set_max_active_on_a_busy_unlimited_workqueue_keeps_count(fast_switching: None) -> None:
    """A work finishing while an unlimited workqueue gets a limit must give back exactly the slot it
    holds: a recount from in-flight numbers once left one slot taken for good, and with a limit of 1
    nothing ever ran again (~1 in 8 tries of this loop)."""
    for trial in range(200):
        wq = WorkQueue(f"limit-count-{trial}")
        for _ in range(50):
            wq.queue_work(Work(int))
        wq.set_max_active(1)
        wq.flush()
        probe: list[int] = []
        wq.queue_work(Work(probe.append, 1))
        deadline = time.monotonic() + 5
        while not probe:
            assert time.monotonic() < deadline, f"try {trial}: a work never ran after set_max_active(1)"
            time.sleep(0.001)
        wq.flush()


class _LimitRemovedMeanwhile:
    """Stands in for ``wq._lock``: the first time it is taken, another thread's
    ``set_max_active(None)`` has just run (it sets ``_max_active`` under this very lock), i.e. after
    the queueing thread read the limit without the lock and before it took the lock."""

    def __init__(self, wq: WorkQueue) -> None:
        self.inner = threading.Lock()
        self.wq = wq
        self.fired = False

    def __enter__(self) -> None:
        self.inner.acquire()
        if not self.fired:
            self.fired = True
            self.wq._max_active = None  # what set_max_active(None) does (nothing is inactive)

    def __exit__(self, *exc: Any) -> None:
        self.inner.release()

    def locked(self) -> bool:  # what the lock checker asks of a plain lock (CMWQ_LOCKDEP=1)
        return self.inner.locked()


def test_queue_racing_with_set_max_active_none(release: Release) -> None:
    """The limit read before taking _lock may be gone once it is taken: queueing must not compare with
    None (TypeError) nor leak the in-flight count it already took (flush would hang)."""
    wq = WorkQueue("limit-race", max_active=2)
    wq._lock = _LimitRemovedMeanwhile(wq)  # type: ignore[assignment]
    runs = []
    work = Work(runs.append, 1)
    assert wq.queue_work(work)
    _, flushed, _ = in_thread(wq.flush)
    assert flushed.wait(10), "flush hangs"
    assert runs == [1]
    assert wq.stats()["inflight"] == 0


# -- ordered workqueues ---------------------------------------------------------------------------


def test_ordered_workqueue_runs_strictly_fifo_one_at_a_time() -> None:
    wq = WorkQueue("ordered", WQ.ORDERED)
    assert wq.max_active == 1 and wq.flags & WQ.UNBOUND
    inside = Concurrency()
    order: list[int] = []

    def body(i: int) -> None:
        with inside:
            order.append(i)
            if i % 7 == 0:
                with blocking():
                    time.sleep(0.001)

    producers = []
    for p in range(3):
        def produce(p: int = p) -> None:
            for i in range(p * 100, p * 100 + 100):
                wq.queue_work(Work(body, i))
        producers.append(threading.Thread(target=produce, daemon=True))
    for t in producers:
        t.start()
    for t in producers:
        t.join(30)
    assert not any(t.is_alive() for t in producers)
    wq.flush()
    assert inside.max == 1
    assert sorted(order) == list(range(300))
    for p in range(3):  # each producer's works ran in the order it queued them
        mine = [i for i in order if p * 100 <= i < p * 100 + 100]
        assert mine == sorted(mine)


def test_ordered_workqueue_single_producer_order() -> None:
    wq = WorkQueue("ordered-one", WQ.ORDERED)
    order: list[int] = []
    for i in range(200):
        wq.queue_work(Work(order.append, i))
    wq.flush()
    assert order == list(range(200))


def test_ordered_workqueue_refuses_more_concurrency() -> None:
    with pytest.raises(ValueError, match="max_active"):
        WorkQueue("ordered-bad", WQ.ORDERED, max_active=2)
    wq = WorkQueue("ordered-ok", WQ.ORDERED, max_active=1)
    with pytest.raises(ValueError, match="ordered"):
        wq.set_max_active(3)


# -- destroy ----------------------------------------------------------------------------------------


def test_destroy_drains_then_refuses_new_works() -> None:
    wq = WorkQueue("destroyed", WQ.RESCUER)
    runs = []

    def body(i: int) -> None:
        with blocking():
            time.sleep(0.001)
        runs.append(i)

    for i in range(10):
        wq.queue_work(Work(body, i))
    wq.destroy()
    assert sorted(runs) == list(range(10))
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.queue_work(Work(int))
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.queue_delayed_work(DelayedWork(int), 0.1)
    work = Work(int)
    with pytest.raises(RuntimeError):
        wq.queue_work(work)
    assert not work.pending  # a refused work is not left pending


# -- arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", 3, None])
def test_workqueue_name_checked(name: Any) -> None:
    with pytest.raises(ValueError, match="name"):
        WorkQueue(name)


@pytest.mark.parametrize("flags", ["unbound", 1.5, True, -1])
def test_workqueue_flags_checked(flags: Any) -> None:
    with pytest.raises(ValueError, match="flags"):
        WorkQueue("bad-flags", flags)


@pytest.mark.parametrize("flags", [8, 16 | WQ.UNBOUND])
def test_workqueue_unknown_flag_bits_refused(flags: Any) -> None:
    """enum.IntFlag alone accepts any integer: unknown bits must be refused by the workqueue."""
    with pytest.raises(ValueError, match="flags"):
        WorkQueue("bad-flag-bits", flags)


@pytest.mark.parametrize("max_active", [0, -1, True, 1.5, "2"])
def test_max_active_checked(max_active: Any) -> None:
    with pytest.raises(ValueError, match="max_active"):
        WorkQueue("bad-max-active", max_active=max_active)
    wq = WorkQueue("set-bad-max-active")
    with pytest.raises(ValueError, match="max_active"):
        wq.set_max_active(max_active)


def test_work_and_queue_arguments_checked() -> None:
    wq = WorkQueue("bad-args")
    with pytest.raises(TypeError, match="fn"):
        Work(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="work"):
        wq.queue_work(print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DelayedWork"):
        wq.queue_delayed_work(Work(int), 1)  # type: ignore[arg-type]
    for delay in (-1, "1", True, float("nan"), None):
        with pytest.raises(ValueError, match="delay"):
            wq.queue_delayed_work(DelayedWork(int), delay)  # type: ignore[arg-type]


def test_work_arguments_are_passed() -> None:
    wq = WorkQueue("args")
    got = []
    wq.queue_work(Work(lambda *a, **k: got.append((a, k)), 1, 2, x=3))
    wq.flush()
    assert got == [((1, 2), {"x": 3})]


def test_work_exception_is_logged_and_the_worker_survives(caplog: pytest.LogCaptureFixture) -> None:
    wq = WorkQueue("raises")

    def boom() -> None:
        raise ValueError("boom in a work")

    with caplog.at_level(logging.ERROR, logger="cmwq_exec.workqueue"):
        wq.queue_work(Work(boom))
        wq.flush()
    assert any("boom in a work" in (r.exc_text or "") or (r.exc_info and "boom" in str(r.exc_info[1]))
               for r in caplog.records)
    after = []
    wq.queue_work(Work(after.append, 1))
    wq.flush()
    assert after == [1]


# -- counters ---------------------------------------------------------------------------------------


def test_stats_counters(release: Release) -> None:
    wq = WorkQueue("stats")
    stats = wq.stats()
    assert stats["workqueue"] == "stats"
    assert (stats["started"], stats["completed"], stats["inflight"]) == (0, 0, 0)
    for _ in range(10):
        wq.queue_work(Work(int))
    wq.flush()
    stats = wq.stats()
    assert (stats["started"], stats["completed"], stats["inflight"]) == (10, 10, 0)
    gate = Gate(release)
    wq.queue_work(gate.work)
    assert gate.started.wait(10)
    stats = wq.stats()
    assert (stats["started"], stats["completed"], stats["inflight"]) == (11, 10, 1)
    gate.open.set()
    wq.flush()
    stats = wq.stats()
    assert (stats["started"], stats["completed"], stats["inflight"]) == (11, 11, 0)
    for key in ("cpu_seconds", "cpu_intensive", "cm_wakeups", "mayday", "rescued"):
        assert stats[key] >= 0
    assert len(stats["queue_latency"]["counts"]) == len(stats["queue_latency"]["buckets"])


def test_work_queued_from_a_worker_goes_to_its_pool() -> None:
    wq = WorkQueue("locality")
    pools = []

    def child() -> None:
        worker = current_worker()
        assert worker is not None
        pools.append(worker.pool)

    def parent() -> None:
        worker = current_worker()
        assert worker is not None
        pools.append(worker.pool)
        for _ in range(5):
            wq.queue_work(Work(child))

    wq.queue_work(Work(parent))
    wq.flush()
    assert len(pools) == 6 and len(set(pools)) == 1 and pools[0].cpu is not None


def test_unbound_workqueue_runs_on_the_unbound_pool() -> None:
    wq = WorkQueue("unbound", WQ.UNBOUND)
    pools = []
    for _ in range(20):
        wq.queue_work(Work(lambda: pools.append(current_worker().pool)))  # type: ignore[union-attr]
    wq.flush()
    assert {p.name for p in pools} == {"unbound"}


def test_counters_are_the_stats_without_their_histograms() -> None:
    wq = WorkQueue("counters")
    try:
        wq.queue_work(Work(lambda: None))
        wq.flush()
        counters, stats = wq.counters(), wq.stats()
        assert counters["completed"] == stats["completed"] == 1
        assert set(stats) - set(counters) == {"queue_latency", "execution"}
    finally:
        wq.destroy()
