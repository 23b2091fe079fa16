"""Huey's stock thread consumer beside the cmwq consumer, in one run, on Redis (database 11).

    python benchmarks/bench_huey.py [--tasks-io 400] [--tasks-cpu 100] [--tuned 16] [--repeat 3]

Three consumers, each a real process started as its users start it: ``huey_consumer -k thread``
at its documented default (``-w 1``) and at a tuned size (``-w --tuned``), and ``python -m
cmwq_exec.huey`` (no size). Three workloads:

* **io**: ``--tasks-io`` tasks that each sleep ``--sleep-ms`` (10) inside ``cmwq_exec.blocking()``
  (a no-op outside a cmwq worker, so the stock consumer runs the same code);
* **io-plain**: the same sleep without ``blocking()``: the cmwq pool finds it by its watchdog;
* **cpu**: ``--tasks-cpu`` tasks of pure-Python arithmetic (``--cpu-n`` additions), holding the GIL.

A run enqueues every task at once into a consumer that is up (it answered a first task), and ends
when the last task has pushed its mark on a Redis list the benchmark waits on (BLPOP, no polling).
Every figure is the median of ``--repeat`` runs. The ratios are cmwq's tasks/s over the stock
consumer's: the targets are io >= 2x the default, cpu >= 0.95x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/11"

APP = """
import os
import time

import redis
from huey import RedisHuey

import cmwq_exec

huey = RedisHuey(os.environ["BENCH_NAME"], url=os.environ["BENCH_URL"], results=False)
marks = redis.Redis.from_url(os.environ["BENCH_URL"])
DONE = os.environ["BENCH_NAME"] + ":done"


@huey.task()
def io(seconds):
    with cmwq_exec.blocking():
        time.sleep(seconds)
    marks.rpush(DONE, 1)


@huey.task()
def io_plain(seconds):
    time.sleep(seconds)
    marks.rpush(DONE, 1)


@huey.task()
def cpu(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    marks.rpush(DONE, 1)
"""


class Consumer:
    """One consumer process on the benchmark's app, up once it ran a first task."""

    def __init__(self, label: str, command: list[str], app: object, env: dict[str, str], cwd: Path) -> None:
        self.label = label
        self.app = app
        self.proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.run_batch(lambda: self.app.io(0), 1, timeout=60)

    def run_batch(self, enqueue: object, n: int, timeout: float = 600) -> float:
        """Enqueue ``n`` tasks with ``enqueue()`` and wait for their marks; the seconds it took."""
        marks, done = self.app.marks, self.app.DONE
        marks.delete(done)
        start = time.perf_counter()
        for _ in range(n):
            enqueue()  # type: ignore[operator]
        for _ in range(n):
            if marks.blpop([done], timeout=timeout) is None:
                raise SystemExit(f"{self.label}: no mark within {timeout} s")
        return time.perf_counter() - start

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks-io", type=int, default=400)
    parser.add_argument("--tasks-cpu", type=int, default=100)
    parser.add_argument("--sleep-ms", type=float, default=10.0)
    parser.add_argument("--cpu-n", type=int, default=100_000)
    parser.add_argument("--tuned", type=int, default=16, help="the stock consumer's tuned -w (default 16)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", default="io,io-plain,cpu", help="comma-separated (default: all three)")
    args = parser.parse_args(argv)

    import importlib

    name = f"cmwq-bench-huey-{uuid.uuid4().hex[:8]}"
    os.environ.update(BENCH_NAME=name, BENCH_URL=REDIS_URL)
    with tempfile.TemporaryDirectory(prefix="cmwq-bench-huey-") as scratch:
        (Path(scratch) / "benchapp.py").write_text(APP)
        sys.path.insert(0, scratch)
        app = importlib.import_module("benchapp")
        path = os.pathsep.join([scratch, str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, PYTHONPATH=path)
        consumer_bin = str(Path(sys.executable).with_name("huey_consumer"))
        configs = {
            "stock -w 1": [consumer_bin, "benchapp.huey", "-k", "thread", "-w", "1", "-q"],
            f"stock -w {args.tuned}": [consumer_bin, "benchapp.huey", "-k", "thread", "-w", str(args.tuned),
                                       "-q"],
            "cmwq": [sys.executable, "-m", "cmwq_exec.huey", "benchapp.huey", "-q"],
        }
        sleep = args.sleep_ms / 1000
        workloads = {
            "io": (lambda: app.io(sleep), args.tasks_io),
            "io-plain": (lambda: app.io_plain(sleep), args.tasks_io),
            "cpu": (lambda: app.cpu(args.cpu_n), args.tasks_cpu),
        }
        chosen = args.workloads.split(",")
        unknown = sorted(set(chosen) - set(workloads))
        if unknown:
            parser.error(f"--workloads: unknown {unknown}; known: {', '.join(workloads)}")
        workloads = {name: workloads[name] for name in chosen}
        print(f"huey consumers on {REDIS_URL}, {len(os.sched_getaffinity(0))} CPUs; io: {args.tasks_io} x "
              f"{args.sleep_ms:g} ms sleeps; cpu: {args.tasks_cpu} x {args.cpu_n} additions; median of "
              f"{args.repeat}", flush=True)
        rate: dict[tuple[str, str], float] = {}
        try:
            for label, command in configs.items():
                consumer = Consumer(label, command, app, env, Path(scratch))
                try:
                    for workload, (enqueue, n) in workloads.items():
                        seconds = median(consumer.run_batch(enqueue, n) for _ in range(args.repeat))
                        rate[label, workload] = n / seconds
                        print(f"  {workload:9} {label:12} {seconds:7.3f} s  {n / seconds:8.1f} tasks/s",
                              flush=True)
                finally:
                    consumer.stop()
        finally:
            keys = list(app.marks.scan_iter(f"*{name}*"))
            if keys:
                app.marks.delete(*keys)
    print("\ncmwq's tasks/s over the stock consumer's:")
    print(f"  {'workload':9} {'vs -w 1':>9} {f'vs -w {args.tuned}':>9}")
    for workload in workloads:
        cmwq = rate["cmwq", workload]
        print(f"  {workload:9} {cmwq / rate['stock -w 1', workload]:8.2f}x "
              f"{cmwq / rate[f'stock -w {args.tuned}', workload]:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
