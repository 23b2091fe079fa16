"""Calls that wait for each other on a pool that learned its sleeps: how long until all of them run.

A pool beyond ``unpaced_workers`` holds creation while most of its busy workers are young sleepers
(due back, by the average of its past sleeps). Calls that only return once all of them run at once
(a Barrier) never come back, so the hold must end once their sleepers outlive that window, and the
workers created for the rest must not be held again wave after wave. This script learns sleeps of
``--learn-ms`` on one CPU pool, then queues twice as many meeting calls as the pool has workers,
plus ``--extra`` (so the calls beyond the first wave are more than half of the busy workers), and
prints when the calls started, with ``ThreadPoolExecutor(n)`` (a fresh executor that
starts a thread per submit) beside it in the same process.

The effect needs a window long enough for many creations: on a host that starts a thread in
~0.5 ms, the defaults (96 unpaced workers, 50 ms cap) never reach a second wave, so the script
lowers both (``--unpaced``, ``--hold-max``); it is a probe of the hold's rule, not a default-tuned
figure.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from statistics import median

import cmwq_exec
from cmwq_exec import Work, WorkQueue, blocking


def meet_all(run_all: Callable[[Callable[[], None], int], None], n: int) -> list[float]:
    """Run ``n`` calls that wait for all of them to run (``run_all(call, n)`` queues them and
    returns once they are done); return when each started (s, sorted)."""
    barrier = threading.Barrier(n)
    starts: list[float] = []
    t0 = time.monotonic()

    def meet() -> None:
        starts.append(time.monotonic() - t0)
        with blocking():
            barrier.wait(60)

    run_all(meet, n)
    return sorted(starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unpaced", type=int, default=2, help="unpaced_workers (default 2)")
    parser.add_argument("--hold-max", type=float, default=5.0, help="create_hold_max, s (default 5)")
    parser.add_argument("--learn-ms", type=float, default=100.0, help="sleep learned first (default 100)")
    parser.add_argument("--extra", type=int, default=8, help="meeting calls beyond twice the workers (8)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    args = parser.parse_args()
    cmwq_exec.configure(unpaced_workers=args.unpaced, create_hold_max=args.hold_max,
                        create_interval=0.001)
    system = cmwq_exec.get_system()
    cpu = min(system.cpu_pools)
    pool = system.cpu_pools[cpu]
    wq = WorkQueue("waves")

    def nap() -> None:
        with blocking():
            time.sleep(args.learn_ms / 1000)

    def on_the_pool(call: Callable[[], None], n: int) -> None:
        for _ in range(n):
            wq.queue_work_on(cpu, Work(call))
        wq.flush()

    def on_a_tpe(call: Callable[[], None], n: int) -> None:
        with ThreadPoolExecutor(n) as tpe:
            for f in [tpe.submit(call) for _ in range(n)]:
                f.result()

    results: dict[str, list[float]] = {"cmwq": [], "tpe": []}
    for run in range(args.runs):
        for _ in range(16):
            wq.queue_work_on(cpu, Work(nap))
        wq.flush()
        with pool.lock:
            workers, avg = pool.nr_workers, pool.sleep_avg
        n = 2 * workers + args.extra
        starts = meet_all(on_the_pool, n)
        results["cmwq"].append(starts[-1])
        results["tpe"].append(meet_all(on_a_tpe, n)[-1])
        window = min(2 * avg, args.hold_max)
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        waves = 1 + sum(gap > window / 2 for gap in gaps[workers:])
        print(f"run {run + 1}: {n} calls ({workers} workers, learned sleep {avg * 1000:.0f} ms, "
              f"window {window * 1000:.0f} ms): all ran after {starts[-1] * 1000:.0f} ms "
              f"(held waves: {waves}); ThreadPoolExecutor({n}) {results['tpe'][-1] * 1000:.0f} ms")
        time.sleep(2 * window)  # the meeting calls' sleeps end; the next run learns again
    print(f"median: cmwq {median(results['cmwq']) * 1000:.0f} ms, "
          f"ThreadPoolExecutor {median(results['tpe']) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
