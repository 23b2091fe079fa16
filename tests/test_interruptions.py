"""The interruption rule, checked: an exception injected at any call return of queueing, cancelling,
flushing or submitting leaves the workqueue and the pools consistent, and loses no work.

Each scenario runs once per call return its body makes inside the package, the exception injected
there (tests/async_inject.py), and after each run checks what the rule promises: every work ran at
most once, once if it was queued and not cancelled, never if a cancel took it back; nothing of the
workqueue stays in flight, active or pending; a flush completes; every pool's invariants hold.
The "signal" model holds the exception over a ``deferred_interrupts`` block, as a SIGINT is held;
the "async" model raises it anywhere, as ``PyThreadState_SetAsyncExc`` does (a Celery time limit).
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import CancelledError
from typing import Any

import pytest
from async_inject import NOT_ON_311, Run, Tally, inject_everywhere, workqueue_at_rest
from helpers import wait_for

from cmwq_exec import CMWQExecutor, DelayedWork, Work, WorkQueue

pytestmark = NOT_ON_311

_names = itertools.count()


class _WorkQueueScenario:
    """A fresh limited workqueue per run, its works tallied; ``gate`` holds the gated works."""

    max_active: int | None = 1
    gated = 1  # the first works wait for the gate (so the next ones wait for max_active)
    nr_works = 3

    def setup(self) -> None:
        self.wq = WorkQueue(f"inject-{next(_names)}", max_active=self.max_active)
        self.gate = threading.Event()
        self.tally = Tally()
        self.works: list[Work] = []
        for i in range(self.nr_works):
            j = self.tally.add()
            self.works.append(self.make_work(j, self.tally.runner(j, self.gate if i < self.gated else None)))

    def make_work(self, i: int, fn: Any) -> Work:
        return Work(fn)

    def queue(self, i: int) -> None:
        self.tally.queued[i] = self.wq.queue_work(self.works[i])

    def check(self, run: Run) -> None:
        self.gate.set()  # the body may not have got there
        workqueue_at_rest(self.wq, run, self.works)
        self.tally.check(run)

    def teardown(self) -> None:
        self.gate.set()
        done = threading.Event()
        threading.Thread(target=lambda: (self.wq.destroy(), done.set()), daemon=True).start()
        wait_for(f"workqueue {self.wq.name} destroyed", done.is_set)


class QueueScenario(_WorkQueueScenario):
    """queue_work: one work runs (held), the next ones wait for max_active on the inactive list;
    raising the limit moves them to the pool on the caller's thread; then the gate opens."""

    def body(self) -> None:
        for i in range(self.nr_works):
            self.queue(i)
        self.wq.set_max_active(self.nr_works)
        self.gate.set()


class CancelScenario(_WorkQueueScenario):
    """cancel: a work on the inactive list and a delayed work on its timer are cancelled while
    the first work runs."""

    nr_works = 3

    def make_work(self, i: int, fn: Any) -> Work:
        return DelayedWork(fn) if i == 2 else Work(fn)

    def body(self) -> None:
        self.queue(0)
        self.queue(1)
        work = self.works[2]
        assert isinstance(work, DelayedWork)
        self.tally.queued[2] = self.wq.queue_delayed_work(work, 60.0)
        self.tally.cancel(1, self.works[1])
        self.tally.cancel(2, work)
        self.gate.set()

    def check(self, run: Run) -> None:
        self.gate.set()
        work = self.works[2]
        if work.pending:  # still on its 60 s timer: its cancel was never made
            self.tally.cancel(2, work)
            assert self.tally.cancelled[2], str(run)
        super().check(run)


class FlushScenario(_WorkQueueScenario):
    """flush and drain: works are queued, the workqueue is flushed, one more is queued, and the
    workqueue is drained."""

    gated = 0
    nr_works = 3

    def body(self) -> None:
        self.queue(0)
        self.queue(1)
        self.wq.flush()
        assert self.tally.ran[0] == 1 or not self.tally.queued[0]
        self.queue(2)
        self.wq.drain()


class SubmitScenario:
    """An executor's submit, then ``result()`` of each call.

    ``result()`` waits under the future's Condition, taken with its lock's own ``with``: taken with
    the Condition's (a Python ``__enter__``), an exception raised as that returns kept the lock,
    and the worker finishing the call hung on it."""

    nr_calls = 3
    max_workers: int | None = 1
    fresh_pools = False  # fresh pools for every run (a process's first submits)

    def setup(self) -> None:
        if self.fresh_pools:
            from cmwq_exec.core import system

            system._reset_for_tests(hotplug=False)
        self.executor = CMWQExecutor(max_workers=self.max_workers, name=f"inject-{next(_names)}")
        self.tally = Tally()
        self.futures: list[Any] = []
        self.gate = threading.Event()

    def body(self) -> None:
        for _ in range(self.nr_calls):
            i = self.tally.add()
            self.futures.append(self.executor.submit(self.tally.runner(i, self.gate if i == 0 else None)))
            self.tally.queued[i] = True
        self.gate.set()
        for future in self.futures:
            future.result()

    def check(self, run: Run) -> None:
        self.gate.set()
        wq = self.executor.workqueue
        workqueue_at_rest(wq, run)
        for i, future in enumerate(self.futures):
            assert future.done(), f"{run}: call {i} never finished"
            try:
                future.result(0)
            except CancelledError:
                self.tally.cancelled[i] = True
        self.tally.check(run)

    def teardown(self) -> None:
        self.gate.set()
        done = threading.Event()
        threading.Thread(target=lambda: (self.executor.shutdown(wait=True), done.set()), daemon=True).start()
        wait_for(f"executor {self.executor.workqueue.name} shut down", done.is_set)


class FreshPoolsScenario(SubmitScenario):
    """An unlimited executor's submits on fresh pools, as a process's first submits are: each
    pool has its first worker only, the first call blocks (on the gate), so the next calls need
    a worker created while it sleeps (the handover, the manager, the pacing timer). Fresh pools for
    every run: on pools that kept the workers of earlier runs, the injection never lands in the
    paths that create one."""

    max_workers = None
    fresh_pools = True


SCENARIOS = [QueueScenario, CancelScenario, FlushScenario, SubmitScenario, FreshPoolsScenario]


# an injection that lands in a finalizer run on the scenario's thread (an earlier run's executor
# dropped there) is reported as unraisable, and the run goes on uninterrupted
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("model", ["signal", "async"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_injected_at_every_call_return(scenario: type, model: str, reset_system: Any) -> None:
    reset_system()  # fresh pools, whose watchdog makes up a wakeup an injection cost (the rule allows it)
    runs = inject_everywhere(scenario, model)
    assert runs[-1].injected is False and len(runs) > 10, runs[-1]


def _larger(scenario: type) -> type:
    """The scenario with more works (two held) and a limit of two: more interleavings, slower."""
    attrs: dict[str, Any] = {"nr_works": 5, "nr_calls": 5}
    if issubclass(scenario, _WorkQueueScenario):
        attrs["max_active"] = 2
        attrs["gated"] = min(scenario.gated, 1) * 2
    return type(f"Larger{scenario.__name__}", (scenario,), attrs)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("model", ["signal", "async"])
@pytest.mark.parametrize("scenario", [_larger(s) for s in SCENARIOS], ids=lambda s: s.__name__)
def test_injected_at_every_call_return_larger(scenario: type, model: str, reset_system: Any) -> None:
    reset_system()
    runs = inject_everywhere(scenario, model)
    assert runs[-1].injected is False and len(runs) > 10, runs[-1]
