"""Dramatiq's stock worker beside the cmwq worker, in one run, on Redis (database 7) or RabbitMQ.

    python benchmarks/bench_dramatiq.py [--broker redis|rabbitmq] [--processes 1] [--tuned 32]
                                        [--tasks-io 400] [--tasks-cpu 300] [--repeat 5]

Three workers, each a real command line as its users start it, with the same ``--processes``:
``dramatiq`` at its documented default (``--threads 8``) and at a tuned size (``--threads
--tuned``), and ``python -m cmwq_exec.dramatiq`` (no size). Three workloads:

* **io**: ``--tasks-io`` messages that each sleep ``--sleep-ms`` (10) and push their mark (below)
  inside ``cmwq_exec.blocking()`` (a no-op outside a cmwq worker, so the stock worker runs the same
  code);
* **io-plain**: the same without ``blocking()``: the cmwq pool finds the waits by its watchdog;
* **cpu**: ``--tasks-cpu`` messages of pure-Python arithmetic (``--cpu-n`` additions), holding the GIL.

A round starts each worker in turn, runs a first io batch that is not measured (a worker that
has been running holds the threads a burst needs: the stock worker from its start, this one once
it met a burst), then every workload's batch, and stops it: one worker runs at a time, and a
round measures the three within a minute or two. The ratios below the table compare the batches
of the same round, so a slower spell of the machine (other jobs, steal time on a shared VM) that
spans a round falls on the three alike. Each worker consumes a queue of its own (the app's queue
name comes from the worker's environment). A batch sends every message at once and ends when the
last message has pushed its mark on the worker's Redis list, which the benchmark waits on
(BLPOP, no polling). Every rate is the median of ``--repeat`` rounds. The ratios are cmwq's
messages/s over the stock worker's: the targets are io >= 2x the default, cpu >= 0.95x.
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
    """One worker command line on the benchmark's app, consuming the queue ``queue`` only; up once
    it ran a first message."""

    def __init__(self, label: str, command: list[str], app: Any, env: dict[str, str], cwd: Path,
                 queue: str) -> None:
        self.label = label
        self.app = app
        self.queue = queue
        self.done = queue + ":done"
        self.proc = subprocess.Popen(command, env=dict(env, BENCH_NAME=queue), cwd=cwd,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            self.run_batch(app.io, 0, 1, timeout=60)
        except BaseException:
            self.stop()
            raise

    def send(self, actor: Any, argument: Any) -> None:
        """Send ``actor(argument)`` to this worker's queue."""
        self.app.broker.enqueue(actor.message(argument).copy(queue_name=self.queue))

    def run_batch(self, actor: Any, argument: Any, n: int, timeout: float = 600) -> float:
        """Send ``n`` messages ``actor(argument)`` and wait for their marks; the seconds it took."""
        marks = self.app.marks
        marks.delete(self.done)
        start = time.perf_counter()
        for _ in range(n):
            self.send(actor, argument)
        for _ in range(n):
            if marks.blpop([self.done], timeout=timeout) is None:
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
    parser.add_argument("--tasks-cpu", type=int, default=300)
    parser.add_argument("--sleep-ms", type=float, default=10.0)
    parser.add_argument("--cpu-n", type=int, default=100_000)
    parser.add_argument("--tuned", type=int, default=32,
                        help="the stock worker's tuned --threads (default 32)")
    parser.add_argument("--repeat", type=int, default=5)
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
            "io": (app.io, sleep, args.tasks_io),
            "io-plain": (app.io_plain, sleep, args.tasks_io),
            "cpu": (app.cpu, args.cpu_n, args.tasks_cpu),
        }
        chosen = args.workloads.split(",")
        unknown = sorted(set(chosen) - set(workloads))
        if unknown:
            parser.error(f"--workloads: unknown {unknown}; known: {', '.join(workloads)}")
        workloads = {w: workloads[w] for w in chosen}
        print(f"dramatiq workers on {args.broker}, --processes {args.processes}, "
              f"{len(os.sched_getaffinity(0))} CPUs; io: {args.tasks_io} x {args.sleep_ms:g} ms sleeps; "
              f"cpu: {args.tasks_cpu} x {args.cpu_n} additions; median of {args.repeat}", flush=True)
        seconds: dict[tuple[str, str], list[float]] = {}
        queues = [f"{name}-{i}" for i in range(len(configs))]  # one per worker command
        try:
            for round_ in range(args.repeat):
                for queue, (label, command) in zip(queues, configs.items(), strict=True):
                    worker = Launched(label, command, app, env, Path(scratch), queue)
                    try:
                        worker.run_batch(app.io, sleep, args.tasks_io)  # warm-up, not measured
                        for workload, (actor, argument, n) in workloads.items():
                            took = worker.run_batch(actor, argument, n)
                            seconds.setdefault((label, workload), []).append(took)
                            print(f"  {round_ + 1:2} {workload:9} {label:12} {took:7.3f} s "
                                  f"{n / took:8.1f} messages/s", flush=True)
                    finally:
                        worker.stop()
        finally:
            app.broker.flush_all()
            if args.broker == "rabbitmq":
                for queue in {*app.broker.queues, *queues}:
                    for variant in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                        app.broker.channel.queue_delete(variant)
            app.broker.close()
            keys = list(app.marks.scan_iter(f"*{name}*"))
            if keys:
                app.marks.delete(*keys)
    rate = {key: workloads[key[1]][2] / median(runs) for key, runs in seconds.items()}
    print("\nmedians:")
    for (label, workload), value in rate.items():
        print(f"  {workload:9} {label:12} {value:8.1f} messages/s")
    print("\ncmwq's messages/s over the stock worker's, per round (the same round's batches, run one after\n"
          "the other): the median, and the lowest and highest round")
    stocks = ("stock -t 8", f"stock -t {args.tuned}")
    print(f"  {'workload':9} " + " ".join(f"{'vs ' + label[6:]:>22}" for label in stocks))
    for workload in workloads:
        cells = []
        for stock in stocks:
            pairs = zip(seconds["cmwq", workload], seconds[stock, workload], strict=True)
            ratios = [theirs / mine for mine, theirs in pairs]
            cells.append(f"{median(ratios):6.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)")
        print(f"  {workload:9} " + " ".join(f"{cell:>22}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
