"""Celery worker pools side by side: cmwq_exec.celery:TaskPool (one process, or one child process
per CPU) vs ``-P threads`` vs prefork vs gevent.

Same broker (RabbitMQ by default, ``--broker redis`` for Redis), same tasks (tests/celery/app.py:
``b.io`` sleeps ``--io-ms`` (10) ms inside ``cmwq_exec.blocking()``; ``b.http`` GETs a local
server (benchmarks/slow_http.py, started by the benchmark) that answers after ``--io-ms`` ms,
through ``urllib`` and without ``blocking()``, as most task code waits on the network; ``b.cpu``
spins pure Python; ``mix`` is half io, half cpu; none stores a result, each counts its completion
with one Redis INCR).
For every pool configuration a real ``celery worker`` is started; for every workload its queue
consumers are paused, the whole batch is published, the consumers resumed and the clock runs
until the last completion is counted. Meanwhile the threads and the resident memory (VmRSS) of
the worker's whole process tree are sampled from /proc. All the workers are up for the whole run
and the batches go round-robin over them, so a noisy machine slows every pool alike.

``cmwq procs -c C`` is the cmwq pool with ``CMWQ_PROCESSES=auto``: the ``celery worker`` started
is a supervisor that is no Celery node; its children, one per usable CPU and each pinned to one,
are the nodes (``{name}.{i}@{host}``), each with ``-c C`` running tasks and its own broker
consumer. Every control command (ping, cancel_consumer, add_consumer) goes to all the children
and waits for each of them to answer. Its peer at the same number of processes is
``prefork -c N`` (N = the CPUs).

``--from-start`` measures another way: for every batch the tasks are published to a new queue
first, then a worker is started on it, and the clock runs from the first completion counted to
the last; the worker is killed after the batch. Only this way are the gevent pools run: ``gevent
-c L`` (L = ``--large``, 100) is Celery's gevent pool in one process and ``gevent procs -c L``
one such worker per CPU on the same queue, as teams run it. A gevent worker whose consumer is
paused and resumed (``cancel_consumer``, ``add_consumer``, as the default way does) runs ~30%
slower afterwards (736 against 1045 tasks/s of 10 ms sleeps, measured on 2026-12-07), which
would not be a fair peer. They need gevent (``pip install -e '.[bench]'``; otherwise they are
left out, and naming them in ``--pools`` is an error), and their workers get
``broker_heartbeat=0``: with AMQP heartbeats on, gevent workers lose their broker connection
under load here.

    python benchmarks/bench_celery.py --quick        # a few minutes
    python benchmarks/bench_celery.py                # larger batches, median of 3: ~15 minutes
    python benchmarks/bench_celery.py --io-ms 50 --workloads io   # I/O tasks that wait 50 ms
    python benchmarks/bench_celery.py --quick --json runs.json    # also every run's figures
    python benchmarks/bench_celery.py --quick --workloads io --max-tasks-per-child 100 \
        --pools 'cmwq procs -c 8,prefork -c 2'                    # recycling children, and not

``--max-tasks-per-child N`` adds, for ``cmwq procs -c C`` and ``prefork -c N``, a twin started with
``--max-tasks-per-child N`` (labelled ``... mtpc N``; ``--pools`` names the plain ones), and a
table of what recycling costs each and how the two compare with it.

Prints one table, one row per pool and workload (the median run by tasks/s): tasks/s, tasks/s
relative to ``-P threads`` at the same -c, peak threads and peak RSS of the worker's process tree
(both the most seen in any run; RSS is the sum of every process's VmRSS, so pages a forked child
still shares with its parent count once per process), and the CPU time the tree used per task
(user + system, from /proc). Below it, one line per workload compares ``cmwq procs -c C`` with
its targets: CPU-bound at least as fast as prefork with as many processes, I/O at least twice
``-P threads -c C`` and prefork, mixed ahead of both; and, with gevent installed, one line per I/O
workload compares ``cmwq -c C`` with ``gevent -c L`` and ``cmwq procs -c C`` with ``gevent procs
-c L`` (at least as fast). ``--json PATH`` writes the conditions and every run (all repeats,
incomplete ones too) as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "tests" / "celery"
sys.path[:0] = [str(APP_DIR), str(ROOT)]

import redis  # noqa: E402
from app import make_app  # noqa: E402
from celery_harness import Worker, children_names  # noqa: E402

from cmwq_exec.celery_processes import processes_wanted  # noqa: E402

REDIS = "redis://127.0.0.1:6379"
#: The Redis databases the benchmark writes to unless told otherwise (--redis-broker-db,
#: --redis-backend-db): 12 is the broker of ``--broker redis``, 14 the result store (the Celery
#: tests' results db: tests/celery/app.py). Each batch's counter key is deleted after it.
REDIS_BROKER_DB, REDIS_BACKEND_DB = 12, 14
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
BROKERS = ("amqp", "redis")
CPU_ITERATIONS = 20_000  # ~1.5 ms of pure Python on this machine's cores
#: the children CMWQ_PROCESSES=auto starts (one per usable CPU): cmwq procs's and prefork's processes
PROCESSES = processes_wanted(None, {"CMWQ_PROCESSES": "auto"})


@dataclass(frozen=True)
class Config:
    label: str
    pool: str  # "cmwq", "threads", "prefork"
    concurrency: int
    processes: int = 0  # cmwq only: child processes (CMWQ_PROCESSES=auto), 0 for the pool in-process
    max_tasks: int = 0  # --max-tasks-per-child, 0 for none
    workers: int = 1  # separate ``celery worker`` processes on the same queue (gevent procs: one per CPU)

    @property
    def slug(self) -> str:
        """A file name part that tells configurations apart."""
        return self.label.replace(" -c ", "-").replace(" ", "-")

    def recycling(self, max_tasks: int) -> Config:
        """This configuration with ``--max-tasks-per-child max_tasks``."""
        return replace(self, label=f"{self.label} mtpc {max_tasks}", max_tasks=max_tasks)


@dataclass
class Result:
    config: Config
    workload: str
    tasks: int
    done: int  # tasks counted complete when the clock stopped (== tasks unless it timed out)
    seconds: float
    peak_threads: int
    peak_rss_kib: int  # sum of VmRSS over the worker's process tree, the most sampled
    cpu_seconds: float  # user + system CPU of the worker's process tree during the batch
    new_processes: int = 0  # processes seen in the tree during the batch that were not there before

    @property
    def complete(self) -> bool:
        return self.done == self.tasks

    @property
    def rate(self) -> float:
        return self.done / self.seconds

    @property
    def cpu_ms_per_task(self) -> float:
        return self.cpu_seconds * 1000 / max(self.done, 1)

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_kib / 1024


@dataclass
class Setup:
    """One pool configuration's running worker and the Celery nodes it is made of."""

    config: Config
    app: Any
    workers: list[Worker]  # the ``celery worker`` processes started (one unless config.workers says)
    queue: str
    nodes: list[str]  # the workers themselves, or the child processes' nodes

    @property
    def worker(self) -> Worker:
        return self.workers[0]

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (prefork's pool processes, the per-CPU child nodes and
    anything they start), whichever of their threads started them."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def trees(pids: list[int]) -> set[int]:
    """``pids`` and all their descendants."""
    return {p for pid in pids for p in tree_pids(pid)}


def tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by ``pids`` and their descendants."""
    ticks = 0
    for p in trees(pids):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_threads_rss(pids: list[int]) -> tuple[int, int]:
    """Threads and VmRSS (KiB), each summed over ``pids`` and their descendants."""
    threads = rss = 0
    for p in trees(pids):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    threads += int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        except OSError:
            pass
    return threads, rss


class TreeSampler(threading.Thread):
    """Samples the threads and the RSS of process trees every 20 ms; keeps the peaks."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak_threads = self.peak_rss_kib = 0
        self.stopping = threading.Event()
        self.before = trees(pids)  # the processes of the trees when sampling starts
        self.seen: set[int] = set()  # every process seen in the trees since

    def sample(self) -> None:
        self.seen.update(trees(self.pids))
        threads, rss = tree_threads_rss(self.pids)
        self.peak_threads = max(self.peak_threads, threads)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(0.02)

    def stop(self) -> tuple[int, int]:
        """Stop sampling; the peak threads and peak RSS (KiB)."""
        self.stopping.set()
        self.join()
        self.sample()
        return self.peak_threads, self.peak_rss_kib


def wait_nodes_ready(setup: Setup, timeout: float) -> None:
    """Until every node of ``setup`` answers ping (fails at once if the worker exits)."""
    if setup.config.processes:
        setup.worker.wait_children(setup.config.processes, timeout=timeout)
    else:
        for worker in setup.workers:
            worker.wait_ready(timeout=timeout)


def replied(replies: list[dict[str, Any]] | None) -> set[str]:
    """The nodes that answered a control command."""
    return {node for reply in replies or () for node in reply}


def control_every_node(setup: Setup, command: str, patience: float = 30.0) -> None:
    """``add_consumer`` or ``cancel_consumer`` of the setup's queue on every node, sent again to
    the nodes that did not answer (a recycled child's node does not answer while its CPU changes
    hands); fails unless each node confirms within ``patience`` seconds."""
    send = getattr(setup.app.control, command)
    missing = set(setup.nodes)
    deadline = time.monotonic() + patience
    while missing:
        missing -= replied(send(setup.queue, destination=sorted(missing), reply=True, timeout=2))
        assert not missing or time.monotonic() < deadline, \
            f"{command}: no reply from {sorted(missing)}\n{setup.worker.tail()}"


def settle(setup: Setup, timeout: float = 60.0) -> None:
    """Before a batch of a recycling ``cmwq procs`` worker: wait until no child is being replaced
    (the supervisor has no more processes than slots), then pause every node's consumer again. A
    replacement consumes the queues of the command line when it starts, so one that started
    after the last batch's pause would otherwise take tasks before the clock starts."""
    wait = time.monotonic() + timeout
    while len(setup.worker.child_pids()) > setup.config.processes:
        assert time.monotonic() < wait, f"children still being replaced\n{setup.worker.tail()}"
        time.sleep(0.1)
    control_every_node(setup, "cancel_consumer")


def counted(store: redis.Redis, key: str, at_least: int, deadline: float, interval: float) -> int:
    """The completions counted on ``key``, looked at every ``interval`` s until there are
    ``at_least`` or the clock passes ``deadline`` (time.monotonic)."""
    done = int(store.get(key) or 0)
    while done < at_least and time.monotonic() < deadline:
        time.sleep(interval)
        done = int(store.get(key) or 0)
    return done


def publish(app: Any, workload: str, n: int, key: str, io_seconds: float, url: str | None) -> None:
    """Send ``n`` tasks of ``workload`` to the app's queue, each counting itself done on ``key``."""
    io, http, cpu = app.tasks["b.io"], app.tasks["b.http"], app.tasks["b.cpu"]
    with app.producer_or_acquire() as producer:
        for i in range(n):
            if workload == "io" or (workload == "mix" and i % 2 == 0):
                io.apply_async((key, io_seconds), producer=producer)
            elif workload == "http":
                http.apply_async((key, url), producer=producer)
            else:
                cpu.apply_async((key, CPU_ITERATIONS), producer=producer)


def run_batch_from_start(config: Config, broker: str, backend: str, logs: Path, store: redis.Redis,
                         workload: str, n: int, timeout: float, io_seconds: float,
                         url: str | None) -> Result:
    """``--from-start``: publish ``n`` tasks to a new queue, then start ``config``'s worker on it;
    time from the first completion counted to the last (or ``timeout``), then kill the worker.
    The figures are the worker's from its first task on: the tasks done when the counter was first
    seen above zero are not counted."""
    key = f"cmwq-bench:{uuid.uuid4().hex[:8]}"
    queue = f"cmwq-bench-{uuid.uuid4().hex[:8]}"
    app = make_app(broker, backend=backend, queue=queue)
    publish(app, workload, n, key, io_seconds, url)
    setup = start(config, broker, backend, logs, app=app, queue=queue)
    try:
        sampler = TreeSampler(setup.pids)
        sampler.start()
        deadline = time.monotonic() + timeout
        first = counted(store, key, 1, deadline, 0.001)
        started, cpu_started = time.perf_counter(), tree_cpu_seconds(setup.pids)
        done = counted(store, key, n, deadline, 0.005)
        seconds = time.perf_counter() - started
        cpu_seconds = tree_cpu_seconds(setup.pids) - cpu_started
        peak_threads, peak_rss = sampler.stop()
    finally:
        for worker in setup.workers:
            worker.kill()
        store.delete(key)
        try:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
        finally:
            app.close()
    if done < n:
        print(f"  {workload}: only {done}/{n} done within {timeout}s", file=sys.stderr)
    return Result(config, workload, n - first, done - first, seconds, peak_threads, peak_rss, cpu_seconds,
                  len(sampler.seen - sampler.before))


def run_batch(setup: Setup, store: redis.Redis, workload: str, n: int, timeout: float,
              io_seconds: float, url: str | None) -> Result:
    """With the worker's consumers paused: publish ``n`` tasks, resume them, time until all are
    counted (or ``timeout``), pause them again."""
    app = setup.app
    key = f"cmwq-bench:{uuid.uuid4().hex[:8]}"
    if setup.config.max_tasks and setup.config.processes:
        settle(setup)
    publish(app, workload, n, key, io_seconds, url)
    sampler = TreeSampler(setup.pids)
    sampler.start()
    cpu_started = tree_cpu_seconds(setup.pids)
    started = time.perf_counter()
    control_every_node(setup, "add_consumer")
    done = counted(store, key, n, time.monotonic() + timeout, 0.005)
    seconds = time.perf_counter() - started
    cpu_seconds = tree_cpu_seconds(setup.pids) - cpu_started
    peak_threads, peak_rss = sampler.stop()
    control_every_node(setup, "cancel_consumer")
    store.delete(key)
    if done < n:
        print(f"  {workload}: only {done}/{n} done within {timeout}s", file=sys.stderr)
        with app.connection_for_write() as conn:  # drop what is left before the next batch
            conn.default_channel.queue_purge(setup.queue)
    return Result(setup.config, workload, n, done, seconds, peak_threads, peak_rss, cpu_seconds,
                  len(sampler.seen - sampler.before))


def start(config: Config, broker: str, backend: str, logs: Path, app: Any = None,
          queue: str | None = None) -> Setup:
    """Start ``config``'s worker on a queue of its own (it answers once it is up), or on ``queue``
    of ``app``."""
    if app is None or queue is None:
        queue = f"cmwq-bench-{uuid.uuid4().hex[:8]}"
        app = make_app(broker, backend=backend, queue=queue)
    via = "custom" if config.pool == "cmwq" else config.pool
    env = {"CMWQ_TEST_BACKEND": backend}
    if config.processes:
        env["CMWQ_PROCESSES"] = "auto"
    if config.pool == "gevent":
        env["CMWQ_TEST_CONF"] = json.dumps({"broker_heartbeat": 0})
    args = ("--max-tasks-per-child", str(config.max_tasks)) if config.max_tasks else ()
    workers = [Worker(app, broker, queue, logs / f"bench-{config.slug}-{i}.log",
                      concurrency=config.concurrency, via=via, env=env, loglevel="warning", args=args)
               for i in range(config.workers)]
    if config.processes:
        nodes = children_names(workers[0], config.processes)
    else:
        nodes = [worker.name for worker in workers]
    return Setup(config, app, workers, queue, nodes)


def start_http_server(delay_ms: float) -> tuple[subprocess.Popen[str], str]:
    """benchmarks/slow_http.py in a process of its own; it and the URL to GET."""
    script = ROOT / "benchmarks" / "slow_http.py"
    server = subprocess.Popen([sys.executable, str(script), "--delay-ms", str(delay_ms)],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("port "):
        server.kill()
        raise SystemExit(f"benchmarks/slow_http.py did not start: {line!r}")
    return server, f"http://127.0.0.1:{int(line.split()[1])}/"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches (about a minute in all)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="the common -c (default 8)")
    parser.add_argument("--large", type=int, default=100, help="the large -c (default 100)")
    parser.add_argument("--workloads", default="io,http,cpu,mix",
                        help="comma-separated, of io, http, cpu, mix (default: all four)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="batches per workload, the median is kept (default 1 with --quick, else 3)")
    parser.add_argument("--pools", default=None,
                        help="comma-separated labels to run, e.g. 'cmwq -c 8,threads -c 8' (default: all)")
    parser.add_argument("--logs", default="/tmp", help="where worker logs go")
    parser.add_argument("--io-ms", type=float, default=10.0,
                        help="how long an io task waits, and the http server before it answers, in ms "
                             "(default 10)")
    parser.add_argument("--broker", choices=BROKERS, default="amqp",
                        help="the broker every pool is fed from (default amqp: kombu's Redis transport "
                             "costs ~2 ms of CPU per task here and caps every pool near 500 tasks/s)")
    parser.add_argument("--redis-broker-db", type=int, default=REDIS_BROKER_DB, metavar="N",
                        help=f"the Redis database of --broker redis (default {REDIS_BROKER_DB})")
    parser.add_argument("--redis-backend-db", type=int, default=REDIS_BACKEND_DB, metavar="N",
                        help=f"the Redis database of the results and counters (default {REDIS_BACKEND_DB})")
    parser.add_argument("--max-tasks-per-child", type=int, default=0, metavar="N",
                        help="also run cmwq procs and prefork with --max-tasks-per-child N (default: not)")
    parser.add_argument("--from-start", action="store_true",
                        help="start a worker per batch on a queue filled first and time it from its first "
                             "task to its last (the gevent pools run only so)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write the conditions and every run's figures (all repeats) to PATH")
    args = parser.parse_args()
    for option in ("redis_broker_db", "redis_backend_db"):
        if not 0 <= getattr(args, option) <= 15:
            parser.error(f"--{option.replace('_', '-')} must be a Redis database number 0-15 (Redis's "
                         f"default 'databases 16'), got {getattr(args, option)}")

    scale = 1 if args.quick else 2
    sizes = {"io": 1500 * scale, "http": 1500 * scale, "cpu": 400 * scale, "mix": 1000 * scale}
    c, big, cpus = args.concurrency, args.large, PROCESSES
    # threads at 2c and 4c show how many threads -P threads needs to catch up with cmwq at c;
    # cmwq procs and prefork both run one process per CPU
    configs = [
        Config(f"cmwq -c {c}", "cmwq", c),
        Config(f"cmwq procs -c {c}", "cmwq", c, processes=cpus),
        Config(f"threads -c {c}", "threads", c),
        Config(f"threads -c {2 * c}", "threads", 2 * c),
        Config(f"threads -c {4 * c}", "threads", 4 * c),
        Config(f"cmwq -c {big}", "cmwq", big),
        Config(f"threads -c {big}", "threads", big),
        Config(f"prefork -c {cpus}", "prefork", cpus),
    ]
    gevent = [Config(f"gevent -c {big}", "gevent", big),
              Config(f"gevent procs -c {big}", "gevent", big, workers=cpus)]
    have_gevent = importlib.util.find_spec("gevent") is not None
    if have_gevent and args.from_start:
        configs += gevent
    if args.pools:
        wanted = {label.strip() for label in args.pools.split(",")}
        unknown = wanted - {config.label for config in configs}
        if unknown & {config.label for config in gevent}:
            why = "run only with --from-start" if have_gevent else "need gevent (pip install -e '.[bench]')"
            parser.error(f"--pools {sorted(unknown)}: the gevent pools {why}")
        if unknown:
            parser.error(f"unknown --pools {sorted(unknown)}; known: {[config.label for config in configs]}")
        configs = [config for config in configs if config.label in wanted]
    if args.max_tasks_per_child < 0:
        parser.error(f"--max-tasks-per-child must be >= 1 (0: not run), got {args.max_tasks_per_child}")
    if args.max_tasks_per_child:
        recycled = [config.recycling(args.max_tasks_per_child) for config in configs
                    if config.processes or config.pool == "prefork"]
        configs += recycled
    repeat = args.repeat or (1 if args.quick else 3)
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or set(workloads) - set(sizes):
        parser.error(f"--workloads: {args.workloads!r}; known: {', '.join(sizes)}")
    backend = f"{REDIS}/{args.redis_backend_db}"
    store = redis.Redis.from_url(backend)
    store.ping()
    broker = AMQP if args.broker == "amqp" else f"{REDIS}/{args.redis_broker_db}"
    load_started, started = os.getloadavg()[0], time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"broker {broker}, {os.cpu_count()} CPUs ({cpus} usable), Python {sys.version.split()[0]}, "
          f"load average {load_started:.2f}; io = {args.io_ms:g} ms sleep, cpu = {CPU_ITERATIONS} "
          f"loop iterations; median of {repeat}", flush=True)
    if not have_gevent and args.from_start:
        print("gevent is not installed: the gevent pools are left out (pip install -e '.[bench]')",
              flush=True)
    # Every worker is started first and stays up; batches then go round-robin over the pools
    # (repeat, workload, pool), so load from outside the benchmark (other jobs, steal time on a
    # shared VM) falls on every pool alike instead of on whichever ran during it. Idle workers
    # have their consumers paused (run_batch resumes only the one measured).
    setups: list[Setup] = []
    runs: list[tuple[int, Result]] = []
    server, url = start_http_server(args.io_ms) if "http" in workloads else (None, None)
    try:
        for config in configs if not args.from_start else ():
            setup = start(config, broker, backend, Path(args.logs))
            setups.append(setup)
            wait_nodes_ready(setup, timeout=60)
            control_every_node(setup, "cancel_consumer")
        for round_ in range(repeat):
            for workload in workloads:
                for config in configs:
                    if args.from_start:
                        result = run_batch_from_start(config, broker, backend, Path(args.logs), store,
                                                      workload, sizes[workload], timeout=120,
                                                      io_seconds=args.io_ms / 1000, url=url)
                    else:
                        setup = setups[configs.index(config)]
                        result = run_batch(setup, store, workload, sizes[workload], timeout=120,
                                           io_seconds=args.io_ms / 1000, url=url)
                    runs.append((round_, result))
                    if result.complete:
                        print(f"  {config.label:18} {workload:4} {result.rate:9.0f} tasks/s "
                              f"{result.peak_threads:5d} threads {result.peak_rss_mib:7.1f} MiB RSS "
                              f"{result.cpu_ms_per_task:6.2f} CPU ms/task", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        for setup in setups:
            for worker in setup.workers:
                worker.kill()
            try:
                with setup.app.connection_for_write() as conn:
                    conn.default_channel.queue_delete(setup.queue)
            except Exception:  # noqa: BLE001
                pass
            setup.app.close()
    results = medians([r for _, r in runs], configs, workloads)
    targets = target_lines(results, configs, workloads, c, cpus, args.io_ms)
    print_table(results, targets, c)
    versus_gevent = gevent_lines(results, workloads, c, big) if have_gevent and args.from_start else []
    print_gevent(versus_gevent)
    if args.max_tasks_per_child:
        print_recycling(results, configs, args.max_tasks_per_child)
    load_ended = os.getloadavg()[0]
    print(f"\nload average {load_started:.2f} at the start, {load_ended:.2f} at the end")
    if args.json:
        conditions = {"broker": broker, "cpus": os.cpu_count(), "usable_cpus": cpus,
                      "python": sys.version.split()[0], "io_ms": args.io_ms,
                      "cpu_iterations": CPU_ITERATIONS, "repeat": repeat, "sizes": sizes,
                      "load_average_start": load_started, "load_average_end": load_ended,
                      "started": started, "max_tasks_per_child": args.max_tasks_per_child,
                      "from_start": args.from_start}
        document = {"conditions": conditions, "runs": [run_record(round_, r) for round_, r in runs],
                    "targets": targets, "versus_gevent": versus_gevent}
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    return 0


def medians(runs: list[Result], configs: list[Config], workloads: list[str]) -> list[Result]:
    """Per configuration and workload whose every run completed: the median run by tasks/s, with
    the peak threads and RSS of all its runs."""
    results = []
    for config in configs:
        for workload in workloads:
            got = [r for r in runs if r.config == config and r.workload == workload]
            if not got or not all(r.complete for r in got):
                continue
            median = sorted(got, key=lambda r: r.rate)[len(got) // 2]
            results.append(replace(median, peak_threads=max(r.peak_threads for r in got),
                                   peak_rss_kib=max(r.peak_rss_kib for r in got)))
    return results


def run_record(round_: int, r: Result) -> dict[str, Any]:
    return {"pool": r.config.label, "kind": r.config.pool, "concurrency": r.config.concurrency,
            "cmwq_processes": r.config.processes, "max_tasks_per_child": r.config.max_tasks,
            "workload": r.workload, "round": round_,
            "tasks": r.tasks, "done": r.done, "complete": r.complete, "seconds": r.seconds,
            "tasks_per_s": r.rate, "peak_threads": r.peak_threads, "peak_rss_kib": r.peak_rss_kib,
            "cpu_seconds": r.cpu_seconds, "cpu_ms_per_task": r.cpu_ms_per_task,
            "new_processes": r.new_processes}


#: Per workload, what ``cmwq procs -c C`` should reach: the peers it is compared with ("threads":
#: ``-P threads -c C``, "prefork": ``prefork -c N`` with N = the CPUs, as many processes), the
#: factor it should reach against each, and whether it must exceed the factor or may equal it.
TARGETS = {
    "cpu": (("prefork",), 1.0, False),
    "io": (("threads", "prefork"), 2.0, False),
    "mix": (("threads", "prefork"), 1.0, True),
}


def target_met(ratio: float, factor: float, strictly: bool) -> bool:
    return ratio > factor if strictly else ratio >= factor


def target_lines(results: list[Result], configs: list[Config], workloads: list[str], c: int, cpus: int,
                 io_ms: float) -> list[dict[str, Any]]:
    """One line per workload run, if ``cmwq procs -c c`` was one of the configurations: its ratio
    to each peer and whether the workload's target is met (None: a run it needs did not complete)."""
    labels = {"procs": f"cmwq procs -c {c}", "threads": f"threads -c {c}", "prefork": f"prefork -c {cpus}"}
    if labels["procs"] not in {config.label for config in configs}:
        return []
    rates = {(r.config.label, r.workload): r.rate for r in results}
    lines = []
    for workload in workloads:
        if workload not in TARGETS:
            continue
        peers, factor, strictly = TARGETS[workload]
        procs = rates.get((labels["procs"], workload))
        ratios: dict[str, float | None] = {}
        for peer in ("threads", "prefork"):
            other = rates.get((labels[peer], workload))
            ratios[peer] = procs / other if procs and other else None
        needed = [ratio for peer in peers if (ratio := ratios[peer]) is not None]
        met = all(target_met(r, factor, strictly) for r in needed) if len(needed) == len(peers) else None
        target = f"{'>' if strictly else '>='} {factor:g}x {' and '.join(labels[p] for p in peers)}"
        if workload == "cpu":
            target += " (as many processes)"
        if workload == "io":
            target += f" ({io_ms:g} ms I/O; stated for 10 ms)" if io_ms != 10 else " (10 ms I/O)"
        lines.append({"workload": workload, "pool": labels["procs"], "target": target,
                      "vs_threads": ratios["threads"], "vs_prefork": ratios["prefork"], "met": met,
                      "threads": labels["threads"], "prefork": labels["prefork"]})
    return lines


def print_table(results: list[Result], targets: list[dict[str, Any]], c: int) -> None:
    base = {r.workload: r.rate for r in results if r.config.pool == "threads" and r.config.concurrency == c}
    print()
    print(f"| pool | workload | tasks | tasks/s | vs threads -c {c} | peak threads | peak RSS MiB "
          f"| CPU ms/task |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{r.rate / base[r.workload]:.2f}x" if r.workload in base else "-"
        print(f"| {r.config.label} | {r.workload} | {r.tasks} | {r.rate:.0f} | {ratio} | {r.peak_threads} "
              f"| {r.peak_rss_mib:.0f} | {r.cpu_ms_per_task:.2f} |")
    if not targets:
        return
    first = targets[0]
    print()
    print(f"| {first['pool']}: target | workload | vs {first['threads']} | vs {first['prefork']} | met |")
    print("|---|---|---:|---:|---|")
    for line in targets:
        ratios = [f"{line[key]:.2f}x" if line[key] is not None else "-"
                  for key in ("vs_threads", "vs_prefork")]
        met = {True: "met", False: "**not met**", None: "not measured"}[line["met"]]
        print(f"| {line['target']} | {line['workload']} | {ratios[0]} | {ratios[1]} | {met} |")


def gevent_lines(results: list[Result], workloads: list[str], c: int, big: int) -> list[dict[str, Any]]:
    """Per I/O workload run: ``cmwq -c c`` against ``gevent -c big`` (one process each) and ``cmwq
    procs -c c`` against ``gevent procs -c big`` (one process per CPU each); the target is at least
    as many tasks/s (met None: a run it needs is missing or did not complete)."""
    rates = {(r.config.label, r.workload): r.rate for r in results}
    pairs = ((f"cmwq -c {c}", f"gevent -c {big}"), (f"cmwq procs -c {c}", f"gevent procs -c {big}"))
    lines = []
    for workload in (w for w in workloads if w in ("io", "http")):
        for mine, theirs in pairs:
            a, b = rates.get((mine, workload)), rates.get((theirs, workload))
            if a is None and b is None:
                continue
            ratio = a / b if a and b else None
            lines.append({"workload": workload, "pool": mine, "peer": theirs, "ratio": ratio,
                          "met": None if ratio is None else ratio >= 1.0})
    return lines


def print_gevent(lines: list[dict[str, Any]]) -> None:
    if not lines:
        return
    print()
    print("| target: at least gevent's tasks/s | workload | ratio | met |")
    print("|---|---|---:|---|")
    for line in lines:
        ratio = f"{line['ratio']:.2f}x" if line["ratio"] is not None else "-"
        met = {True: "met", False: "**not met**", None: "not measured"}[line["met"]]
        print(f"| {line['pool']} >= {line['peer']} | {line['workload']} | {ratio} | {met} |")


def print_recycling(results: list[Result], configs: list[Config], max_tasks: int) -> None:
    """Per workload: cmwq procs and prefork without and with ``--max-tasks-per-child``, what
    recycling costs each (with / without), cmwq procs against prefork, both recycling, and how
    many processes the recycling worker started during its median batch (replacements)."""
    rates = {(r.config.label, r.workload): r.rate for r in results}
    started = {(r.config.label, r.workload): r.new_processes for r in results}
    plain = [config for config in configs
             if not config.max_tasks and (config.processes or config.pool == "prefork")]
    procs = [config for config in plain if config.processes]
    prefork = [config for config in plain if config.pool == "prefork"]
    print()
    print(f"| workload | pool | tasks/s | tasks/s with --max-tasks-per-child {max_tasks} | with / without "
          f"| with: vs {prefork[0].label if prefork else 'prefork'} | processes started in the batch |")
    print("|---|---|---:|---:|---:|---:|---:|")

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for workload in sorted({r.workload for r in results}):
        base = rates.get((prefork[0].recycling(max_tasks).label, workload)) if prefork else None
        for config in procs + prefork:
            without = rates.get((config.label, workload))
            with_ = rates.get((config.recycling(max_tasks).label, workload))
            cost = with_ / without if with_ and without else None
            versus = with_ / base if with_ and base else None
            count = started.get((config.recycling(max_tasks).label, workload))
            print(f"| {workload} | {config.label} | {cell(without, '.0f')} | {cell(with_, '.0f')} "
                  f"| {cell(cost, '.2f')}x | {cell(versus, '.2f')}x | {cell(count, 'd')} |")


if __name__ == "__main__":
    sys.exit(main())
