"""A hypothesis state machine over executors on the shared pools: random submits, blocked calls,
releases, cancels, flushes and shutdowns; the pools' invariants hold after every step, and in the
end every future is done exactly once."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import wait_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import cmwq_exec
from cmwq_exec import CMWQExecutor, blocking

pytestmark = pytest.mark.timeout(120)

KINDS = [{}, {"max_workers": 2}, {"unbound": True}]


@dataclass
class Call:
    token: int
    executor: CMWQExecutor
    future: cf.Future[Any]
    event: threading.Event | None  # a blocked call waits for it
    cancelled_by_us: bool = False
    may_be_cancelled: bool = False  # a shutdown(cancel_futures=True) came after it
    callbacks: list[Any] = field(default_factory=list)


class ExecutorModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.executors: list[CMWQExecutor] = []
        self.shut: list[bool] = []
        self.calls: list[Call] = []
        self.runs: list[int] = []  # a token per run (list.append is atomic)
        self.tokens = itertools.count()
        self.retired: list[CMWQExecutor] = []

    @initialize()
    def start(self) -> None:
        self.executors = [CMWQExecutor(**kwargs) for kwargs in KINDS]
        self.shut = [False] * len(self.executors)

    # -- rules ------------------------------------------------------------------------------------

    def _submit(self, ex: int, blocked: bool) -> None:
        token = next(self.tokens)
        event = threading.Event() if blocked else None
        runs = self.runs

        def call() -> int:
            runs.append(token)
            if event is not None:
                with blocking():
                    assert event.wait(60), "never released"
            return token

        executor = self.executors[ex]
        if self.shut[ex]:
            with pytest.raises(RuntimeError, match="shutdown"):
                executor.submit(call)
            return
        future = executor.submit(call)
        entry = Call(token, executor, future, event)
        future.add_done_callback(entry.callbacks.append)
        self.calls.append(entry)

    @rule(ex=st.integers(0, len(KINDS) - 1))
    def submit(self, ex: int) -> None:
        self._submit(ex, blocked=False)

    @rule(ex=st.integers(0, len(KINDS) - 1))
    def block(self, ex: int) -> None:
        self._submit(ex, blocked=True)

    def _blocked(self) -> list[Call]:
        return [c for c in self.calls if c.event is not None and not c.event.is_set()]

    @precondition(lambda self: bool(self._blocked()))
    @rule(i=st.integers(0, 1000))
    def unblock(self, i: int) -> None:
        blocked = self._blocked()
        blocked[i % len(blocked)].event.set()  # type: ignore[union-attr]

    @precondition(lambda self: bool(self.calls))
    @rule(i=st.integers(0, 1000))
    def cancel(self, i: int) -> None:
        entry = self.calls[i % len(self.calls)]
        if entry.future.cancel():
            entry.cancelled_by_us = True
            assert entry.future.cancelled() and entry.future.done()
        else:
            assert entry.future.running() or entry.future.done()

    @rule(ex=st.integers(0, len(KINDS) - 1))
    def flush(self, ex: int) -> None:
        executor = self.executors[ex]
        if any(c.executor is executor for c in self._blocked()):
            return  # it would wait for a release that only the next steps can give
        executor.workqueue.flush()
        for entry in self.calls:
            if entry.executor is executor:
                assert entry.future.done(), f"flush returned before call {entry.token} finished"

    @precondition(lambda self: len(self.calls) >= 6)
    @rule(ex=st.integers(0, len(KINDS) - 1), cancel_futures=st.booleans())
    def shutdown(self, ex: int, cancel_futures: bool) -> None:
        executor = self.executors[ex]
        executor.shutdown(wait=False, cancel_futures=cancel_futures)
        self.shut[ex] = True
        if cancel_futures:
            mine = [c for c in self.calls if c.executor is executor]
            for entry in mine:
                entry.may_be_cancelled = True
            # nothing of it stays pending: running, finished or cancelled (a worker may be between
            # taking a call off the worklist and claiming it: allow it a moment)
            wait_for("no call pending after shutdown(cancel_futures)",
                     lambda: all(c.future.running() or c.future.done() for c in mine), timeout=2)

    @rule(ex=st.integers(0, len(KINDS) - 1))
    def reopen(self, ex: int) -> None:
        """A shut-down executor is replaced by a fresh one of its kind (its calls stay tracked)."""
        if self.shut[ex]:
            self.retired.append(self.executors[ex])
            self.executors[ex] = CMWQExecutor(**KINDS[ex])
            self.shut[ex] = False

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def pools_consistent(self) -> None:
        for pool in cmwq_exec.get_system().pools:
            with pool.lock:
                pool.check_invariants()

    @invariant()
    def cancelled_calls_never_ran(self) -> None:
        for entry in self.calls:
            if entry.future.cancelled():
                assert entry.cancelled_by_us or entry.may_be_cancelled

    # -- the end ----------------------------------------------------------------------------------

    def teardown(self) -> None:
        for entry in self.calls:
            if entry.event is not None:
                entry.event.set()
        try:
            futures = [c.future for c in self.calls]
            done, not_done = cf.wait(futures, timeout=30)
            assert not not_done, f"{len(not_done)} futures never finished"
            wait_for("every done callback", lambda: all(c.callbacks for c in self.calls), timeout=10)
            ran = collections.Counter(self.runs)
            for entry in self.calls:
                future = entry.future
                assert entry.callbacks == [future], "a done callback ran other than once"
                if future.cancelled():
                    assert entry.cancelled_by_us or entry.may_be_cancelled
                    assert ran[entry.token] == 0, f"cancelled call {entry.token} ran"
                else:
                    assert future.result() == entry.token
                    assert ran[entry.token] == 1, f"call {entry.token} ran {ran[entry.token]} times"
        finally:
            for executor in self.executors + self.retired:
                executor.shutdown(wait=True)
        for pool in cmwq_exec.get_system().pools:
            with pool.lock:
                pool.check_invariants()


ExecutorModel.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_executor_model = ExecutorModel.TestCase
