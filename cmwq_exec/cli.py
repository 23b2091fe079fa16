"""The ``cmwq-exec`` command: ``demo``, ``bench``, ``top``, ``version`` and ``--version``.

``demo`` runs one mixed workload -- waits that say they block, CPU work, nested submit-and-wait --
through :class:`cmwq_exec.CMWQExecutor` and :class:`concurrent.futures.ThreadPoolExecutor`, both with
their defaults, one after the other, with live progress, then prints what each achieved. It needs
nothing but this package: no broker, no server.

``ThreadPoolExecutor`` deadlocks on the nested waits (every worker ends up waiting for a call queued
behind it). The demo gives each executor ``--timeout`` seconds, then abandons a stuck one with
``shutdown(wait=False, cancel_futures=True)``; cancelling the queued calls makes the waiting
workers' ``result()`` raise ``CancelledError``, so its threads normally unwind. Should any stay stuck,
the interpreter would wait for them at exit (``ThreadPoolExecutor`` joins its threads then), so the
command flushes its output and leaves with ``os._exit``.

``bench`` runs ``benchmarks/bench_core.py`` of a source checkout; ``top`` is :mod:`cmwq_exec.top`
(imported with this module: it needs nothing that starts the pools).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cmwq_exec
from cmwq_exec.top import _positive_float

PROG = "cmwq-exec"

# -- demo ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the demo submits, interleaved, to each executor."""

    waits: int  # calls that sleep inside blocking(): an RPC, a disk read, a lock wait
    wait_seconds: float
    cpu: int  # calls doing pure-Python arithmetic (they hold the GIL)
    cpu_ms: float
    nested: int  # calls that fan out with submit() and wait on the results (fib)
    fib_n: int
    timeout: float  # seconds an executor gets before it is declared stuck

    @property
    def total(self) -> int:
        return self.waits + self.cpu + self.nested


FULL_WORKLOAD = Workload(waits=400, wait_seconds=0.02, cpu=150, cpu_ms=2.0, nested=6, fib_n=11, timeout=5.0)
QUICK_WORKLOAD = Workload(waits=150, wait_seconds=0.01, cpu=40, cpu_ms=1.0, nested=3, fib_n=9, timeout=2.0)

CATEGORIES = (
    ("waits", "blocking waits"),
    ("cpu", "CPU work"),
    ("nested", "nested submit+wait"),
)


def _wait(seconds: float) -> None:
    with cmwq_exec.blocking():  # tells a cmwq pool this worker sleeps; a no-op on other threads
        time.sleep(seconds)


def _spin(loops: int) -> int:
    acc = 0
    for i in range(loops):
        acc += i * i % 7
    return acc


def _fib(executor: Executor, n: int) -> int:
    """Nested submit-and-wait: each call waits for two calls it submitted to its own executor."""
    if n < 2:
        return n
    a = executor.submit(_fib, executor, n - 1)
    b = executor.submit(_fib, executor, n - 2)
    return a.result() + b.result()


def _fib_value(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _calibrate(ms: float) -> int:
    """Loops of :func:`_spin` that take about ``ms`` milliseconds here."""
    loops = 20_000
    best = min(_timed(_spin, loops) for _ in range(3))
    return max(1000, int(loops * ms / 1000 / best))


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _plan(work: Workload) -> list[str]:
    """The submission order: the three kinds spread evenly through the run."""
    slots = [(i / work.waits, "waits") for i in range(work.waits)]
    slots += [((i + 0.5) / work.cpu, "cpu") for i in range(work.cpu)]
    slots += [((i + 0.25) / work.nested, "nested") for i in range(work.nested)]
    return [kind for _, kind in sorted(slots)]


class _Run:
    """One executor's run of the workload, watched from the main thread."""

    def __init__(self, key: str, label: str, executor: Executor, threads: Callable[[], int]) -> None:
        self.key = key
        self.label = label
        self.executor = executor
        self.threads = threads  # the executor's worker threads right now
        self.futures: dict[str, list[Future[Any]]] = {kind: [] for kind, _ in CATEGORIES}
        self.last_done: dict[str, float] = {}  # when the latest successful call of each kind ended
        self.peak_threads = 0
        self.started = 0.0
        self.ended: float | None = None
        self.errors: list[str] = []

    def submit_all(self, plan: list[str], work: Workload, loops: int) -> None:
        submit = self.executor.submit
        self.started = time.perf_counter()
        f: Future[Any]
        for kind in plan:
            if kind == "waits":
                f = submit(_wait, work.wait_seconds)
            elif kind == "cpu":
                f = submit(_spin, loops)
            else:
                f = submit(_fib, self.executor, work.fib_n)
            self.futures[kind].append(f)
            f.add_done_callback(functools.partial(self._record, kind))

    def _record(self, kind: str, f: Future[Any]) -> None:
        if not f.cancelled() and f.exception() is None:
            self.last_done[kind] = max(self.last_done.get(kind, 0.0), time.perf_counter())

    def done(self, kind: str) -> int:
        return sum(f.done() for f in self.futures[kind])

    def all_done(self) -> bool:
        return all(f.done() for fs in self.futures.values() for f in fs)

    def sample(self) -> None:
        self.peak_threads = max(self.peak_threads, self.threads())


def _cmwq_threads() -> int:
    return sum(pool.nr_workers for pool in cmwq_exec.get_system().pools)


def _abandon(run: _Run, grace: float = 1.0) -> int:
    """Give up on a stuck ThreadPoolExecutor; return how many of its threads are still stuck."""
    executor = run.executor
    threads = list(getattr(executor, "_threads", ()))
    executor.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    return sum(t.is_alive() for t in threads)


def _result(run: _Run, work: Workload, stuck_threads: int) -> dict[str, Any]:
    wall = (run.ended or time.perf_counter()) - run.started
    categories: dict[str, dict[str, Any]] = {}
    completed = 0
    for kind, _ in CATEGORIES:
        futures = run.futures[kind]
        ok = 0
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is None:
                ok += 1
        completed += ok
        ended = run.last_done.get(kind)
        categories[kind] = {"done": ok, "total": len(futures),
                            "seconds": round(ended - run.started, 4) if ok and ended else None}
    expected = _fib_value(work.fib_n)
    wrong = [f for f in run.futures["nested"]
             if f.done() and not f.cancelled() and f.exception() is None and f.result() != expected]
    finished = completed == work.total and not wrong
    # Throughput counts the calls that do not wait on other calls, over the time they took: a
    # deadlock in the nested calls must not turn into a low rate (it is reported on its own row).
    flat = [categories[kind] for kind in ("waits", "cpu")]
    flat_done = sum(c["done"] for c in flat)
    flat_s = max((c["seconds"] or 0.0) for c in flat)
    return {
        "executor": run.label,
        "finished": finished,
        "deadlocked": not finished and categories["nested"]["done"] < categories["nested"]["total"],
        "wall_s": round(wall, 4),
        "completed": completed,
        "tasks": work.total,
        "calls_per_s": round(flat_done / flat_s, 1) if flat_done and flat_s > 0 else None,
        "peak_threads": run.peak_threads,
        "categories": categories,
        "stuck_threads_after_abandon": stuck_threads,
    }


def run_demo(work: Workload, *, live: bool, console: Any = None) -> dict[str, Any]:
    """Run the workload on both executors (cmwq first); return the figures."""
    loops = _calibrate(work.cpu_ms)
    plan = _plan(work)
    cmwq = cmwq_exec.CMWQExecutor()
    tpe = ThreadPoolExecutor()
    runs = [
        _Run("cmwq", "CMWQExecutor()", cmwq, _cmwq_threads),
        _Run("tpe", "ThreadPoolExecutor()", tpe, lambda: len(tpe._threads)),
    ]

    progress = None
    bars: dict[tuple[str, str], Any] = {}
    if live:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                            console=console, refresh_per_second=10)
        for run in runs:
            for kind, title in CATEGORIES:
                total = {"waits": work.waits, "cpu": work.cpu, "nested": work.nested}[kind]
                bars[run.key, kind] = progress.add_task(f"{run.key:<5} {title}", total=total, start=False,
                                                        status="waiting")
        progress.start()

    results: dict[str, Any] = {}
    try:
        for run in runs:
            if progress is not None:
                for kind, _ in CATEGORIES:
                    progress.start_task(bars[run.key, kind])
                    progress.update(bars[run.key, kind], status="running")
            run.sample()
            run.submit_all(plan, work, loops)
            deadline = run.started + work.timeout
            while True:
                run.sample()
                if progress is not None:
                    for kind, _ in CATEGORIES:
                        progress.update(bars[run.key, kind], completed=run.done(kind))
                if run.all_done():
                    run.ended = time.perf_counter()
                    break
                if time.perf_counter() >= deadline:
                    break
                time.sleep(0.02)
            run.sample()
            stuck = 0
            if run.ended is None:
                stuck = _abandon(run) if run.key == "tpe" else 0
                if run.key != "tpe":
                    run.executor.shutdown(wait=False, cancel_futures=True)
            else:
                run.executor.shutdown(wait=False)
            results[run.key] = _result(run, work, stuck)
            if progress is not None:
                for kind, _ in CATEGORIES:
                    cat = results[run.key]["categories"][kind]
                    status = ("[green]done" if cat["done"] == cat["total"]
                              else f"[red]stuck after {work.timeout:g} s")
                    progress.update(bars[run.key, kind], completed=cat["done"], status=status)
                    progress.stop_task(bars[run.key, kind])
    finally:
        if progress is not None:
            progress.stop()
    return {
        "workload": dataclasses.asdict(work) | {"cpu_loops": loops, "tasks": work.total},
        "results": results,
        "machine": {"ncpu": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "cmwq_exec": cmwq_exec.__version__, "tpe_max_workers": tpe._max_workers},
    }


def _print_demo_table(report: dict[str, Any], console: Any) -> None:
    """One column per executor, one row per figure: fits an 80-column terminal."""
    from rich.table import Table

    work = report["workload"]
    results = list(report["results"].values())
    table = Table(title="cmwq-exec demo: the same mixed workload on both executors", title_justify="left")
    table.add_column("")
    for r in results:
        table.add_column(r["executor"], justify="right", no_wrap=True)

    def count(kind: str) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            c = r["categories"][kind]
            if c["done"] == c["total"]:
                return f"{c['done']}/{c['total']} in {c['seconds']:.2f} s"
            return f"[red]{c['done']}/{c['total']}: stuck"
        return cell

    def rate(r: dict[str, Any]) -> str:
        return "-" if r["calls_per_s"] is None else f"{r['calls_per_s']:,.0f}"

    def nested(r: dict[str, Any]) -> str:
        c = r["categories"]["nested"]
        if c["done"] == c["total"]:
            return f"[green]{c['done']}/{c['total']} in {c['seconds']:.2f} s"
        return f"[red]deadlocked after {work['timeout']:g} s"  # the time it was given

    throughput: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        (f"{work['waits']} waits in blocking()", count("waits")),
        (f"{work['cpu']} CPU-bound calls", count("cpu")),
        ("calls/s (waits + CPU)", rate),
        ("peak worker threads", lambda r: str(r["peak_threads"])),
    ]
    for label, cell in throughput:
        table.add_row(label, *(cell(r) for r in results))
    table.add_section()
    table.add_row(f"{work['nested']} nested submit+wait", *(nested(r) for r in results))
    console.print(table)
    console.print(
        f"Workload, interleaved: {work['waits']} × {work['wait_seconds'] * 1000:g} ms sleeps inside "
        f"blocking(), {work['cpu']} × ~{work['cpu_ms']:g} ms of pure-Python arithmetic, "
        f"{work['nested']} × fib({work['fib_n']}) by nested submit-and-wait. Each executor gets "
        f"{work['timeout']:g} s. calls/s: waits and CPU calls done, over the time until the last "
        f"of them ended. Peak worker threads: cmwq starts one more each time a running worker "
        f"blocks, so the overlapping waits take many; ThreadPoolExecutor() starts at most "
        f"{report['machine']['tpe_max_workers']} here, and runs the waits that many at a time.",
        highlight=False)
    for r in results:
        if r["stuck_threads_after_abandon"]:
            console.print(f"{r['executor']}: {r['stuck_threads_after_abandon']} threads still stuck after "
                          "shutdown(cancel_futures=True); leaving with os._exit.", highlight=False)


def cmd_demo(args: argparse.Namespace) -> int:
    work = QUICK_WORKLOAD if args.quick else FULL_WORKLOAD
    if args.timeout is not None:
        work = dataclasses.replace(work, timeout=args.timeout)
    from rich.console import Console

    console = Console(stderr=args.json)
    report = run_demo(work, live=not args.json, console=console)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_demo_table(report, console)
    cmwq_ok = report["results"]["cmwq"]["finished"]
    stuck = sum(r["stuck_threads_after_abandon"] for r in report["results"].values())
    code = 0 if cmwq_ok else 1
    if stuck:
        # The interpreter would join those threads at exit and never get there.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# -- bench, top, version ------------------------------------------------------------------------


def _bench_script() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks" / "bench_core.py"


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    script = _bench_script()
    if not script.is_file():
        print(f"{PROG} bench: {script} is not here: the benchmarks ship with the source tree, not the "
              "installed package. Run it from a checkout: python benchmarks/bench_core.py", file=sys.stderr)
        return 1
    env = dict(os.environ, _CMWQ_BENCH_PROG=f"{PROG} bench")
    return subprocess.call([sys.executable, str(script), *extra], env=env)


def cmd_top(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        from cmwq_exec import top
    except ModuleNotFoundError as exc:
        if exc.name != "cmwq_exec.top":
            raise
        print(f"{PROG} top: not available: this installation has no cmwq_exec.top module", file=sys.stderr)
        return 1
    return int(top.main(extra))


def cmd_version(args: argparse.Namespace) -> int:
    import pluggy

    print(f"cmwq_exec {cmwq_exec.__version__} "
          f"(Python {platform.python_version()}, pluggy {pluggy.__version__})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The Linux kernel's concurrency-managed workqueue as a Python executor.")
    parser.add_argument("--version", action="version", version=f"{PROG} {cmwq_exec.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run a mixed workload on CMWQExecutor and ThreadPoolExecutor side by side",
        description="Run the same mixed workload (waits inside blocking(), CPU work, nested "
                    "submit-and-wait) on CMWQExecutor() and ThreadPoolExecutor(), with live progress, "
                    "and compare. ThreadPoolExecutor deadlocks on the nested waits: it is given "
                    "--timeout seconds, then abandoned. Exit status 0 when CMWQExecutor finished.")
    demo.add_argument("--quick", action="store_true", help="a smaller workload (a few seconds)")
    demo.add_argument("--json", action="store_true", help="print the figures as JSON (no live display)")
    demo.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                      help=f"seconds each executor gets (default: {FULL_WORKLOAD.timeout:g}, "
                           f"{QUICK_WORKLOAD.timeout:g} with --quick)")
    demo.set_defaults(func=cmd_demo, parser=demo)

    # bench and top take their own options: everything after the word is passed through
    bench = sub.add_parser("bench", add_help=False,
                           help="run benchmarks/bench_core.py (options: see bench --help)")
    bench.set_defaults(func=cmd_bench, passthrough=True)
    top = sub.add_parser("top", add_help=False,
                         help="live view of a process's pools (options: see top --help)")
    top.set_defaults(func=cmd_top, passthrough=True)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version, parser=version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cmwq-exec`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:  # a bare ``cmwq-exec``: what it can do, not an error
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help()
        return 0
    if getattr(args, "passthrough", False):
        return int(args.func(args, extra))
    if extra:  # the command's own usage: ``demo --quik`` shows demo's options
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
