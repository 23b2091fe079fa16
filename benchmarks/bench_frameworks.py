"""asyncio, Dask and joblib on cmwq beside their stock pools, in one run: three workloads each.

* **nested**: calls that wait for calls of the same pool (``to_thread`` inside ``to_thread``
  through ``run_coroutine_threadsafe``; ``compute()`` inside a task; ``Parallel`` inside a call). The
  stock bounded pool (asyncio's default executor, ``dask.config.set(pool=ThreadPoolExecutor(CPUs))``)
  deadlocks once all its threads wait: each stock run goes in a child process, killed after
  ``--timeout`` seconds and reported as "deadlock". joblib's threading backend makes a new pool per
  nested ``Parallel``, so it completes too (with more threads).
* **io**: ``--calls`` calls of ``time.sleep(--sleep-ms)``, each pool at its default size (asyncio:
  ``min(32, CPUs + 4)`` threads; Dask's threaded scheduler: CPUs; joblib ``threading`` with
  ``n_jobs=-1``: CPUs) against cmwq's defaults.
* **cpu**: ``--calls`` calls of pure-Python arithmetic (``--cpu-n`` additions), which hold the GIL.

Every figure is the median of ``--repeat`` runs, stock and cmwq alternating. The workloads are
small on purpose (seconds in all): they show orders of magnitude and the deadlocks, not tuning.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from statistics import median

CPUS = len(os.sched_getaffinity(0))


def cpu_work(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


# -- asyncio ------------------------------------------------------------------------------------

def _asyncio_run(main: Callable[[], object], cmwq: bool) -> object:
    if cmwq:
        import cmwq_exec.asyncio
        return cmwq_exec.asyncio.run(main())  # type: ignore[arg-type]
    return asyncio.run(main())  # type: ignore[arg-type]


def _nested_call(loop: asyncio.AbstractEventLoop, depth: int) -> int:
    if depth == 0:
        return 0
    inner = asyncio.run_coroutine_threadsafe(asyncio.to_thread(_nested_call, loop, depth - 1), loop)
    return 1 + inner.result()


def asyncio_case(case: str, cmwq: bool, args: argparse.Namespace) -> None:
    async def main() -> object:
        loop = asyncio.get_running_loop()
        if case == "nested":
            calls = [asyncio.to_thread(_nested_call, loop, 3) for _ in range(40)]
        elif case == "io":
            calls = [asyncio.to_thread(time.sleep, args.sleep_ms / 1000) for _ in range(args.calls)]
        else:
            calls = [asyncio.to_thread(cpu_work, args.cpu_n) for _ in range(args.calls)]
        return await asyncio.gather(*calls)
    _asyncio_run(main, cmwq)


# -- Dask ---------------------------------------------------------------------------------------

def dask_case(case: str, cmwq: bool, args: argparse.Namespace) -> None:
    import dask

    import cmwq_exec.dask
    from cmwq_exec import CMWQExecutor

    if case == "nested":
        def leaf(i: int) -> int:
            return i

        def outer(i: int) -> int:
            return sum(dask.compute(*[dask.delayed(leaf)(i + k) for k in range(4)]))

        if cmwq:
            config = dict(scheduler=functools.partial(cmwq_exec.dask.get, executor=CMWQExecutor(CPUS)))
        else:
            config = dict(scheduler="threads", pool=ThreadPoolExecutor(CPUS))
        with dask.config.set(**config):
            dask.compute(*[dask.delayed(outer)(i) for i in range(20)])
        return
    task = functools.partial(time.sleep, args.sleep_ms / 1000) if case == "io" else \
        functools.partial(cpu_work, args.cpu_n)
    tasks = [dask.delayed(task, pure=False)() for _ in range(args.calls)]
    dask.compute(*tasks, scheduler=cmwq_exec.dask.get if cmwq else "threads")


# -- joblib -------------------------------------------------------------------------------------

def _joblib_inner(i: int) -> int:
    from joblib import Parallel, delayed
    return sum(Parallel(n_jobs=2)(delayed(abs)(i + k) for k in range(4)))


def joblib_case(case: str, cmwq: bool, args: argparse.Namespace) -> None:
    from joblib import Parallel, delayed, parallel_config

    import cmwq_exec.joblib  # noqa: F401  (registers "cmwq")

    with parallel_config(backend="cmwq" if cmwq else "threading", n_jobs=-1):
        if case == "nested":
            Parallel()(delayed(_joblib_inner)(i) for i in range(20))
        elif case == "io":
            Parallel()(delayed(time.sleep)(args.sleep_ms / 1000) for _ in range(args.calls))
        else:
            Parallel()(delayed(cpu_work)(args.cpu_n) for _ in range(args.calls))


FRAMEWORKS = {"asyncio": asyncio_case, "dask": dask_case, "joblib": joblib_case}


def timed(framework: str, case: str, cmwq: bool, args: argparse.Namespace) -> float | None:
    """Seconds for one run, in a child process (None: killed after --timeout)."""
    command = [sys.executable, __file__, "--child", framework, case, "cmwq" if cmwq else "stock",
               "--calls", str(args.calls), "--sleep-ms", str(args.sleep_ms), "--cpu-n", str(args.cpu_n)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per io/cpu run (default 200)")
    parser.add_argument("--sleep-ms", type=float, default=10.0, help="each io call's sleep (default 10)")
    parser.add_argument("--cpu-n", type=int, default=20000, help="additions per cpu call (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--timeout", type=float, default=15.0, help="a stock run's limit, s (default 15)")
    parser.add_argument("--child", nargs=3, metavar=("FRAMEWORK", "CASE", "POOL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        framework, case, pool = args.child
        import dask  # noqa: F401  (imports are not timed)
        import joblib  # noqa: F401

        import cmwq_exec.asyncio  # noqa: F401
        import cmwq_exec.dask  # noqa: F401
        import cmwq_exec.joblib  # noqa: F401
        start = time.perf_counter()
        FRAMEWORKS[framework](case, pool == "cmwq", args)
        print(time.perf_counter() - start)
        sys.stdout.flush()
        os._exit(0)  # a deadlocked stock pool's threads would hold the exit
    print(f"{CPUS} CPUs, Python {sys.version.split()[0]}, median of {args.repeat} runs, each in a child "
          f"process; io: {args.calls} x sleep({args.sleep_ms:g} ms), cpu: {args.calls} x {args.cpu_n} "
          f"additions")
    print(f"{'framework':<9} {'workload':<8} {'stock s':>10} {'cmwq s':>10} {'cmwq/stock':>11}")
    for framework in FRAMEWORKS:
        for case in ("nested", "io", "cpu"):
            stock: list[float | None] = []
            cmwq: list[float | None] = []
            for _ in range(args.repeat):
                stock.append(timed(framework, case, False, args))
                cmwq.append(timed(framework, case, True, args))
                if stock[-1] is None and case == "nested":
                    break  # a deadlock repeats; once is enough
            s = None if None in stock else median(x for x in stock if x is not None)
            c = None if None in cmwq else median(x for x in cmwq if x is not None)
            s_text = f"deadlock>{args.timeout:g}" if s is None else f"{s:.3f}"
            c_text = f"deadlock>{args.timeout:g}" if c is None else f"{c:.3f}"
            ratio = f"{c / s:.2f}" if s and c else "-"
            print(f"{framework:<9} {case:<8} {s_text:>10} {c_text:>10} {ratio:>11}", flush=True)


if __name__ == "__main__":
    main()
