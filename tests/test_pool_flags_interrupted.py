"""A worker leaving ``nr_running`` keeps the count and its flags in step whatever call of the
handover an asynchronous exception lands on (a Celery time limit, a Ctrl-C on the watchdog's thread).

``WorkerPool.worker_set_flags(wakeup=True)`` stores the flag and lowers ``nr_running`` with no call in
between, and only then makes the handover's calls (the policy, waking, pacing). Here the policy
function raises where an injected exception would land, on a pool with a running worker and a
pending work, and the pool's invariants are checked right after.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import wait_for

from cmwq_exec import WQ, Work, WorkQueue
from cmwq_exec.core.worker import NOT_RUNNING, STUCK, current_worker

pytestmark = pytest.mark.timeout(60)


class Injected(BaseException):
    """Stands for an asynchronous exception (it is not an Exception: nothing catches it by mistake)."""


def test_an_exception_in_the_handover_leaves_nr_running_matching_the_flags(
        fresh_system: Callable[..., Any]) -> None:
    system = fresh_system(watchdog_tick=3600.0)  # no look of the watchdog changes the flags meanwhile
    pool = system.unbound_pool
    wq = WorkQueue("flags-interrupted", WQ.UNBOUND)
    running, release = threading.Event(), threading.Event()
    seen: list[Any] = []

    def hold() -> None:
        seen.append(current_worker())
        running.set()
        assert release.wait(30)

    try:
        assert wq.queue_work(Work(hold))
        assert running.wait(30), "the first work never ran"
        assert wq.queue_work(Work(lambda: None))  # pending behind the running one: nr_running is 1
        worker = seen[0]
        with pool.lock:
            assert pool.nr_running == 1 and len(pool.worklist) == 1
            assert not worker.flags & NOT_RUNNING

            def interrupted(_: Any) -> bool:
                raise Injected

            pool.need_more_worker = interrupted
            try:
                with pytest.raises(Injected):
                    pool.worker_set_flags(worker, STUCK, wakeup=True)
            finally:
                pool.read_policy()  # the policy in force again
            assert worker.flags & STUCK, "the flag was not stored before the handover's calls"
            assert pool.nr_running == 0
            pool.check_invariants()  # nr_running equals the busy workers without a NOT_RUNNING flag
            pool.worker_clr_flags(worker, STUCK)  # counted again: as the watchdog would when it runs
            pool.check_invariants()
    finally:
        release.set()
    wq.flush()
    wait_for("the pool at rest", lambda: pool.stats()["nr_running"] == 0)
    with pool.lock:
        pool.check_invariants()
