"""blocking() interrupted: an asynchronous exception at any call return of its enter or exit.

A Celery task's soft limit (or a terminate, or the hard limit) may land while the task enters or
leaves ``blocking()``, and the task may catch it and go on. Whatever the point, the pool must be
back to its rest state when the work ends: nr_running accounting whole, no worker left flagged
SLEEPING or with a sleep depth, no workqueue counting a sleeper; and the next blocking() must still
hand the worker's turn over. Each scenario runs once per call return (k = 1, 2, ... until a run
finds no k-th return), with the injector of :mod:`async_inject_blocking`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
from async_inject_blocking import Injected, Injection, inject_at
from helpers import run_as_work, wait_for

import cmwq_exec
from cmwq_exec import Work, WorkQueue, blocking
from cmwq_exec.core import lockdep
from cmwq_exec.core.worker import SLEEPING, current_worker

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(sys.version_info[:2] == (3, 11), reason=(
        "on CPython 3.11 an exception raised from the harness's profile function at some of these "
        "call returns leaves the worker thread spinning (the py311 lane hung here; the same as the "
        "window-close test of tests/celery/test_pool_unit.py); 3.10, 3.12 and 3.13 run these")),
]

#: the functions whose every call return is tried (what they call is counted too)
ENTER_EXIT = (blocking.__enter__, blocking.__exit__)
#: where our code lives: the call returns into it are tried
PACKAGE = os.path.dirname(cmwq_exec.__file__) + os.sep
#: no scenario here makes this many calls: a run that reaches it would mean the loop never ends
MOST_RETURNS = 2000


run_work = run_as_work  # run fn as a work of wq: its result, or what it raised


def nested_sleep(k: int, wq: WorkQueue | None) -> tuple[Injection, Any]:
    """Two nested blocking() blocks, with the k-th return of their enters and exits injected; the
    injected exception is caught, as a task catches SoftTimeLimitExceeded. With ``wq``, a work of
    it waits on the worker's pool meanwhile, so the first blocking() hands over to another worker.
    Returns the injection and the pool the work ran on."""
    worker = current_worker()
    assert worker is not None
    if wq is not None:
        wq.queue_work_on(worker.pool.cpu, Work(lambda: None))
    with inject_at(k, *ENTER_EXIT, within=PACKAGE, besides=(lockdep.__file__,)) as injection:
        try:
            with blocking():
                with blocking():
                    pass
        except Injected:
            pass
    return injection, worker.pool


def sleeps_and_hands_over() -> tuple[bool, int, int]:
    """Inside blocking(): (flagged SLEEPING, sleep depth, nr_running of the pool)."""
    worker = current_worker()
    assert worker is not None
    with blocking():
        with worker.pool.lock:
            return bool(worker.flags & SLEEPING), worker.sleep_depth, worker.pool.nr_running


def quiet(pool: Any) -> bool:
    with pool.lock:
        return not pool.worklist and not pool.nr_running and pool.nr_idle == pool.nr_workers


def sleep_state_left(pool: Any) -> str:
    """The sleep state some worker of ``pool`` still holds ('' if none)."""
    with pool.lock:
        pool.check_invariants()
        for worker in pool.workers:
            if worker.flags & SLEEPING or worker.sleep_depth or worker.sleeping_wq or worker.waiting_wq:
                return (f"{worker!r}: depth {worker.sleep_depth}, sleeping_wq {worker.sleeping_wq}, "
                        f"waiting_wq {worker.waiting_wq}")
    return ""


@pytest.mark.usefixtures("no_watchdog")  # the watchdog would make up for a lost handover
@pytest.mark.parametrize("pending", [False, True], ids=["alone", "works-pending"])
@pytest.mark.parametrize("max_running", [None, 1], ids=["plain", "max_running"])
def test_blocking_survives_an_injection_at_every_call_return(max_running: int | None, pending: bool) -> None:
    wq = WorkQueue(f"blocking-inject-{max_running}", max_running=max_running)
    tried = []
    try:
        for k in range(1, MOST_RETURNS):
            injection, pool = run_work(wq, lambda k=k: nested_sleep(k, wq if pending else None))
            wait_for(f"{pool!r} at rest after an injection at {injection.where}",
                     lambda pool=pool: quiet(pool))
            left = sleep_state_left(pool)
            assert not left, f"after an injection at {injection.where}, idle with sleep state: {left}"
            sleeping, depth, running = run_work(wq, sleeps_and_hands_over)
            assert (sleeping, depth, running) == (True, 1, 0), (
                f"after an injection at {injection.where}: blocking() no longer takes the worker out "
                f"of nr_running (SLEEPING {sleeping}, depth {depth}, nr_running {running})")
            if not injection.fired:
                break
            tried.append(injection.where)
        else:
            pytest.fail(f"more than {MOST_RETURNS} call returns in blocking()'s enter and exit")
    finally:
        wq.destroy()
    print(f"{len(tried)} call returns tried")
    assert len(tried) >= 8, tried  # the enters and exits were really gone through
