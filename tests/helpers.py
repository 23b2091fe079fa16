"""Helpers shared by the test modules (tests/ is on sys.path: ``from helpers import wait_for``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from polling import wait_for

from cmwq_exec import Work, WorkQueue, blocking, plugin

__all__ = ["wait_for"]  # re-exported: the suite's one way to wait (tests/polling.py)


def in_ci() -> bool:
    """Whether the tests run in CI: ``CI`` set to ``1``, ``true`` or ``yes`` (any case), as .ci/run's
    caller and CI services set it. The one switch the tests ask: in CI a missing broker, binary or
    kernel permission fails the test that needs it instead of skipping it."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def hold_works(wq: WorkQueue, n: int, gate: threading.Event) -> tuple[list[Work], Callable[[], int]]:
    """Queue ``n`` works that each wait inside blocking() until ``gate`` is set; return them and a
    function telling how many have started."""
    started = []

    def hold() -> None:
        started.append(threading.get_ident())
        with blocking():
            assert gate.wait(30), "gate never opened"

    works = [Work(hold) for _ in range(n)]
    for work in works:
        assert wq.queue_work(work)
    return works, lambda: len(started)


@contextlib.contextmanager
def invariants_sampled(pools: Any) -> Iterator[None]:
    """For the block, a side thread checks every pool's invariants, each under its lock, about
    every 0.5 ms. When the block ends without raising, assert that no check failed and that at
    least 10 rounds ran."""
    failures: list[BaseException] = []
    rounds = 0
    stop = threading.Event()

    def sampler() -> None:
        nonlocal rounds
        while not stop.is_set():
            for pool in pools:
                with pool.lock:
                    try:
                        pool.check_invariants()
                    except AssertionError as exc:
                        failures.append(exc)
            rounds += 1
            stop.wait(0.0005)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:3]
    assert rounds >= 10, rounds


@contextlib.contextmanager
def registered(obj: Any, prefix: str) -> Iterator[Any]:
    """Register ``obj`` as a cmwq_exec plugin under a unique name for the block; yield it."""
    name = plugin.register(obj, name=f"{prefix}-{uuid.uuid4().hex[:6]}")
    try:
        yield obj
    finally:
        plugin.unregister(name=name)


def run_python(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh interpreter with ``env`` added; fail, not hang, if it does
    not end within ``timeout`` seconds."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **env})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child hung for {timeout} s; its output:\n{exc.stdout}\n{exc.stderr}")


class Concurrency:
    """``with inside:`` around a body counts how many are inside at once (``max``) and in all
    (``calls``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.max = 0
        self.calls = 0

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.max = max(self.max, self.now)

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            self.now -= 1


def napper(inside: Concurrency, seconds: float,
           barrier: threading.Barrier | None = None) -> Callable[..., None]:
    """A body that counts itself ``inside``, then naps ``seconds`` in blocking() (after meeting
    the others at ``barrier``, if given: it passes only once that many run at once)."""

    def nap(*_: Any) -> None:
        with inside:
            with blocking():
                if barrier is not None:
                    barrier.wait()
                time.sleep(seconds)

    return nap


def fake_pool(pending: int = 0, nr_running: int = 0, nr_idle: int = 0, nr_workers: int | None = None,
              managing: bool = False, manage_requested: bool = False, busy: int = 0,
              **extra: Any) -> SimpleNamespace:
    """The counters a policy function reads (cmwq_exec.core.policy.PoolCounters), and ``workers``
    of which ``busy`` hold a work; ``nr_workers`` defaults to idle + running. ``extra`` adds any
    attribute a test's plugin looks at."""
    if nr_workers is None:
        nr_workers = nr_idle + nr_running
    workers = [SimpleNamespace(current_work=object() if i < busy else None) for i in range(nr_workers)]
    return SimpleNamespace(worklist=deque(range(pending)), nr_running=nr_running, nr_idle=nr_idle,
                           nr_workers=nr_workers, managing=managing, manage_requested=manage_requested,
                           workers=workers, cpu=0, **extra)


def cannot_start_thread(target: Any, name: str) -> threading.Thread:
    """Stands in for ``cmwq_exec.core.worker.start_thread`` when the process can start no thread."""
    raise RuntimeError("can't start new thread")


@contextlib.contextmanager
def log_messages(logger_name: str, level: int = 30) -> Iterator[list[str]]:
    """The messages ``logger_name`` logs at ``level`` or above during the block, from a handler on
    the logger itself, with the logger's level set for the block (an embedded Celery worker sets
    the root logger's level, which pytest's caplog depends on)."""
    import logging

    messages: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Handler(level)
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.setLevel(level)  # whatever the root's level is (an embedded Celery worker sets it)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# -- real CPU hotplug (root) -----------------------------------------------------------------------

CPU1_ONLINE = "/sys/devices/system/cpu/cpu1/online"


def need_two_cpus() -> None:
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1 usable by this process")


def write_cpu1(value: str) -> None:
    with open(CPU1_ONLINE, "w") as f:
        f.write(value)


def read_cpu1() -> str:
    with open(CPU1_ONLINE) as f:
        return f.read().strip()


def need_sysfs_hotplug() -> None:
    need_two_cpus()
    if os.geteuid() != 0:
        pytest.skip("real CPU hotplug needs root (writes /sys/devices/system/cpu/cpu1/online)")
    if not os.path.exists(CPU1_ONLINE):
        pytest.skip(f"{CPU1_ONLINE} does not exist (CPU 1 cannot be hot-unplugged here)")
    if not os.access(CPU1_ONLINE, os.W_OK):
        pytest.skip(f"{CPU1_ONLINE} is not writable")
    if read_cpu1() != "1":
        pytest.skip("CPU 1 is not online to begin with")


def run_as_work(wq: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as a work of ``wq`` and return what it returned (re-raise what it raised)."""
    from cmwq_exec import Work

    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = exc

    wq.queue_work(Work(body))
    wq.flush()
    if "error" in out:
        raise out["error"]
    return out["result"]



def sleeps_as_its_worker_sees(seconds: float = 0.3) -> bool:
    """Sleep ``seconds`` with a plain ``time.sleep`` (no ``blocking()``) on the calling cmwq worker;
    True if that worker was flagged SLEEPING during the sleep (it told its pool it sleeps: only
    ``blocking()`` and blocking detection do that, the watchdog never does). The watcher looks
    only between ``armed`` and ``done``, so the waits of starting and joining it do not count."""
    from cmwq_exec.core.worker import SLEEPING, current_worker

    me = current_worker()
    assert me is not None, "not on a cmwq worker"
    armed, seen, done = threading.Event(), threading.Event(), threading.Event()

    def watch() -> None:
        armed.wait()
        while not done.is_set():
            if me.flags & SLEEPING:
                seen.set()
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    armed.set()
    time.sleep(seconds)
    done.set()
    watcher.join()
    return seen.is_set()
