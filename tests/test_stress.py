"""Stress: many works from many threads, exactly-once accounting, invariants sampled throughout."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import wait_for

import cmwq_exec
from cmwq_exec import WQ, CMWQExecutor, DelayedWork, Work, WorkQueue, blocking

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def own_pools(fresh_system: Callable[..., Any]) -> None:
    """Every test here starts on fresh pools: one that drove the shared pools to the worker cap
    (test_mixed_blocking_load_across_executors does by design) would otherwise leave the next test
    without any headroom for new workers until the idle ones are reaped (idle_timeout, 10 s), and
    that test would starve behind failed creations (create_cooldown, 1 s each)."""
    fresh_system()


class Sampler:
    """Checks every pool's invariants under its lock, over and over, while a test runs."""

    def __init__(self) -> None:
        self.pools = cmwq_exec.get_system().pools
        self.failures: list[BaseException] = []
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            for pool in self.pools:
                with pool.lock:
                    try:
                        pool.check_invariants()
                    except AssertionError as exc:
                        self.failures.append(exc)
            self.samples += 1
            time.sleep(0.001)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        assert not self.failures, self.failures[:3]


def run_threads(target: Callable[..., Any], args: list[tuple[Any, ...]], timeout: float = 90) -> None:
    """Run ``target(*a)`` for each ``a`` in daemon threads (a broken core must not keep the test
    process alive) and fail if any is still running after ``timeout``."""
    threads = [threading.Thread(target=target, args=a, daemon=True) for a in args]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads still running after {timeout}s: {stuck}"


def test_50k_noop_works_from_4_threads_run_exactly_once(make_executor: Callable[..., CMWQExecutor],
                                                        quiesce: Callable[..., None]) -> None:
    executors = [make_executor(), make_executor(unbound=True), make_executor(max_workers=3)]
    n, nthreads = 50_000, 4
    ran: list[int] = []  # list.append is atomic: a record per run
    futures: list[list[cf.Future[Any]]] = [[] for _ in range(nthreads)]
    start = threading.Barrier(nthreads)

    def submit(t: int) -> None:
        start.wait()
        mine = futures[t]
        for i in range(t, n, nthreads):
            mine.append(executors[i % 3].submit(ran.append, i))

    with Sampler() as sampler:
        run_threads(submit, [(t,) for t in range(nthreads)])
        everything = [f for mine in futures for f in mine]
        done, not_done = cf.wait(everything, timeout=60)
    assert not not_done, f"{len(not_done)} futures never finished"
    assert all(f.exception() is None for f in everything)
    counts = collections.Counter(ran)
    assert len(counts) == n and set(counts.values()) == {1}, "a work ran twice or never"
    assert sampler.samples > 0
    quiesce()


def test_mixed_blocking_load_across_executors(make_executor: Callable[..., CMWQExecutor],
                                              quiesce: Callable[..., None]) -> None:
    """Blocking and non-blocking calls, nested waits and limits together.

    The 1000 nodes sleep in result() and the pool wakes a worker for each pending one, so this runs
    at the worker cap (max_total_workers, 512 threads): it also checks that everything finishes with
    the workers there are once creating more fails."""
    plain, limited, unbound = make_executor(), make_executor(max_workers=4), make_executor(unbound=True)
    ran: list[int] = []

    def leaf(i: int) -> int:
        if i % 4 == 0:
            with blocking():
                time.sleep(0.0005)
        ran.append(i)
        return i

    def node(i: int) -> int:
        children = [limited.submit(leaf, 10 * i + k) for k in range(3)]
        children.append(unbound.submit(leaf, 10 * i + 3))
        return sum(c.result(timeout=30) for c in children)

    with Sampler():
        futures = [plain.submit(node, i) for i in range(1000)]
        results = [f.result(timeout=60) for f in futures]
    assert results == [sum(10 * i + k for k in range(4)) for i in range(1000)]
    counts = collections.Counter(ran)
    assert len(counts) == 4000 and set(counts.values()) == {1}
    quiesce()


@pytest.mark.parametrize("flags,max_active", [(WQ(0), None), (WQ.UNBOUND, None), (WQ(0), 3)],
                         ids=["per-cpu", "unbound", "limited"])
def test_random_queue_cancel_requeue_exactly_once(flags: WQ, max_active: int | None,
                                                  quiesce: Callable[..., None]) -> None:
    """Reusable works queued, cancelled, cancel_sync'ed and requeued from their own run at random by
    4 threads: each runs exactly once per successful queue that was not cancelled, never
    concurrently with itself."""
    wq = WorkQueue(f"stress-{flags}-{max_active}", flags, max_active=max_active)
    k = 24
    runs = [0] * k
    active = [False] * k
    overlaps: list[int] = []
    lock = threading.Lock()
    queued = [0] * k  # under lock
    cancelled = [0] * k

    def body(j: int) -> None:
        if active[j]:
            overlaps.append(j)
        active[j] = True
        runs[j] += 1  # safe: a work never runs concurrently with itself (checked above)
        r = random.random()
        if r < 0.2:
            with blocking():
                time.sleep(0.0002)
        elif r < 0.3 and wq.queue_work(works[j]):
            with lock:
                queued[j] += 1
        active[j] = False

    works = [Work(body, j) for j in range(k)]

    min_runs = 1000
    hammer_until = time.monotonic() + 60

    def hammer(seed: int) -> None:
        # 3000 operations each, and on until the works have run min_runs times: how many runs 3000
        # operations give depends on how much CPU the works get beside the hammers
        rng = random.Random(seed)
        ops = 0
        while ops < 3000 or (sum(runs) < min_runs and time.monotonic() < hammer_until):
            ops += 1
            j = rng.randrange(k)
            op = rng.random()
            if rng.random() < 0.2:
                time.sleep(0.00005)  # let the works run now and then
            if op < 0.6:
                if wq.queue_work(works[j]):
                    with lock:
                        queued[j] += 1
            elif op < 0.95:
                if works[j].cancel():
                    with lock:
                        cancelled[j] += 1
            else:
                if works[j].cancel_sync():
                    with lock:
                        cancelled[j] += 1

    with Sampler():
        run_threads(hammer, [(s,) for s in range(4)])
        # self-requeues may still be chaining
        wait_for("the works to settle", lambda: not any(w.pending or w.running for w in works), 60)
        wq.flush()
    assert not overlaps, f"works ran concurrently with themselves: {overlaps[:5]}"
    assert runs == [q - c for q, c in zip(queued, cancelled, strict=True)]
    assert sum(runs) >= min_runs, f"the works ran only {sum(runs)} times in 60 s"
    assert wq.stats()["inflight"] == 0
    quiesce()


def test_random_delayed_works_exactly_once(quiesce: Callable[..., None]) -> None:
    wq = WorkQueue("stress-delayed")
    k = 16
    runs = [0] * k
    queued = [0] * k
    cancelled = [0] * k
    lock = threading.Lock()

    def body(j: int) -> None:
        runs[j] += 1

    works = [DelayedWork(body, j) for j in range(k)]

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(1500):
            j = rng.randrange(k)
            op = rng.random()
            if op < 0.5:
                if wq.queue_delayed_work(works[j], rng.choice((0, 0.0005, 0.002))):
                    with lock:
                        queued[j] += 1
            elif op < 0.9:
                if works[j].cancel():
                    with lock:
                        cancelled[j] += 1
            elif op < 0.95:
                works[j].flush()
            elif wq.queue_work(works[j]):
                with lock:
                    queued[j] += 1

    run_threads(hammer, [(s,) for s in range(4)])
    wait_for("the delayed works to settle", lambda: not any(w.pending or w.running for w in works), 60)
    wq.flush()
    assert runs == [q - c for q, c in zip(queued, cancelled, strict=True)]
    assert sum(runs) > 100
    quiesce()


def test_many_workqueues_flushing_concurrently(quiesce: Callable[..., None]) -> None:
    """Flushers of different workqueues and works of all of them, interleaved."""
    wqs = [WorkQueue(f"flushers-{i}", WQ.UNBOUND if i % 2 else WQ(0)) for i in range(6)]
    counts = [0] * len(wqs)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def bump(i: int) -> None:
        with lock:
            counts[i] += 1

    def producer(i: int) -> None:
        try:
            wq = wqs[i]
            for n in range(400):
                wq.queue_work(Work(bump, i))
                if n % 50 == 49:
                    wq.flush()
                    with lock:
                        assert counts[i] >= n + 1, "flush returned before earlier works ran"
        except BaseException as exc:
            errors.append(exc)

    run_threads(producer, [(i,) for i in range(len(wqs))])
    for wq in wqs:
        wq.flush()
    assert not errors, errors[:3]
    assert counts == [400] * len(wqs)
    quiesce()
