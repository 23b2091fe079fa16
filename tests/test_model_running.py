"""A hypothesis state machine for ``max_running``: works that sleep inside blocking() hand their
running slot on, wake up, and finish, in random order, under random limits.

The model is the rule of workqueue.py's module docstring, applied to a FIFO of works: while works
wait and ``active < max_active`` and ``active - sleeping < max_running``, the next one becomes
active. After every step the real workqueue must settle on exactly the works the model says are
active (no more, no fewer, and the first ones queued), with the same active and sleeping counts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from helpers import wait_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cmwq_exec import WQ, Work, WorkQueue, blocking

pytestmark = pytest.mark.timeout(300)

WAIT = 5.0  # seconds for the real workqueue to settle on the model's state


@dataclass
class Item:
    n: int
    sleeper: bool  # sleeps inside blocking() as soon as it starts, until woken
    state: str = "inactive"  # inactive, sleeping, running, done (the model's view)
    started: threading.Event = field(default_factory=threading.Event)
    slept: threading.Event = field(default_factory=threading.Event)  # inside blocking()
    wake: threading.Event = field(default_factory=threading.Event)
    woke: threading.Event = field(default_factory=threading.Event)  # out of blocking() again
    finish: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        self.started.set()
        if self.sleeper:
            with blocking():
                self.slept.set()
                assert self.wake.wait(60), "never woken"
            self.woke.set()
        assert self.finish.wait(60), "never finished"


class MaxRunningModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.items: list[Item] = []
        self.works: list[Work] = []
        self.wq: WorkQueue | None = None

    @initialize(max_active=st.integers(1, 5), running=st.integers(1, 5), unbound=st.booleans())
    def start(self, max_active: int, running: int, unbound: bool) -> None:
        self.max_active = max_active
        self.max_running = min(running, max_active)
        self.wq = WorkQueue("model-max-running", WQ.UNBOUND if unbound else 0,
                            max_active=self.max_active, max_running=self.max_running)

    # -- the model --------------------------------------------------------------------------------

    def _count(self, *states: str) -> int:
        return sum(1 for item in self.items if item.state in states)

    def _settle(self) -> None:
        """Activate what the model allows, then wait for the real workqueue to do the same."""
        for item in self.items:
            if item.state != "inactive":
                continue
            active = self._count("sleeping", "running")
            if active >= self.max_active or active - self._count("sleeping") >= self.max_running:
                break
            item.state = "sleeping" if item.sleeper else "running"
        for item in self.items:
            if item.state in ("sleeping", "running"):
                wait_for(f"work {item.n} to start", item.started.is_set, WAIT)
            if item.state == "sleeping":
                wait_for(f"work {item.n} to sleep", item.slept.is_set, WAIT)
        assert self.wq is not None
        wq = self.wq
        wait_for("the workqueue's counts to match the model",
                 lambda: (wq._nr_active, wq._nr_sleeping) == (self._count("sleeping", "running"),
                                                              self._count("sleeping")), WAIT)

    # -- rules ------------------------------------------------------------------------------------

    @rule(sleeper=st.booleans())
    def queue(self, sleeper: bool) -> None:
        assert self.wq is not None
        item = Item(len(self.items), sleeper)
        work = Work(item.run)
        self.items.append(item)
        self.works.append(work)
        assert self.wq.queue_work(work)
        self._settle()

    @rule(i=st.integers(0, 1000))
    def wake(self, i: int) -> None:
        sleeping = [item for item in self.items if item.state == "sleeping"]
        if not sleeping:
            return
        item = sleeping[i % len(sleeping)]
        item.wake.set()
        wait_for(f"work {item.n} to wake", item.woke.is_set, WAIT)
        item.state = "running"
        self._settle()

    @rule(i=st.integers(0, 1000))
    def finish(self, i: int) -> None:
        running = [item for item in self.items if item.state == "running"]
        if not running:
            return
        item = running[i % len(running)]
        item.finish.set()
        self.works[item.n].flush()
        item.state = "done"
        self._settle()

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def only_the_first_queued_have_started(self) -> None:
        started = [item.n for item in self.items if item.started.is_set()]
        assert started == list(range(len(started))), f"out of order: {started}"
        modelled = [item.n for item in self.items if item.state != "inactive"]
        assert started == modelled, f"started {started}, the model says {modelled}"

    def teardown(self) -> None:
        for item in self.items:
            item.wake.set()
            item.finish.set()
        if self.wq is not None:
            self.wq.flush()
            assert (self.wq._nr_active, self.wq._nr_sleeping, len(self.wq._inactive)) == (0, 0, 0)
            self.wq.destroy()


MaxRunningModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_max_running_model = MaxRunningModel.TestCase
