"""Dramatiq's stock worker beside the cmwq worker, in one run, on Redis (database 7) or RabbitMQ.

    python benchmarks/bench_dramatiq.py [--broker redis|rabbitmq] [--processes 1] [--tuned 32]
                                        [--tasks-io 400] [--tasks-cpu 100] [--repeat 3]

Three workers, each a real command line as its users start it, with the same ``--processes``:
``dramatiq`` at its documented default (``--threads 8``) and at a tuned size (``--threads
--tuned``), and ``python -m cmwq_exec.dramatiq`` (no size). Three workloads:

* **io**: ``--tasks-io`` messages that each sleep ``--sleep-ms`` (10) and push their mark (below)
  inside ``cmwq_exec.blocking()`` (a no-op outside a cmwq worker, so the stock worker runs the same
  code);
* **io-plain**: the same without ``blocking()``: the cmwq pool finds the waits by its watchdog;
* **cpu**: ``--tasks-cpu`` messages of pure-Python arithmetic (``--cpu-n`` additions), holding the GIL.

A run sends every message at once to a worker that is up (it ran a first message), and ends when
the last message has pushed its mark on a Redis list the benchmark waits on (BLPOP, no polling).
Every figure is the median of ``--repeat`` runs. The ratios are cmwq's messages/s over the stock
worker's: the targets are io >= 2x the default, cpu >= 0.95x.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/7"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672"

APP = """
import os
import time

import dramatiq
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

import cmwq_exec

if os.environ["BENCH_BROKER"] == "redis":
    broker = RedisBroker(url=os.environ["BENCH_REDIS"])
else:
    broker = RabbitmqBroker(url=os.environ["BENCH_RABBITMQ"])
dramatiq.set_broker(broker)
marks = redis.Redis.from_url(os.environ["BENCH_REDIS"])
QUEUE = os.environ["BENCH_NAME"]
DONE = QUEUE + ":done"


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def io(seconds):
    with cmwq_exec.blocking():  # the message's waits: the sleep and its mark's round trip
        time.sleep(seconds)
        marks.rpush(DONE, 1)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def io_plain(seconds):
    time.sleep(seconds)
    marks.rpush(DONE, 1)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def cpu(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    marks.rpush(DONE, 1)
"""


class Launched:
    """One worker command line on the benchmark's app, up once it ran a first message."""

    def __init__(self, label: str, command: list[str], app: Any, env: dict[str, str], cwd: Path) -> None:
        self.label = label
        self.app = app
        self.proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.run_batch(lambda: self.app.io.send(0), 1, timeout=60)

    def run_batch(self, send: Any, n: int, timeout: float = 600) -> float:
        """Send ``n`` messages with ``send()`` and wait for their marks; the seconds it took."""
        marks, done = self.app.marks, self.app.DONE
        marks.delete(done)
        start = time.perf_counter()
        for _ in range(n):
            send()
        for _ in range(n):
            if marks.blpop([done], timeout=timeout) is None:
                raise SystemExit(f"{self.label}: no mark within {timeout} s")
        return time.perf_counter() - start

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    parser.add_argument("--processes", type=int, default=1, help="--processes of every worker (default 1)")
    parser.add_argument("--tasks-io", type=int, default=400)
    parser.add_argument("--tasks-cpu", type=int, default=100)
    parser.add_argument("--sleep-ms", type=float, default=10.0)
    parser.add_argument("--cpu-n", type=int, default=100_000)
    parser.add_argument("--tuned", type=int, default=32,
                        help="the stock worker's tuned --threads (default 32)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", default="io,io-plain,cpu", help="comma-separated (default: all three)")
    args = parser.parse_args(argv)
    for option in ("processes", "tasks_io", "tasks_cpu", "tuned", "repeat"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")

    import importlib

    name = f"cmwq_bench_dq_{uuid.uuid4().hex[:8]}"
    os.environ.update(BENCH_NAME=name, BENCH_REDIS=REDIS_URL, BENCH_RABBITMQ=RABBITMQ_URL,
                      BENCH_BROKER=args.broker)
    with tempfile.TemporaryDirectory(prefix="cmwq-bench-dramatiq-") as scratch:
        (Path(scratch) / "benchapp.py").write_text(APP)
        sys.path.insert(0, scratch)
        app = importlib.import_module("benchapp")
        path = os.pathsep.join([scratch, str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, PYTHONPATH=path)
        common = ["benchapp", "--processes", str(args.processes)]
        stock = [sys.executable, "-m", "dramatiq", *common, "--threads"]
        configs = {
            "stock -t 8": [*stock, "8"],
            f"stock -t {args.tuned}": [*stock, str(args.tuned)],
            "cmwq": [sys.executable, "-m", "cmwq_exec.dramatiq", *common],
        }
        sleep = args.sleep_ms / 1000
        workloads = {
            "io": (lambda: app.io.send(sleep), args.tasks_io),
            "io-plain": (lambda: app.io_plain.send(sleep), args.tasks_io),
            "cpu": (lambda: app.cpu.send(args.cpu_n), args.tasks_cpu),
        }
        chosen = args.workloads.split(",")
        unknown = sorted(set(chosen) - set(workloads))
        if unknown:
            parser.error(f"--workloads: unknown {unknown}; known: {', '.join(workloads)}")
        workloads = {w: workloads[w] for w in chosen}
        print(f"dramatiq workers on {args.broker}, --processes {args.processes}, "
              f"{len(os.sched_getaffinity(0))} CPUs; io: {args.tasks_io} x {args.sleep_ms:g} ms sleeps; "
              f"cpu: {args.tasks_cpu} x {args.cpu_n} additions; median of {args.repeat}", flush=True)
        rate: dict[tuple[str, str], float] = {}
        try:
            for label, command in configs.items():
                worker = Launched(label, command, app, env, Path(scratch))
                try:
                    for workload, (send, n) in workloads.items():
                        seconds = median(worker.run_batch(send, n) for _ in range(args.repeat))
                        rate[label, workload] = n / seconds
                        print(f"  {workload:9} {label:12} {seconds:7.3f} s  {n / seconds:8.1f} messages/s",
                              flush=True)
                finally:
                    worker.stop()
        finally:
            app.broker.flush_all()
            if args.broker == "rabbitmq":
                for queue in list(app.broker.queues):
                    app.broker.channel.queue_delete(queue)
            app.broker.close()
            keys = list(app.marks.scan_iter(f"*{name}*"))
            if keys:
                app.marks.delete(*keys)
    print("\ncmwq's messages/s over the stock worker's:")
    print(f"  {'workload':9} {'vs -t 8':>9} {f'vs -t {args.tuned}':>9}")
    for workload in workloads:
        cmwq = rate["cmwq", workload]
        print(f"  {workload:9} {cmwq / rate['stock -t 8', workload]:8.2f}x "
              f"{cmwq / rate[f'stock -t {args.tuned}', workload]:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
