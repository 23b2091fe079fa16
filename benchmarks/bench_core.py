"""Side-by-side benchmarks: ``cmwq_exec.CMWQExecutor`` against ``ThreadPoolExecutor``.

Run from a checkout::

    python benchmarks/bench_core.py            # full run, ~1.5 minutes on 2 CPUs
    python benchmarks/bench_core.py --quick    # smaller figures, ~20-30 s
    python benchmarks/bench_core.py --json out.json --markdown table.md

Each case runs in a fresh subprocess, and inside it both executors run alternately (cmwq, TPE,
TPE, cmwq, ...), several times each; the table shows medians and their ratio, because the 2-core
machines this project runs on are noisy. Pinning is compared across subprocesses, since the pools
are configured once per process (``--in-process`` runs every other case in this one process).

Every case states its target (from the issue) and whether it is met. Nothing here hangs: the
ThreadPoolExecutor attempts that deadlock are waited on with a timeout, then abandoned with
``shutdown(wait=False, cancel_futures=True)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures import wait as futures_wait
from functools import partial
from typing import Any

import cmwq_exec
from cmwq_exec import CMWQExecutor, blocking
from cmwq_exec import plugin as cmwq_plugin

NCPU = len(os.sched_getaffinity(0))


@dataclasses.dataclass(frozen=True)
class Params:
    repeats: int  # alternating runs per case (medians are reported)
    noop_tasks: int
    rt_iters: int
    sleep_tasks: int
    cpu_tasks: int
    cpu_ms: float
    fib_n: int
    deadlock_timeout: float
    plain_tasks: int
    plain_repeats: int
    pin_procs: int  # subprocesses per pinning setting
    plugin_pairs: int
    barrier_tasks: int  # calls meeting at one Barrier


FULL = Params(repeats=7, noop_tasks=100_000, rt_iters=5_000, sleep_tasks=500, cpu_tasks=200, cpu_ms=3.0,
              fib_n=14, deadlock_timeout=3.0, plain_tasks=500, plain_repeats=3, pin_procs=5,
              plugin_pairs=16, barrier_tasks=400)
QUICK = Params(repeats=3, noop_tasks=50_000, rt_iters=1_500, sleep_tasks=500, cpu_tasks=100, cpu_ms=3.0,
               fib_n=14, deadlock_timeout=1.5, plain_tasks=200, plain_repeats=1, pin_procs=1,
               plugin_pairs=5, barrier_tasks=300)


# -- measuring helpers --------------------------------------------------------------------------


def process_threads() -> int:
    """Every thread of this process, Python's or not (``/proc/self/task``)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


#: Threads of this process before any executor exists (the figures "beyond the process's start"
#: count every thread an executor brings, cmwq's service threads included, as a user sees them).
START_THREADS = process_threads()


def cmwq_workers() -> int:
    """Worker threads of all cmwq pools (not counting rescuers and the timer thread)."""
    return sum(pool.nr_workers for pool in cmwq_exec.get_system().pools)


def cmwq_counters() -> dict[str, int]:
    """Concurrency-management counters of all pools: why workers were added (cm_wakeups, and
    the watchdog's cpu_intensive), why creation stalled (mayday), creations put off because a
    runner came back (paced) and idle workers taken from another pool instead of a new thread
    (adopted)."""
    totals = {"cm_wakeups": 0, "cpu_intensive": 0, "mayday": 0, "paced": 0, "adopted": 0}
    for pool in cmwq_exec.get_system().pools:
        stats = pool.stats()
        for key in totals:
            totals[key] += stats.get(key, 0)
    return totals


class Sampler:
    """Samples the process's thread count (and an executor's own threads) from a side thread."""

    def __init__(self, executor_threads: Callable[[], int], interval: float = 0.001) -> None:
        self.executor_threads = executor_threads
        self.interval = interval
        self.peak_process = 0
        self.peak_executor = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _sample(self) -> None:
        self.peak_process = max(self.peak_process, process_threads())
        self.peak_executor = max(self.peak_executor, self.executor_threads())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Sampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def tpe_threads(executor: Executor) -> Callable[[], int]:
    threads = executor._threads  # type: ignore[attr-defined]  # a ThreadPoolExecutor's own set
    return lambda: len(threads)


def alternate(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run each callable ``repeats`` times, alternating, in ABBA order so slow drifts cancel."""
    results: dict[str, list[Any]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            gc.collect()
            results[name].append(runs[name]())
    return results


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# -- the work -----------------------------------------------------------------------------------


def noop() -> None:
    pass


def sleep_blocking(seconds: float) -> None:
    with blocking():  # a no-op outside a cmwq worker, so TPE runs the very same function
        time.sleep(seconds)


def sleep_plain(seconds: float) -> None:
    time.sleep(seconds)


def spin(n: int) -> int:
    """Pure-Python arithmetic, holding the GIL all along."""
    acc = 0
    for i in range(n):
        acc += i * i % 7
    return acc


def spin_and_report(n: int) -> tuple[int, float]:
    """Spin; return the thread that ran it and the CPU time the spin took on that thread."""
    cpu = time.thread_time()
    spin(n)
    return threading.get_ident(), time.thread_time() - cpu


def calibrate_spin(ms: float) -> int:
    """Loop count for ``ms`` milliseconds of :func:`spin` on this machine."""
    n = 20_000
    spin(n)
    best = min(_timed(spin, n) for _ in range(5))
    return max(1000, int(n * ms / 1000 / best))


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def fib(executor: Executor, n: int) -> int:
    """Nested submit-and-wait: every call waits on two calls it submitted to the same executor."""
    if n < 2:
        return n
    a = executor.submit(fib, executor, n - 1)
    b = executor.submit(fib, executor, n - 2)
    return a.result() + b.result()


def fib_plain(n: int) -> int:
    return n if n < 2 else fib_plain(n - 1) + fib_plain(n - 2)


# -- cases --------------------------------------------------------------------------------------


def run_noop_throughput(make: Callable[[], Executor], n: int, wait_all: bool = False) -> float:
    """Submit ``n`` no-op calls, then wait for all (each ``result()`` in turn, or with
    ``concurrent.futures.wait`` if ``wait_all``); tasks per second."""
    executor = make()
    try:
        for f in [executor.submit(noop) for _ in range(1000)]:  # warm up: workers exist
            f.result()
        gc.collect()
        start = time.perf_counter()
        futures = [executor.submit(noop) for _ in range(n)]
        if wait_all:
            futures_wait(futures)
        else:
            for f in futures:
                f.result()
        elapsed = time.perf_counter() - start
    finally:
        executor.shutdown()
    return n / elapsed


def run_round_trip(make: Callable[[], Executor], iters: int) -> float:
    """Median submit->result latency on an idle executor, in microseconds."""
    executor = make()
    try:
        for _ in range(200):
            executor.submit(noop).result()
        clock = time.perf_counter_ns
        samples = []
        for _ in range(iters):
            t = clock()
            executor.submit(noop).result()
            samples.append(clock() - t)
    finally:
        executor.shutdown()
    return median(samples) / 1000


def run_many(executor: Executor, fn: Callable[..., Any], args: tuple[Any, ...], n: int,
             threads: Callable[[], int]) -> dict[str, Any]:
    """Submit ``n`` calls of ``fn(*args)`` and wait for them; wall time and thread peaks (and for
    cmwq, how its counters moved: cm_wakeups counts runners added because one slept or was found
    blocked by the watchdog, cpu_intensive the works found hogging a CPU)."""
    is_cmwq = isinstance(executor, CMWQExecutor)
    before = cmwq_counters() if is_cmwq else {}
    with Sampler(threads) as sampler:
        start = time.perf_counter()
        futures = [executor.submit(fn, *args) for _ in range(n)]
        submitted_cpu = time.thread_time()
        blocked = 0
        results = []
        for future in futures:
            blocked += not future.done()
            results.append(future.result())
        waits_cpu = time.thread_time() - submitted_cpu
        wall = time.perf_counter() - start
    out = {"wall_s": wall, "peak_process_threads": sampler.peak_process,
           # the submitting thread's side of the run: results it had to sleep for (each one a
           # wake-up and a GIL hand-off from a worker) and the CPU time its waiting loop took
           "waits_that_blocked": blocked, "waits_cpu_s": waits_cpu,
           "peak_executor_threads": sampler.peak_executor, "results": results,
           # every thread beyond the process's start but the sampler: for cmwq its workers and its
           # service threads (the timer thread, rescuers); a ThreadPoolExecutor starts only
           # its own threads, so for it this is peak_executor_threads
           "peak_threads_beyond_start": sampler.peak_process - START_THREADS - 1}
    if is_cmwq:
        after = cmwq_counters()
        out["counters"] = {key: after[key] - before[key] for key in after}
    return out


def case_sleep(executor_factory: Callable[[], Executor], fn: Callable[..., Any], n: int,
               threads_of: Callable[[Executor], Callable[[], int]]) -> dict[str, Any]:
    executor = executor_factory()
    try:
        out = run_many(executor, fn, (0.01,), n, threads_of(executor))
    finally:
        executor.shutdown()
    del out["results"]
    return out


def case_barrier(executor_factory: Callable[[], Executor], n: int, warm_bursts: int,
                 threads_of: Callable[[Executor], Callable[[], int]]) -> dict[str, Any]:
    """``n`` calls that only return once all of them run at once (a Barrier, waited on inside
    blocking()), after ``warm_bursts`` bursts of 500 × 10 ms waits on the same executor: a pool
    that learned its sleeps are short must still give every call a worker."""
    executor = executor_factory()
    barrier = threading.Barrier(n)

    def meet() -> None:
        with blocking():
            barrier.wait(30)

    try:
        for _ in range(warm_bursts):
            list(executor.map(sleep_blocking, [0.01] * 500))
        with Sampler(threads_of(executor)) as sampler:
            start = time.perf_counter()
            futures = [executor.submit(meet) for _ in range(n)]
            completed = all(f.exception() is None for f in futures)
            wall = time.perf_counter() - start
    finally:
        barrier.abort()  # a call still waiting gives up at once
        executor.shutdown()
    return {"wall_s": wall, "completed": completed, "peak_executor_threads": sampler.peak_executor,
            "peak_threads_beyond_start": sampler.peak_process - START_THREADS - 1}


def case_cpu(executor_factory: Callable[[], Executor], loops: int, n: int,
             threads_of: Callable[[Executor], Callable[[], int]]) -> dict[str, Any]:
    executor = executor_factory()
    try:
        out = run_many(executor, spin_and_report, (loops,), n, threads_of(executor))
    finally:
        executor.shutdown()
    results = out.pop("results")
    out["threads_that_ran_tasks"] = len({ident for ident, _cpu in results})
    out["task_cpu_s"] = sum(cpu for _ident, cpu in results)  # CPU time inside the calls
    return out


def nested_cmwq(n: int, max_workers: int | None, timeout: float) -> dict[str, Any]:
    executor = CMWQExecutor(max_workers=max_workers)
    start = time.perf_counter()
    try:
        value = executor.submit(fib, executor, n).result(timeout=timeout)
    except FuturesTimeout:
        executor.shutdown(wait=False, cancel_futures=True)
        return {"completed": False, "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    executor.shutdown()
    return {"completed": value == fib_plain(n), "wall_s": wall}


def nested_tpe(n: int, max_workers: int | None, timeout: float) -> dict[str, Any]:
    """fib(n) with nested waits on a ThreadPoolExecutor: deadlocks once every worker waits.

    Waited on with a timeout and then abandoned; cancelling the queued calls makes the waiting
    workers' result() raise CancelledError, so the stuck threads usually unwind: how many are
    still alive afterwards is reported.
    """
    executor = ThreadPoolExecutor(max_workers=max_workers)
    start = time.perf_counter()
    top = executor.submit(fib, executor, n)
    try:
        value = top.result(timeout=timeout)
    except FuturesTimeout:
        waited = time.perf_counter() - start
        threads = list(executor._threads)
        executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + 1.0
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"completed": False, "wall_s": waited, "threads": len(threads),
                "stuck_threads_after_abandon": sum(t.is_alive() for t in threads)}
    wall = time.perf_counter() - start
    executor.shutdown()
    return {"completed": value == fib_plain(n), "wall_s": wall}


class _IdlePlugin:
    """An event-hook plugin with nothing on the hot path."""

    created = 0

    @cmwq_exec.hookimpl
    def cmwq_worker_created(self, pool: Any, worker: Any) -> None:
        self.created += 1


# -- the table ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    figure: str
    a: str  # cmwq (or the first setting)
    b: str  # TPE (or the second setting)
    ratio: str
    target: str
    met: bool | None  # None: informational
    note: str = ""


def _fmt(x: float, unit: str = "") -> str:
    if x >= 100:
        s = f"{x:,.0f}"
    elif x >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return s + unit


def _runs(values: Sequence[float]) -> str:
    """Every run's figure, in running order: ``2.9, 3.1, 3.0``."""
    return ", ".join(f"{v:.2f}" for v in values)


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "NO")


class Bench:
    def __init__(self, params: Params, quick: bool, log: Callable[[str], None]) -> None:
        self.p = params
        self.quick = quick
        self.log = log
        self.rows: list[Row] = []
        self.side_rows: list[Row] = []
        self.raw: dict[str, Any] = {}

    # each case appends rows and raw figures

    def noop_throughput(self) -> None:
        n = self.p.noop_tasks
        self.log(f"no-op throughput: {n:,} tasks x {self.p.repeats} runs each")
        r = alternate({"cmwq": lambda: run_noop_throughput(CMWQExecutor, n),
                       "tpe": lambda: run_noop_throughput(ThreadPoolExecutor, n)}, self.p.repeats)
        c, t = median(r["cmwq"]), median(r["tpe"])
        ratios = [a / b for a, b in zip(r["cmwq"], r["tpe"], strict=True)]
        self.raw["noop_throughput"] = {**r, "ratios": ratios}
        self.rows.append(Row(f"no-op tasks/s ({n // 1000}k submitted, then all waited)", _fmt(c),
                             _fmt(t), f"{c / t:.2f}× cmwq/TPE", "≥ 3× on every run", min(ratios) >= 3,
                             "runs: " + _runs(ratios)))
        # the same calls waited for another way, and on executors of a fixed size
        for label, key, make_c, make_t, wait_all in (
                ("  … waited with concurrent.futures.wait(futures)", "noop_wait", CMWQExecutor,
                 ThreadPoolExecutor, True),
                ("  … max_workers=8 (vs ThreadPoolExecutor(8))", "noop_max_workers_8",
                 partial(CMWQExecutor, max_workers=8), partial(ThreadPoolExecutor, max_workers=8), False)):
            r = alternate({"cmwq": lambda m=make_c, w=wait_all: run_noop_throughput(m, n, w),
                           "tpe": lambda m=make_t, w=wait_all: run_noop_throughput(m, n, w)}, self.p.repeats)
            c, t = median(r["cmwq"]), median(r["tpe"])
            ratios = [a / b for a, b in zip(r["cmwq"], r["tpe"], strict=True)]
            self.raw[key] = {**r, "ratios": ratios}
            self.rows.append(Row(label, _fmt(c), _fmt(t), f"{c / t:.2f}× cmwq/TPE", "", None,
                                 "runs: " + _runs(ratios)))

    def round_trip(self) -> None:
        n = self.p.rt_iters
        self.log(f"round trip: {n:,} submit->result x {self.p.repeats} runs each")
        r = alternate({"cmwq": lambda: run_round_trip(CMWQExecutor, n),
                       "tpe": lambda: run_round_trip(ThreadPoolExecutor, n)}, self.p.repeats)
        c, t = median(r["cmwq"]), median(r["tpe"])
        faster = [b / a for a, b in zip(r["cmwq"], r["tpe"], strict=True)]
        self.raw["round_trip_us"] = {**r, "faster": faster}
        self.rows.append(Row("submit→result round trip, idle executor (median µs)", _fmt(c, " µs"),
                             _fmt(t, " µs"), f"{t / c:.2f}× faster", "≥ 1.25× faster on every run",
                             min(faster) >= 1.25, "runs: " + _runs(faster)))

    def cpu_bound(self) -> None:
        loops = calibrate_spin(self.p.cpu_ms)
        n = self.p.cpu_tasks
        self.log(f"CPU-bound: {n} tasks of ~{self.p.cpu_ms} ms ({loops:,} loops) "
                 f"x {self.p.repeats} runs each")
        r = alternate({"cmwq": lambda: case_cpu(CMWQExecutor, loops, n, lambda e: cmwq_workers),
                       "tpe": lambda: case_cpu(ThreadPoolExecutor, loops, n, tpe_threads)}, self.p.repeats)
        self.raw["cpu_bound"] = {"loops": loops, **r}
        c = median([x["wall_s"] for x in r["cmwq"]])
        t = median([x["wall_s"] for x in r["tpe"]])
        # The same spins, timed on the threads that ran them: when the machine runs them slower
        # in one executor's turns (steal, frequency), the wall times move with it.
        cc = median([x["task_cpu_s"] for x in r["cmwq"]])
        tc = median([x["task_cpu_s"] for x in r["tpe"]])
        self.rows.append(Row(f"{n} CPU-bound tasks of ~{self.p.cpu_ms:g} ms: wall time",
                             _fmt(c * 1000, " ms"), _fmt(t * 1000, " ms"), f"{t / c:.2f}× TPE/cmwq",
                             "≥ 1× (TPE's speed)", t / c >= 1.0,
                             f"CPU time inside the calls: cmwq {cc * 1000:,.0f} ms, TPE {tc * 1000:,.0f} ms "
                             f"({tc / cc:.2f}×); wall minus it: cmwq {(c - cc) * 1000:,.0f} ms, "
                             f"TPE {(t - tc) * 1000:,.0f} ms"))
        # What the wall time beyond the calls is made of: one runner finishes the calls in order,
        # one every ~cpu_ms, so the submitting thread sleeps for most results, and each wake takes
        # the GIL from the runner; TPE's threads finish calls in bunches (docs/benchmarks.md).
        c_slept, t_slept = (median([x["waits_that_blocked"] for x in r[k]]) for k in ("cmwq", "tpe"))
        c_waits, t_waits = (median([x["waits_cpu_s"] for x in r[k]]) * 1000 for k in ("cmwq", "tpe"))
        self.rows.append(Row("  … submitting thread: results it slept for; CPU of its waits",
                             f"{c_slept:.0f}; {c_waits:.1f} ms", f"{t_slept:.0f}; {t_waits:.1f} ms",
                             "", "", None,
                             "each sleep a wake-up and a GIL hand-off from the runner (medians)"))
        cw = max(x["peak_executor_threads"] for x in r["cmwq"])
        tw = max(x["peak_executor_threads"] for x in r["tpe"])
        cran = max(x["threads_that_ran_tasks"] for x in r["cmwq"])
        tran = max(x["threads_that_ran_tasks"] for x in r["tpe"])
        self.rows.append(Row("  … worker threads (peak; of them ran tasks)", f"{cw} ({cran} ran)",
                             f"{tw} ({tran} ran)", "", f"cmwq ≤ nCPU+2 = {NCPU + 2}", cw <= NCPU + 2,
                             "cmwq: all pools' nr_workers summed; cm_wakeups per run "
                             + ",".join(str(x["counters"]["cm_wakeups"]) for x in r["cmwq"])))
        cb = max(x["peak_threads_beyond_start"] for x in r["cmwq"])
        self.rows.append(Row("  … threads beyond the process's start (peak)", str(cb), str(tw), "",
                             "≤ TPE's, at ≥ TPE's speed", cb <= tw and t / c >= 1.0,
                             "cmwq: every thread it started (workers, the timer thread, the rescuer)"))

    def plugin_overhead(self) -> None:
        n = self.p.noop_tasks
        pairs = self.p.plugin_pairs
        self.log(f"plugin-manager overhead: {pairs} pairs of no-op runs, {n:,} tasks each")
        plugin = _IdlePlugin()
        name = "bench.idle_plugin"

        def with_plugin() -> float:
            cmwq_plugin.register(plugin, name=name)
            try:
                return run_noop_throughput(CMWQExecutor, n)
            finally:
                cmwq_plugin.unregister(name=name)

        r = alternate({"without": lambda: run_noop_throughput(CMWQExecutor, n), "with": with_plugin}, pairs)
        ratios = [w / wo for w, wo in zip(r["with"], r["without"], strict=True)]
        # Noise here only ever slows a run down (another process takes the CPU), and the code path
        # under test is the same either way, so compare the best runs (timeit's rule); the median
        # of the paired ratios is shown too.
        best = max(r["with"]) / max(r["without"])
        paired = median(ratios)
        self.raw["plugin_overhead"] = {**r, "ratios": ratios, "best_ratio": best, "median_pair_ratio": paired}
        overhead = 1 - best
        self.side_rows.append(Row("no-op tasks/s, best of runs: without / with an idle event-hook plugin",
                                  _fmt(max(r["without"])), _fmt(max(r["with"])),
                                  f"{best:.3f}× with/without", "overhead ≤ 5%", overhead <= 0.05,
                                  f"overhead {overhead * 100:+.1f}% (median of {pairs} pairs: "
                                  f"{(1 - paired) * 100:+.1f}%)"))

    def sleep_blocking(self) -> None:
        n = self.p.sleep_tasks
        self.log(f"sleep in blocking(): {n} x 10 ms x {self.p.repeats} runs each (and TPE(500))")
        r = alternate({
            "cmwq": lambda: case_sleep(CMWQExecutor, sleep_blocking, n, lambda e: cmwq_workers),
            "tpe": lambda: case_sleep(ThreadPoolExecutor, sleep_blocking, n, tpe_threads),
            "tpe500": lambda: case_sleep(lambda: ThreadPoolExecutor(500), sleep_blocking, n, tpe_threads),
        }, self.p.repeats)
        self.raw["sleep_blocking"] = r
        c = median([x["wall_s"] for x in r["cmwq"]])
        t = median([x["wall_s"] for x in r["tpe"]])
        t500 = median([x["wall_s"] for x in r["tpe500"]])
        cold = r["cmwq"][0]["wall_s"]
        self.rows.append(Row(f"{n} × 10 ms sleep inside blocking(): wall time", _fmt(c * 1000, " ms"),
                             _fmt(t * 1000, " ms"), f"{t / c:.1f}× TPE/cmwq", "≥ 8× faster", t / c >= 8,
                             f"cmwq cold first run {cold * 1000:.0f} ms; TPE(500) {t500 * 1000:.0f} ms"))
        # first run: a fresh process, no idle workers yet; later runs find the idle workers of the
        # earlier ones (and may grow the other CPU's pool too, if the submitter migrated)
        cb0 = r["cmwq"][0]["peak_threads_beyond_start"]
        cbn = max(x["peak_threads_beyond_start"] for x in r["cmwq"][1:])
        t5w0 = r["tpe500"][0]["peak_executor_threads"]
        t5w = max(x["peak_executor_threads"] for x in r["tpe500"])
        self.rows.append(Row("  … threads beyond the process's start, first run (vs ThreadPoolExecutor(500))",
                             str(cb0), str(t5w0), f"{cb0 / t5w0:.2f}× cmwq/TPE(500)",
                             "fewer than TPE(500), at ≤ its time", cb0 < t5w0 and c <= t500,
                             f"cmwq {c * 1000:.0f} ms vs TPE(500) {t500 * 1000:.0f} ms (medians)"))
        self.rows.append(Row("  … repeated bursts: peak over the later runs (vs TPE(500), all runs)",
                             str(cbn), str(t5w), f"{cbn / t5w:.2f}× cmwq/TPE(500)", "≤ TPE(500)'s",
                             cbn <= t5w, "later runs find the idle workers of the earlier ones"))

    def barrier(self) -> None:
        n = self.p.barrier_tasks
        self.log(f"{n} calls meeting at a Barrier after 2 bursts of 10 ms waits x {self.p.repeats} runs "
                 "(cmwq and TPE(500))")
        r = alternate({
            "cmwq": lambda: case_barrier(CMWQExecutor, n, 2, lambda e: cmwq_workers),
            "tpe500": lambda: case_barrier(lambda: ThreadPoolExecutor(500), n, 2, tpe_threads),
        }, self.p.repeats)
        self.raw["barrier"] = r
        ok = all(x["completed"] for x in r["cmwq"])
        c = median([x["wall_s"] for x in r["cmwq"]])
        t5 = median([x["wall_s"] for x in r["tpe500"]])
        self.rows.append(Row(f"{n} calls that wait for each other (a Barrier), after bursts of short waits",
                             f"done, {_fmt(c * 1000, ' ms')}" if ok else "NOT completed",
                             f"TPE(500) {_fmt(t5 * 1000, ' ms')}", f"{c / t5:.2f}× cmwq/TPE(500) time",
                             "cmwq completes", ok,
                             "runs (ms): " + ", ".join(f"{x['wall_s'] * 1000:.0f}" for x in r["cmwq"])
                             + "; a paced pool waits at most create_hold_max for sleepers due back"))

    def sleep_plain(self) -> None:
        n = self.p.plain_tasks
        reps = self.p.plain_repeats
        self.log(f"plain time.sleep (watchdog): {n} x 10 ms x {reps} runs each")
        r = alternate({
            "cmwq": lambda: case_sleep(CMWQExecutor, sleep_plain, n, lambda e: cmwq_workers),
            "tpe": lambda: case_sleep(ThreadPoolExecutor, sleep_plain, n, tpe_threads),
            "tpe500": lambda: case_sleep(lambda: ThreadPoolExecutor(500), sleep_plain, n, tpe_threads),
        }, reps)
        self.raw["sleep_plain"] = r
        c = median([x["wall_s"] for x in r["cmwq"]])
        t = median([x["wall_s"] for x in r["tpe"]])
        cb = max(x["peak_threads_beyond_start"] for x in r["cmwq"])
        t5w = max(x["peak_executor_threads"] for x in r["tpe500"])
        self.rows.append(Row(f"{n} × 10 ms un-annotated time.sleep: wall time", _fmt(c * 1000, " ms"),
                             _fmt(t * 1000, " ms"), f"{t / c:.1f}× TPE/cmwq", "≥ 4× faster", t / c >= 4,
                             "watchdog-driven"))
        self.rows.append(Row("  … threads beyond the process's start (vs ThreadPoolExecutor(500))",
                             str(cb), str(t5w), f"{cb / t5w:.2f}× cmwq/TPE(500)", "≤ TPE(500)'s",
                             cb <= t5w, ""))

    def nested(self) -> None:
        n, timeout = self.p.fib_n, self.p.deadlock_timeout
        self.log(f"nested submit-and-wait fib({n}); ThreadPoolExecutor waited {timeout:g} s")
        # cmwq first (a few times, it is quick), then the TPE attempts, whose threads may stay stuck
        cm_default = [nested_cmwq(n, None, 30.0) for _ in range(self.p.repeats)]
        cm_four = [nested_cmwq(n, 4, 30.0) for _ in range(self.p.repeats)]
        tp_default = nested_tpe(n, None, timeout)
        tp_four = nested_tpe(n, 4, timeout)
        self.raw["nested"] = {"cmwq_default": cm_default, "cmwq_max4": cm_four,
                              "tpe_default": tp_default, "tpe_max4": tp_four}
        for label, cm, tp in (("defaults", cm_default, tp_default), ("max_workers=4", cm_four, tp_four)):
            ok = all(x["completed"] for x in cm)
            cell_c = (f"done, {_fmt(median([x['wall_s'] for x in cm]) * 1000, ' ms')}" if ok
                      else "NOT completed")
            if tp["completed"]:
                cell_t = f"done, {_fmt(tp['wall_s'] * 1000, ' ms')}"
                note = ""
            else:
                cell_t = f"deadlocked ({timeout:g} s timeout)"
                note = (f"TPE: {tp['threads']} threads all waiting; "
                        f"{tp['stuck_threads_after_abandon']} still stuck after cancel_futures")
            self.rows.append(Row(f"nested submit-and-wait fib({n}), {label}", cell_c, cell_t, "",
                                 "cmwq completes", ok, note))

    def pinning(self) -> None:
        procs = self.p.pin_procs
        self.log(f"pinning: {procs} subprocess(es) per setting, alternating")
        results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        for i in range(procs):
            for setting in ("on", "off") if i % 2 == 0 else ("off", "on"):
                results[setting].append(self._pin_probe(setting == "on"))
        self.raw["pinning"] = results
        thr = {k: median([x["throughput"] for x in v]) for k, v in results.items()}
        rt = {k: median([x["round_trip_us"] for x in v]) for k, v in results.items()}
        better_thr = "pinned" if thr["on"] > thr["off"] else "unpinned"
        better_rt = "pinned" if rt["on"] < rt["off"] else "unpinned"
        self.side_rows.append(Row("no-op tasks/s: pin_workers=True / False", _fmt(thr["on"]),
                                  _fmt(thr["off"]),
                                  f"{thr['on'] / thr['off']:.2f}× on/off", "pick the better default", None,
                                  f"{better_thr} is better"))
        self.side_rows.append(Row("round trip µs: pin_workers=True / False", _fmt(rt["on"], " µs"),
                                  _fmt(rt["off"], " µs"), f"{rt['on'] / rt['off']:.2f}× on/off",
                                  "pick the better default", None, f"{better_rt} is better"))
        self.raw["pinning_summary"] = {"throughput": thr, "round_trip_us": rt,
                                       "better_throughput": better_thr, "better_round_trip": better_rt}

    def _pin_probe(self, pin: bool) -> dict[str, float]:
        env = dict(os.environ, CMWQ_PIN_WORKERS="1" if pin else "0")
        cmd = [sys.executable, os.path.abspath(__file__), "--pin-probe",
               "--quick" if self.quick else "--full"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True)
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        assert probe["pin_workers"] == pin, probe
        return probe

    # -- the whole run

    #: Cases in running order. Each runs in a fresh subprocess by default (both executors inside it,
    #: alternating), so no case inherits another's idle cmwq workers (reaped only after
    #: idle_timeout), registered plugins or stuck ThreadPoolExecutor threads.
    CASES = ("noop_throughput", "round_trip", "cpu_bound", "plugin_overhead", "sleep_blocking",
             "barrier", "sleep_plain", "nested")

    def run(self, in_process: bool) -> None:
        for case in self.CASES:
            if in_process:
                getattr(self, case)()
            else:
                self._run_case_subprocess(case)
        self.pinning()  # always subprocesses: pinning is a per-process setting

    def _run_case_subprocess(self, case: str) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--case", case]
        if self.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"case {case} failed with exit status {proc.returncode}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        self.rows += [Row(**r) for r in out["rows"]]
        self.side_rows += [Row(**r) for r in out["side_rows"]]
        self.raw.update(out["raw"])

    def dump(self) -> str:
        return json.dumps({"rows": [dataclasses.asdict(r) for r in self.rows],
                           "side_rows": [dataclasses.asdict(r) for r in self.side_rows],
                           "raw": self.raw}, default=str)


def pin_probe(params: Params) -> None:
    """Child process of the pinning case: throughput and round trip with the environment's setting."""
    reps = max(3, params.repeats - 2)
    thr = [run_noop_throughput(CMWQExecutor, params.noop_tasks // 2) for _ in range(reps)]
    rt = [run_round_trip(CMWQExecutor, params.rt_iters) for _ in range(reps)]
    print(json.dumps({"pin_workers": cmwq_exec.get_system().config.pin_workers,
                      "throughput": median(thr), "round_trip_us": median(rt)}))


def machine() -> dict[str, Any]:
    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return {"ncpu": NCPU, "cpu_model": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "kernel": platform.release(),
            "cmwq_exec": cmwq_exec.__version__,
            "tpe_default_workers": min(32, (os.cpu_count() or 1) + 4)}


def markdown(rows: list[Row], head: tuple[str, str]) -> str:
    lines = [f"| figure | {head[0]} | {head[1]} | ratio | target | met? | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.figure.strip().replace('…', '↳')} | {r.a} | {r.b} | {r.ratio} | {r.target} | "
                     f"{_met(r.met)} | {r.note} |")
    return "\n".join(lines)


def print_tables(bench: Bench, info: dict[str, Any]) -> None:
    """The rows as tables that fit a terminal: the long notes are numbered footnotes under each."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=min(shutil.get_terminal_size((100, 24)).columns, 120))
    for title, rows, head in (("cmwq_exec vs ThreadPoolExecutor (TPE; medians)", bench.rows, ("cmwq", "TPE")),
                              ("cmwq_exec settings", bench.side_rows, ("A", "B"))):
        table = Table(title=title, title_justify="left")
        for col in ("figure", head[0], head[1], "ratio", "target", "met?", "note"):
            table.add_column(col, overflow="fold")
        notes: list[str] = []
        for r in rows:
            met = _met(r.met)
            style = {"yes": "green", "NO": "bold red"}.get(met, "")
            cell = f"[{style}]{met}[/]" if style else met
            mark = ""
            if r.note:
                notes.append(r.note)
                mark = f"[{len(notes)}]"
            table.add_row(r.figure, r.a, r.b, r.ratio, r.target, cell, mark)
        console.print(table)
        for i, note in enumerate(notes, 1):
            console.print(f"  [{i}] {note}", markup=False, highlight=False)
    console.print(f"machine: {info['ncpu']} CPUs ({info['cpu_model']}), {info['implementation']} "
                  f"{info['python']}, Linux {info['kernel']}; TPE() = ThreadPoolExecutor() with its default "
                  f"{info['tpe_default_workers']} workers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=os.environ.get("_CMWQ_BENCH_PROG"),  # set by `cmwq-exec bench`
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller figures, under ~40 s")
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="FILE", help="also write every figure (and raw runs) as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown")
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this one process (default: a fresh subprocess per case)")
    parser.add_argument("--pin-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=Bench.CASES,
                        help="run only this case; prints its rows and raw figures as JSON")
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    if args.pin_probe:
        pin_probe(params)
        return 0

    started = float(os.environ.get("_CMWQ_BENCH_T0", 0)) or time.time()
    os.environ["_CMWQ_BENCH_T0"] = repr(started)  # case subprocesses log the driver's elapsed time

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    if args.case:  # child of the driver: one case, its rows as JSON on the last line of stdout
        bench = Bench(params, args.quick, log)
        getattr(bench, args.case)()
        print(bench.dump(), flush=True)
        sys.stderr.flush()
        os._exit(0)  # never wait at exit for a ThreadPoolExecutor thread left stuck by the case

    info = machine()
    bench = Bench(params, args.quick, log)
    bench.run(args.in_process)
    info["duration_s"] = round(time.time() - started, 1)
    info["mode"] = "quick" if args.quick else "full"
    print_tables(bench, info)
    print(f"total {info['duration_s']} s ({info['mode']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "params": dataclasses.asdict(params),
                       "rows": [dataclasses.asdict(r) for r in bench.rows],
                       "settings_rows": [dataclasses.asdict(r) for r in bench.side_rows],
                       "raw": bench.raw}, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(bench.rows, ("cmwq", "TPE")) + "\n\n"
                    + markdown(bench.side_rows, ("A", "B")) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    if args.in_process:
        # A ThreadPoolExecutor thread left stuck by the deadlock case would keep the interpreter's
        # exit waiting for it (its threads are joined at exit): leave at once instead.
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
