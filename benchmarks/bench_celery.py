"""Celery worker pools side by side: cmwq_exec.celery:TaskPool vs ``-P threads`` vs prefork.

Same broker (RabbitMQ by default, ``--broker redis`` for Redis), same tasks (tests/celery/app.py:
``b.io`` sleeps ``--io-ms`` (10) ms inside ``cmwq_exec.blocking()``, ``b.cpu`` spins pure Python,
``mix`` is half of each; none stores a result, each counts its completion with one Redis INCR).
For every pool configuration a real ``celery worker`` is started; for every workload its queue
consumer is paused, the whole batch is published, the consumer resumed and the clock runs until
the last completion is counted. Meanwhile the worker's threads (summed over its process tree, so
prefork's children count) are sampled from /proc. All the workers are up for the whole run and the
batches go round-robin over them, so a noisy machine slows every pool alike.

    python benchmarks/bench_celery.py --quick        # a few minutes
    python benchmarks/bench_celery.py                # larger batches, median of 3: ~15 minutes
    python benchmarks/bench_celery.py --io-ms 50 --workloads io   # I/O tasks that wait 50 ms

Prints one table: tasks/s, tasks/s relative to ``-P threads`` at the same -c, peak threads, and the
CPU time the worker's process tree used per task (user + system, from /proc).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "tests" / "celery"
sys.path[:0] = [str(APP_DIR), str(ROOT)]

import redis  # noqa: E402
from app import DEFAULT_BACKEND, make_app  # noqa: E402
from celery_harness import Worker  # noqa: E402

BROKERS = {"redis": "redis://127.0.0.1:6379/12", "amqp": "amqp://guest:guest@127.0.0.1:5672//"}
CPU_ITERATIONS = 20_000  # ~1.5 ms of pure Python on this machine's cores


@dataclass(frozen=True)
class Config:
    label: str
    pool: str  # "cmwq", "threads", "prefork"
    concurrency: int


@dataclass
class Result:
    config: Config
    workload: str
    tasks: int
    seconds: float
    peak_threads: int
    cpu_seconds: float  # user + system CPU of the worker's process tree during the batch

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds

    @property
    def cpu_ms_per_task(self) -> float:
        return self.cpu_seconds * 1000 / self.tasks


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its children (prefork's pool processes)."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by ``pid`` and its children."""
    ticks = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_threads(pid: int) -> int:
    """Threads of ``pid`` and its children (prefork's pool processes)."""
    total = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class ThreadSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.peak = max(self.peak, tree_threads(self.pid))
            self.stopping.wait(0.02)

    def stop(self) -> int:
        self.stopping.set()
        self.join()
        return max(self.peak, tree_threads(self.pid))


def run_batch(app: Any, config: Config, worker: Worker, queue: str, store: redis.Redis, workload: str,
              n: int, timeout: float, io_seconds: float) -> Result | None:
    """With the worker's consumer paused: publish ``n`` tasks, resume it, time until all are counted,
    pause it again."""
    key = f"cmwq-bench:{uuid.uuid4().hex[:8]}"
    io, cpu = app.tasks["b.io"], app.tasks["b.cpu"]
    with app.producer_or_acquire() as producer:
        for i in range(n):
            if workload == "io" or (workload == "mix" and i % 2 == 0):
                io.apply_async((key, io_seconds), producer=producer)
            else:
                cpu.apply_async((key, CPU_ITERATIONS), producer=producer)
    sampler = ThreadSampler(worker.pid)
    sampler.start()
    cpu_started = tree_cpu_seconds(worker.pid)
    started = time.perf_counter()
    app.control.add_consumer(queue, destination=[worker.name], reply=True, timeout=5)
    deadline = time.monotonic() + timeout
    done = 0
    while done < n and time.monotonic() < deadline:
        time.sleep(0.005)
        done = int(store.get(key) or 0)
    seconds = time.perf_counter() - started
    cpu_seconds = tree_cpu_seconds(worker.pid) - cpu_started
    peak = sampler.stop()
    app.control.cancel_consumer(queue, destination=[worker.name], reply=True, timeout=5)
    store.delete(key)
    if done < n:
        print(f"  {workload}: only {done}/{n} done within {timeout}s", file=sys.stderr)
        with app.connection_for_write() as conn:  # drop what is left before the next batch
            conn.default_channel.queue_purge(queue)
        return None
    return Result(config, workload, n, seconds, peak, cpu_seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches (about a minute in all)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="the common -c (default 8)")
    parser.add_argument("--large", type=int, default=100, help="the large -c (default 100)")
    parser.add_argument("--workloads", default="io,cpu,mix")
    parser.add_argument("--repeat", type=int, default=None,
                        help="batches per workload, the median is kept (default 1 with --quick, else 3)")
    parser.add_argument("--pools", default=None,
                        help="comma-separated labels to run, e.g. 'cmwq -c 8,threads -c 8' (default: all)")
    parser.add_argument("--logs", default="/tmp", help="where worker logs go")
    parser.add_argument("--io-ms", type=float, default=10.0,
                        help="how long an io task waits, in ms (default 10)")
    parser.add_argument("--broker", choices=sorted(BROKERS), default="amqp",
                        help="the broker every pool is fed from (default amqp: kombu's Redis transport "
                             "costs ~2 ms of CPU per task here and caps every pool near 500 tasks/s)")
    args = parser.parse_args()

    scale = 1 if args.quick else 2
    sizes = {"io": 1500 * scale, "cpu": 400 * scale, "mix": 1000 * scale}
    c, big = args.concurrency, args.large
    # threads at 2c and 4c show how many threads -P threads needs to catch up with cmwq at c
    configs = [
        Config(f"cmwq -c {c}", "cmwq", c),
        Config(f"threads -c {c}", "threads", c),
        Config(f"threads -c {2 * c}", "threads", 2 * c),
        Config(f"threads -c {4 * c}", "threads", 4 * c),
        Config(f"cmwq -c {big}", "cmwq", big),
        Config(f"threads -c {big}", "threads", big),
        Config(f"prefork -c {os.cpu_count()}", "prefork", os.cpu_count() or 2),
    ]
    if args.pools:
        wanted = {label.strip() for label in args.pools.split(",")}
        configs = [config for config in configs if config.label in wanted]
    repeat = args.repeat or (1 if args.quick else 3)
    workloads = [w for w in args.workloads.split(",") if w]
    store = redis.Redis.from_url(DEFAULT_BACKEND)
    store.ping()
    results: list[Result] = []
    broker = BROKERS[args.broker]
    print(f"broker {broker}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average "
          f"{os.getloadavg()[0]:.2f}; io = {args.io_ms:g} ms sleep, cpu = {CPU_ITERATIONS} "
          f"loop iterations; median of {repeat}", flush=True)
    # Every worker is started first and stays up; batches then go round-robin over the pools
    # (repeat, workload, pool), so load from outside the benchmark (other jobs, steal time on a
    # shared VM) falls on every pool alike instead of on whichever ran during it. Idle workers
    # have their consumers paused (run_batch resumes only the one measured).
    setups: list[tuple[Config, Any, Worker, str]] = []
    try:
        for config in configs:
            queue = f"cmwq-bench-{uuid.uuid4().hex[:8]}"
            app = make_app(broker, queue=queue)
            log = Path(args.logs) / f"bench-{config.pool}-{config.concurrency}.log"
            via = "custom" if config.pool == "cmwq" else config.pool
            worker = Worker(app, broker, queue, log, concurrency=config.concurrency, via=via,
                            loglevel="warning")
            setups.append((config, app, worker, queue))
            worker.wait_ready(timeout=60)
            reply = app.control.cancel_consumer(queue, destination=[worker.name], reply=True, timeout=5)
            assert reply, f"worker {worker.name} did not pause its consumer"
        runs: dict[tuple[str, str], list[Result | None]] = {}
        for _ in range(repeat):
            for workload in workloads:
                for config, app, worker, queue in setups:
                    result = run_batch(app, config, worker, queue, store, workload, sizes[workload],
                                       timeout=120, io_seconds=args.io_ms / 1000)
                    runs.setdefault((config.label, workload), []).append(result)
                    if result is not None:
                        print(f"  {config.label:18} {workload:4} {result.rate:9.0f} tasks/s "
                              f"{result.peak_threads:5d} threads {result.cpu_ms_per_task:6.2f} CPU ms/task",
                              flush=True)
        for config, *_ in setups:
            for workload in workloads:
                got = runs[(config.label, workload)]
                done = sorted((r for r in got if r is not None), key=lambda r: r.rate)
                if len(done) == len(got):
                    result = done[len(done) // 2]
                    result.peak_threads = max(r.peak_threads for r in done)
                    results.append(result)
    finally:
        for _config, app, worker, queue in setups:
            worker.kill()
            try:
                with app.connection_for_write() as conn:
                    conn.default_channel.queue_delete(queue)
            except Exception:  # noqa: BLE001
                pass
            app.close()
    print_table(results, c)
    return 0


def print_table(results: list[Result], c: int) -> None:
    base = {r.workload: r.rate for r in results if r.config.pool == "threads" and r.config.concurrency == c}
    print()
    print(f"| pool | workload | tasks | tasks/s | vs threads -c {c} | peak threads | CPU ms/task |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{r.rate / base[r.workload]:.2f}x" if r.workload in base else "-"
        print(f"| {r.config.label} | {r.workload} | {r.tasks} | {r.rate:.0f} | {ratio} | {r.peak_threads} "
              f"| {r.cpu_ms_per_task:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
