"""Memory a worker keeps per task: the Celery pool with and without time limits against prefork,
and the timer heap after many cancelled delayed works.

For each pool a real ``celery worker`` is started on a Redis broker (tests/celery/app.py, the
``b.cpu`` task with 0 iterations: a no-op that counts its completion with one Redis INCR, stores no
result). A warm-up batch (a tenth of the tasks, at most 1,000) runs first, so that what a worker
allocates once (connections, caches, the first threads) is not counted. Then the resident memory
of the worker's whole process tree (the sum of every process's VmRSS, from /proc) is read, the
``--tasks`` tasks run, and it is read again once all are counted. Rows:

* ``cmwq -c 8`` with ``--time-limit 3600 --soft-time-limit 3000``: every task arms two timers
  (the limits) and cancels them when it ends;
* ``cmwq -c 8`` without limits;
* ``prefork -c N`` (N = the usable CPUs) with the same limits.

The in-process row runs in a fresh interpreter: RSS growth over ``--delayed`` times
``wq.queue_delayed_work(dw, 3600); dw.cancel()`` (after a warm-up of 1,000), and the length of the
process's timer heap after them (what the cancelled timers still occupy).

    python benchmarks/bench_memory.py --quick      # 3,000 tasks per pool, 100,000 delayed works
    python benchmarks/bench_memory.py              # 30,000 tasks per pool, 1,000,000 delayed works
    python benchmarks/bench_memory.py --tasks 100000 --redis-broker-db 6 --redis-backend-db 7

Prints one table: RSS before and after, growth, KiB per task, and the growth relative to prefork
with limits and to this pool without limits. The figures are RSS: freed memory the allocator keeps
still counts, so a KiB or two per task is noise; a leak shows as tens of MiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "celery"), str(ROOT)]

import redis  # noqa: E402
from app import make_app  # noqa: E402
from bench_celery import PROCESSES, tree_threads_rss  # noqa: E402
from celery_harness import Worker  # noqa: E402

#: Redis databases no other benchmark or test of this repository writes to (bench_celery: 12, 14;
#: tests/celery: 13, 14; the Celery suite: 10, 11).
REDIS = "redis://127.0.0.1:6379"
REDIS_BROKER_DB, REDIS_BACKEND_DB = 8, 9
LIMITS = ("--time-limit", "3600", "--soft-time-limit", "3000")
DELAYED_WARMUP = 1000


@dataclass(frozen=True)
class Pool:
    label: str
    kind: str  # "cmwq" or "prefork"
    concurrency: int
    limits: bool


@dataclass
class Row:
    pool: Pool
    tasks: int
    before_kib: int
    after_kib: int

    @property
    def growth_kib(self) -> int:
        return self.after_kib - self.before_kib

    @property
    def kib_per_task(self) -> float:
        return self.growth_kib / self.tasks


def rss_kib() -> int:
    """VmRSS of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmRSS")


def delayed_cancels(n: int) -> dict[str, Any]:
    """In this process: queue and cancel one DelayedWork ``n`` times with an hour's delay."""
    import cmwq_exec
    from cmwq_exec import DelayedWork, WorkQueue
    from cmwq_exec.core import timer

    wq = WorkQueue(f"bench-memory-{uuid.uuid4().hex[:6]}")
    dw = DelayedWork(lambda: None)
    for _ in range(DELAYED_WARMUP):
        wq.queue_delayed_work(dw, 3600)
        dw.cancel()
    gc.collect()
    before = rss_kib()
    started = time.perf_counter()
    for _ in range(n):
        wq.queue_delayed_work(dw, 3600)
        dw.cancel()
    seconds = time.perf_counter() - started
    gc.collect()
    after = rss_kib()
    heap = len(timer._wheel.heap)
    wq.destroy()
    return {"n": n, "before_kib": before, "after_kib": after, "seconds": seconds, "heap": heap,
            "cmwq_exec": str(Path(cmwq_exec.__file__).parent)}


def run_delayed(n: int) -> dict[str, Any]:
    """:func:`delayed_cancels` in a fresh interpreter that imports cmwq_exec from this tree."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__, "--in-process", str(n)], env=env, check=True,
                         capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def counted(store: redis.Redis, key: str) -> int:
    return int(store.get(key) or 0)  # type: ignore[arg-type]


def run_tasks(app: Any, store: redis.Redis, n: int, timeout: float, worker: Worker) -> None:
    """Publish ``n`` no-op tasks and wait until the worker has counted them all."""
    key = f"cmwq-bench-memory:{uuid.uuid4().hex[:8]}"
    task = app.tasks["b.cpu"]
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            task.apply_async((key, 0), producer=producer)
    deadline = time.monotonic() + timeout
    while counted(store, key) < n:  # >=: a message restored to the queue may run twice
        if not worker.alive():
            raise RuntimeError(f"worker exited with {worker.proc.returncode}:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {counted(store, key)}/{n} tasks done after {timeout:.0f} s\n"
                               f"{worker.tail()}")
        time.sleep(0.05)
    store.delete(key)


def measure(pool: Pool, n: int, broker: str, backend: str, logs: Path) -> Row:
    """Start ``pool``'s worker, warm it up, run ``n`` tasks; its tree's RSS before and after."""
    queue = f"cmwq-bench-memory-{uuid.uuid4().hex[:8]}"
    app = make_app(broker, backend=backend, queue=queue)
    store = redis.Redis.from_url(backend)
    slug = pool.label.replace(" ", "-")
    worker = Worker(app, broker, queue, logs / f"bench-memory-{slug}.log", concurrency=pool.concurrency,
                    via="custom" if pool.kind == "cmwq" else pool.kind,
                    args=LIMITS if pool.limits else (), env={"CMWQ_TEST_BACKEND": backend},
                    loglevel="warning")
    timeout = 120 + n / 50  # the Redis transport serves a few hundred tasks/s on a busy host
    try:
        worker.wait_ready(timeout=60)
        run_tasks(app, store, min(1000, max(n // 10, 1)), timeout, worker)
        before = tree_threads_rss(worker.pid)[1]
        run_tasks(app, store, n, timeout, worker)
        after = tree_threads_rss(worker.pid)[1]
    finally:
        worker.kill()
        try:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
        except Exception:  # noqa: BLE001 - cleaning up after a failed run
            pass
        app.close()
    return Row(pool, n, before, after)


def ratio(growth: int, reference: int | None) -> str:
    """``growth`` relative to ``reference``; "-" when the reference did not grow (no meaning)."""
    if reference is None or reference <= 0:
        return "-"
    return f"{growth / reference:.2f}x"


def print_table(rows: list[Row], delayed: dict[str, Any]) -> None:
    growth = {(r.pool.kind, r.pool.limits): r.growth_kib for r in rows}
    print()
    print("| pool | time limits | tasks | RSS before MiB | RSS after MiB | growth MiB | KiB/task "
          "| vs prefork with limits | vs cmwq without limits |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        limits = "3600 s / soft 3000 s" if r.pool.limits else "none"
        print(f"| {r.pool.label} | {limits} | {r.tasks} | {r.before_kib / 1024:.1f} "
              f"| {r.after_kib / 1024:.1f} | {r.growth_kib / 1024:+.1f} | {r.kib_per_task:.2f} "
              f"| {ratio(r.growth_kib, growth.get(('prefork', True)))} "
              f"| {ratio(r.growth_kib, growth.get(('cmwq', False)))} |")
    grown = delayed["after_kib"] - delayed["before_kib"]
    print()
    print(f"in process: {delayed['n']} x queue_delayed_work(dw, 3600); dw.cancel(): RSS "
          f"{grown / 1024:+.1f} MiB ({grown * 1024 / delayed['n']:.0f} bytes each), timer heap "
          f"{delayed['heap']} entries after, {delayed['seconds'] * 1e6 / delayed['n']:.2f} us per pair")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3,000 tasks per pool and 100,000 delayed works (a few minutes in all)")
    parser.add_argument("--tasks", type=int, default=None, metavar="N",
                        help="tasks per pool (default 30,000; 3,000 with --quick)")
    parser.add_argument("--delayed", type=int, default=None, metavar="N",
                        help="delayed works queued and cancelled (default 1,000,000; 100,000 with --quick)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="the cmwq pool's -c (default 8)")
    parser.add_argument("--redis-broker-db", type=int, default=REDIS_BROKER_DB, metavar="N",
                        help=f"the Redis database of the broker (default {REDIS_BROKER_DB})")
    parser.add_argument("--redis-backend-db", type=int, default=REDIS_BACKEND_DB, metavar="N",
                        help=f"the Redis database of the completion counters (default {REDIS_BACKEND_DB})")
    parser.add_argument("--logs", type=Path, default=Path("/tmp"), help="where worker logs go")
    parser.add_argument("--in-process", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process is not None:
        print(json.dumps(delayed_cancels(args.in_process)))
        return 0
    for option in ("tasks", "delayed", "concurrency"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option} must be a whole number >= 1, got {value}")
    for option in ("redis_broker_db", "redis_backend_db"):
        if not 0 <= getattr(args, option) <= 15:
            parser.error(f"--{option.replace('_', '-')} must be a Redis database number 0-15 (Redis's "
                         f"default 'databases 16'), got {getattr(args, option)}")
    if args.redis_broker_db == args.redis_backend_db:
        parser.error(f"--redis-broker-db and --redis-backend-db must differ, both are {args.redis_broker_db}")
    tasks = args.tasks or (3000 if args.quick else 30_000)
    delayed_n = args.delayed or (100_000 if args.quick else 1_000_000)
    broker, backend = f"{REDIS}/{args.redis_broker_db}", f"{REDIS}/{args.redis_backend_db}"
    redis.Redis.from_url(backend).ping()
    c = args.concurrency
    pools = [Pool(f"cmwq -c {c}", "cmwq", c, True), Pool(f"cmwq -c {c}", "cmwq", c, False),
             Pool(f"prefork -c {PROCESSES}", "prefork", PROCESSES, True)]
    delayed = run_delayed(delayed_n)
    print(f"broker {broker}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, cmwq_exec from "
          f"{delayed['cmwq_exec']}, load average {os.getloadavg()[0]:.2f}; {tasks} no-op tasks per pool",
          flush=True)
    rows = []
    for pool in pools:
        row = measure(pool, tasks, broker, backend, args.logs)
        rows.append(row)
        print(f"  {pool.label:14} limits {'yes' if pool.limits else 'no ':3}  "
              f"{row.growth_kib / 1024:+8.1f} MiB  {row.kib_per_task:6.2f} KiB/task", flush=True)
    print_table(rows, delayed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
