"""Celery worker pools side by side: cmwq_exec.celery:TaskPool vs ``-P threads`` vs prefork.

Same broker (Redis), same tasks (tests/celery/app.py: ``b.io`` sleeps 10 ms inside
``cmwq_exec.blocking()``, ``b.cpu`` spins pure Python, ``mix`` is half of each; none stores a result,
each counts its completion with one Redis INCR). For every pool configuration a real ``celery worker``
is started; for every workload its queue consumer is paused, the whole batch is published, the
consumer resumed and the clock runs until the last completion is counted. Meanwhile the worker's
threads (summed over its process tree, so prefork's children count) are sampled from /proc.

    python benchmarks/bench_celery.py --quick        # about a minute
    python benchmarks/bench_celery.py                # larger batches, a few minutes

Prints one table: tasks/s, peak threads, and tasks/s relative to ``-P threads`` at the same -c.
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
IO_SECONDS = 0.010
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

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


def tree_threads(pid: int) -> int:
    """Threads of ``pid`` and its children (prefork's pool processes)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
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
              n: int, timeout: float) -> Result | None:
    """Pause the consumer, publish ``n`` tasks, resume it, time until all are counted."""
    key = f"cmwq-bench:{uuid.uuid4().hex[:8]}"
    reply = app.control.cancel_consumer(queue, destination=[worker.name], reply=True, timeout=5)
    assert reply, f"worker {worker.name} did not pause its consumer"
    io, cpu = app.tasks["b.io"], app.tasks["b.cpu"]
    with app.producer_or_acquire() as producer:
        for i in range(n):
            if workload == "io" or (workload == "mix" and i % 2 == 0):
                io.apply_async((key, IO_SECONDS), producer=producer)
            else:
                cpu.apply_async((key, CPU_ITERATIONS), producer=producer)
    sampler = ThreadSampler(worker.pid)
    sampler.start()
    started = time.perf_counter()
    app.control.add_consumer(queue, destination=[worker.name], reply=True, timeout=5)
    deadline = time.monotonic() + timeout
    done = 0
    while done < n and time.monotonic() < deadline:
        time.sleep(0.005)
        done = int(store.get(key) or 0)
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    store.delete(key)
    if done < n:
        print(f"  {workload}: only {done}/{n} done within {timeout}s", file=sys.stderr)
        with app.connection_for_write() as conn:  # drop what is left before the next batch
            conn.default_channel.queue_purge(queue)
        return None
    return Result(config, workload, n, seconds, peak)


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
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis",
                        help="the broker every pool is fed from (default redis)")
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
          f"{os.getloadavg()[0]:.2f}; io = {IO_SECONDS * 1000:.0f} ms sleep, cpu = {CPU_ITERATIONS} "
          f"loop iterations; median of {repeat}", flush=True)
    for config in configs:
        queue = f"cmwq-bench-{uuid.uuid4().hex[:8]}"
        app = make_app(broker, queue=queue)
        log = Path(args.logs) / f"bench-{config.pool}-{config.concurrency}.log"
        via = "custom" if config.pool == "cmwq" else config.pool
        worker = Worker(app, broker, queue, log, concurrency=config.concurrency, via=via, loglevel="warning")
        try:
            worker.wait_ready(timeout=60)
            for workload in workloads:
                runs = [run_batch(app, config, worker, queue, store, workload, sizes[workload], timeout=120)
                        for _ in range(repeat)]
                done = sorted((r for r in runs if r is not None), key=lambda r: r.rate)
                result = done[len(done) // 2] if len(done) == len(runs) else None
                if result is not None:
                    result.peak_threads = max(r.peak_threads for r in done)
                    results.append(result)
                    print(f"  {config.label:18} {workload:4} {result.rate:9.0f} tasks/s "
                          f"{result.peak_threads:5d} threads", flush=True)
        finally:
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
    print(f"| pool | workload | tasks | tasks/s | vs threads -c {c} | peak threads |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{r.rate / base[r.workload]:.2f}x" if r.workload in base else "-"
        print(f"| {r.config.label} | {r.workload} | {r.tasks} | {r.rate:.0f} | {ratio} | {r.peak_threads} |")


if __name__ == "__main__":
    sys.exit(main())
