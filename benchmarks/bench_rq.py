"""RQ's stock worker beside the cmwq worker, in one run, on Redis (database 12).

    python benchmarks/bench_rq.py [--jobs-io 400] [--jobs-cpu 100] [--tuned 8] [--repeat 3]

Four workers, each a real process started as its users start it: ``rq worker`` at its documented
default (one job at a time, each in a forked work horse), ``rq worker -w rq.SimpleWorker`` (one
job at a time, no fork), ``rq worker-pool -n --tuned`` (that many forking workers), and ``rq worker
-w cmwq_exec.rq.Worker`` (no size). Three workloads:

* **io**: ``--jobs-io`` jobs that each sleep ``--sleep-ms`` (10) inside ``cmwq_exec.blocking()``
  (a no-op outside a cmwq worker, so the stock workers run the same code);
* **io-plain**: the same sleep without ``blocking()``: the cmwq pool finds it by its watchdog;
* **cpu**: ``--jobs-cpu`` jobs of pure-Python arithmetic (``--cpu-n`` additions), holding the GIL.

A run enqueues every job at once to a worker that is up (it ran a first job), and ends when the
last job has pushed its mark on a Redis list the benchmark waits on (BLPOP, no polling). Every
figure is the median of ``--repeat`` runs. The ratios are cmwq's jobs/s over each stock worker's:
the targets are io >= 2x the default, cpu >= 0.95x.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/12"

JOBS = """
import os
import time

import redis

import cmwq_exec

marks = redis.Redis.from_url(os.environ["BENCH_URL"])
DONE = os.environ["BENCH_NAME"] + ":done"


def io(seconds):
    with cmwq_exec.blocking():
        time.sleep(seconds)
    marks.rpush(DONE, 1)


def io_plain(seconds):
    time.sleep(seconds)
    marks.rpush(DONE, 1)


def cpu(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    marks.rpush(DONE, 1)
"""


def run_batch(jobs: Any, enqueue: Callable[[], object], n: int, label: str, timeout: float = 600) -> float:
    """Enqueue ``n`` jobs with ``enqueue()`` and wait for their marks; the seconds it took."""
    jobs.marks.delete(jobs.DONE)
    start = time.perf_counter()
    for _ in range(n):
        enqueue()
    for _ in range(n):
        if jobs.marks.blpop([jobs.DONE], timeout=timeout) is None:
            raise SystemExit(f"{label}: no mark within {timeout} s")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs-io", type=int, default=400)
    parser.add_argument("--jobs-cpu", type=int, default=100)
    parser.add_argument("--sleep-ms", type=float, default=10.0)
    parser.add_argument("--cpu-n", type=int, default=100_000)
    parser.add_argument("--tuned", type=int, default=8, help="rq worker-pool's -n (default 8)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", default="io,io-plain,cpu", help="comma-separated (default: all three)")
    parser.add_argument("--skip-pool", action="store_true",
                        help="leave rq worker-pool out (it is slow to run)")
    args = parser.parse_args(argv)

    from redis import Redis
    from rq import Queue

    name = f"cmwq-bench-rq-{uuid.uuid4().hex[:8]}"
    os.environ.update(BENCH_NAME=name, BENCH_URL=REDIS_URL)
    connection = Redis.from_url(REDIS_URL)
    queue = Queue(name, connection=connection)
    rq_bin = str(Path(sys.executable).with_name("rq"))
    common = ["--url", REDIS_URL, "--logging_level", "ERROR"]
    configs = {
        "rq worker": [rq_bin, "worker", *common, name],
        "SimpleWorker": [rq_bin, "worker", "-w", "rq.SimpleWorker", *common, name],
        f"pool -n {args.tuned}": [rq_bin, "worker-pool", "-n", str(args.tuned), "-u", REDIS_URL,
                                  "-l", "ERROR", name],
        "cmwq": [rq_bin, "worker", "-w", "cmwq_exec.rq.Worker", *common, name],
    }
    if args.skip_pool:
        del configs[f"pool -n {args.tuned}"]
    with tempfile.TemporaryDirectory(prefix="cmwq-bench-rq-") as scratch:
        (Path(scratch) / "benchjobs.py").write_text(JOBS)
        sys.path.insert(0, scratch)
        jobs = importlib.import_module("benchjobs")
        path = os.pathsep.join([scratch, str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, PYTHONPATH=path)
        sleep = args.sleep_ms / 1000
        workloads = {
            "io": (lambda: queue.enqueue(jobs.io, sleep, result_ttl=60), args.jobs_io),
            "io-plain": (lambda: queue.enqueue(jobs.io_plain, sleep, result_ttl=60), args.jobs_io),
            "cpu": (lambda: queue.enqueue(jobs.cpu, args.cpu_n, result_ttl=60), args.jobs_cpu),
        }
        chosen = args.workloads.split(",")
        unknown = sorted(set(chosen) - set(workloads))
        if unknown:
            parser.error(f"--workloads: unknown {unknown}; known: {', '.join(workloads)}")
        workloads = {w: workloads[w] for w in chosen}
        print(f"rq workers on {REDIS_URL}, {len(os.sched_getaffinity(0))} CPUs; io: {args.jobs_io} x "
              f"{args.sleep_ms:g} ms sleeps; cpu: {args.jobs_cpu} x {args.cpu_n} additions; median of "
              f"{args.repeat}", flush=True)
        rate: dict[tuple[str, str], float] = {}
        try:
            for label, command in configs.items():
                proc = subprocess.Popen(command, env=env, cwd=scratch, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                try:
                    run_batch(jobs, lambda: queue.enqueue(jobs.io, 0), 1, label, timeout=60)
                    for workload, (enqueue, n) in workloads.items():
                        seconds = median(run_batch(jobs, enqueue, n, label) for _ in range(args.repeat))
                        rate[label, workload] = n / seconds
                        print(f"  {workload:9} {label:13} {seconds:7.3f} s  {n / seconds:8.1f} jobs/s",
                              flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=120)
        finally:
            keys = list(connection.scan_iter(f"*{name}*"))
            if keys:
                connection.delete(*keys)
    stock = [label for label in configs if label != "cmwq"]
    print("\ncmwq's jobs/s over each stock worker's:")
    print(f"  {'workload':9} " + " ".join(f"{'vs ' + label:>16}" for label in stock))
    for workload in workloads:
        cmwq = rate["cmwq", workload]
        print(f"  {workload:9} " + " ".join(f"{cmwq / rate[label, workload]:15.2f}x" for label in stock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
