"""Blocking detection without annotations, side by side in one process.

    python benchmarks/bench_detect.py [--repeat N]

Cases (issue 3): 500 tasks each doing a plain, un-annotated ``time.sleep(0.01)`` through
``CMWQExecutor`` with the watchdog only, with opt-in detection (``cmwq_exec.detect_blocking()``:
sys.monitoring on 3.12+, wrappers before), and through ``ThreadPoolExecutor()``; the cost of
detection on 200 CPU-bound tasks; a mixed CPU + blocking workload's peak thread count against the 500
threads ``ThreadPoolExecutor(500)`` would use. Medians of ``--repeat`` alternating runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor, wait

import cmwq_exec
from cmwq_exec import CMWQExecutor


def spin() -> int:
    x = 0
    for i in range(60_000):
        x += i * i
    return x


def sleep10() -> None:
    time.sleep(0.01)


def mixed(i: int) -> None:
    if i % 2:
        spin()
    else:
        time.sleep(0.01)


def executor_threads(executor: Executor) -> Callable[[], int]:
    """How many threads ``executor`` has now: a cmwq executor's are the shared pools' workers and
    rescuers (named ``cmwq/...``), a ThreadPoolExecutor's carry its name prefix."""
    if isinstance(executor, ThreadPoolExecutor):
        prefix = executor._thread_name_prefix  # set by its __init__ when not given
    else:
        prefix = "cmwq/"
    return lambda: sum(1 for t in threading.enumerate() if t.name.startswith(prefix))


class PeakThreads:
    """The most threads ``count()`` saw while the block ran (sampled every millisecond)."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count
        self.peak = count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.count())

    def __enter__(self) -> PeakThreads:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.count())


def timed(executor: Executor, fn: Callable[..., object], n: int, indexed: bool = False) -> tuple[float, int]:
    with PeakThreads(executor_threads(executor)) as peak:
        start = time.perf_counter()
        wait([executor.submit(fn, i) if indexed else executor.submit(fn) for i in range(n)])
        elapsed = time.perf_counter() - start
    return elapsed, peak.peak


def median_of(runs: list[tuple[float, int]]) -> tuple[float, int]:
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cm = CMWQExecutor()
    tpe = ThreadPoolExecutor()
    cm.submit(int).result()
    tpe.submit(int).result()
    rows: dict[str, list[tuple[float, int]]] = {k: [] for k in (
        "sleep watchdog", "sleep detect", "sleep TPE", "cpu off", "cpu detect", "cpu TPE",
        "mixed detect")}
    for _ in range(args.repeat):
        cmwq_exec.undetect_blocking()
        rows["sleep watchdog"].append(timed(cm, sleep10, 500))
        rows["cpu off"].append(timed(cm, spin, 200))
        rows["sleep TPE"].append(timed(tpe, sleep10, 500))
        rows["cpu TPE"].append(timed(tpe, spin, 200))
        mechanism = cmwq_exec.detect_blocking()
        rows["sleep detect"].append(timed(cm, sleep10, 500))
        rows["cpu detect"].append(timed(cm, spin, 200))
        rows["mixed detect"].append(timed(cm, mixed, 500, indexed=True))
    cmwq_exec.undetect_blocking()
    m = {k: median_of(v) for k, v in rows.items()}
    print(f"python {sys.version.split()[0]}, detection mechanism: {mechanism}, median of {args.repeat}")
    print("peak thr: the most threads the executor itself had during the case (TPE: ThreadPoolExecutor();\n"
          "cmwq idle workers of an earlier case count until they are reaped, idle_timeout 10 s)")
    print(f"{'case':44} {'seconds':>8} {'peak thr':>8} {'ratio':>8}  target")
    tpe_sleep = m["sleep TPE"][0]
    lines = [
        ("500 x sleep(10ms), watchdog only", "sleep watchdog",
         tpe_sleep / m["sleep watchdog"][0], ">= 4x TPE"),
        ("500 x sleep(10ms), detect_blocking()", "sleep detect",
         tpe_sleep / m["sleep detect"][0], ">= 8x TPE"),
        ("500 x sleep(10ms), ThreadPoolExecutor()", "sleep TPE", 1.0, ""),
        ("200 CPU tasks, detection off", "cpu off", 1.0, ""),
        ("200 CPU tasks, detect_blocking()", "cpu detect", m["cpu off"][0] / m["cpu detect"][0],
         "cost of detection (1.0 = none)"),
        ("200 CPU tasks, ThreadPoolExecutor()", "cpu TPE", m["cpu off"][0] / m["cpu TPE"][0], ""),
        ("500 mixed CPU + sleep, detect_blocking()", "mixed detect", 1.0, "peak threads < 500"),
    ]
    for label, key, ratio, target in lines:
        secs, peak = m[key]
        print(f"{label:44} {secs:8.3f} {peak:8d} {ratio:7.2f}x  {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
