"""The timer thread: delays are checked and clamped, and nothing a caller or a callback does ends it.

Most tests use a private wheel (``timer._Wheel()``) so that they start from an empty heap and cannot
hurt the process's timer thread; the end-to-end tests use the real one through the public calls.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from async_inject import NOT_ON_311, inject_everywhere
from helpers import log_messages, wait_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from cmwq_exec import DelayedWork, WorkQueue
from cmwq_exec.core import timer

pytestmark = pytest.mark.timeout(60)

WHERE = "queue_delayed_work(work, delay): delay"


@pytest.fixture
def wheel() -> Iterator[Any]:
    """A private wheel, shut down when the test ends."""
    w = timer._Wheel()
    yield w
    w.shutdown(timeout=5)


def fired(wheel: Any, delay: float = 0.01) -> bool:
    """Does a timer added now to ``wheel`` fire within a few seconds?"""
    event = threading.Event()
    wheel.add(delay, event.set)
    return event.wait(5)


# -- check_delay -------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0, 0.0, 1, 0.25, 3600, 86400.0])
def test_check_delay_returns_ordinary_delays_as_floats(delay: float) -> None:
    checked = timer.check_delay(WHERE, delay)
    assert type(checked) is float and checked == delay


@pytest.mark.parametrize("delay", [math.inf, -math.inf, math.nan, -1, -0.001, -10**400,
                                   True, False, "1", None, b"1", [1], 1j])
def test_check_delay_rejects_what_is_not_a_finite_delay_naming_the_argument(delay: object) -> None:
    with pytest.raises(ValueError) as info:
        timer.check_delay(WHERE, delay)
    assert str(info.value) == f"{WHERE} must be a finite number of seconds >= 0, got {delay!r}"


def test_check_delay_message_for_inf_is_the_documented_one() -> None:
    with pytest.raises(ValueError, match=r"^queue_delayed_work\(work, delay\): delay must be a finite "
                                         r"number of seconds >= 0, got inf$"):
        timer.check_delay(WHERE, float("inf"))


@pytest.mark.parametrize("delay", [1e12, 1e300, 10**400, 2**63])
def test_check_delay_clamps_huge_delays_to_max_delay(delay: float) -> None:
    assert timer.check_delay(WHERE, delay) == timer.MAX_DELAY
    assert timer.check_delay(WHERE, timer.MAX_DELAY + 1) == timer.MAX_DELAY
    assert timer.check_delay(WHERE, timer.MAX_DELAY) == timer.MAX_DELAY


def test_max_delay_is_one_a_condition_can_wait() -> None:
    assert 0 < timer.MAX_DELAY <= threading.TIMEOUT_MAX


# -- the thread survives huge delays ---------------------------------------------------------------


@pytest.mark.parametrize("delay", [1e12, 10**400, math.inf, threading.TIMEOUT_MAX * 2])
def test_a_huge_delay_does_not_end_the_thread(wheel: Any, delay: float) -> None:
    far = wheel.add(delay, lambda: None)
    assert far.deadline <= time.monotonic() + timer.MAX_DELAY
    time.sleep(0.05)  # the thread now waits for the far timer alone
    assert fired(wheel), "a timer added after a huge delay never fired"
    assert wheel.thread.is_alive()
    assert far.pending and far.cancel()


@pytest.mark.parametrize("delay", [-1, -math.inf])
def test_a_negative_delay_fires_at_once(wheel: Any, delay: float) -> None:
    assert fired(wheel, delay)


def test_add_timer_refuses_nan_in_the_caller(wheel: Any) -> None:
    with pytest.raises(ValueError, match="NaN"):
        wheel.add(math.nan, lambda: None)
    assert not wheel.heap
    assert fired(wheel)


def test_huge_delays_through_add_timer_leave_the_process_timer_working() -> None:
    far = [timer.add_timer(delay, lambda: None) for delay in (1e12, math.inf, 10**400)]
    try:
        time.sleep(0.05)
        event = threading.Event()
        timer.add_timer(0.01, event.set)
        assert event.wait(5), "the process's timer thread is dead"
        assert timer._wheel.thread is not None and timer._wheel.thread.is_alive()
    finally:
        for t in far:
            t.cancel()


def test_huge_delayed_works_leave_later_delayed_works_running() -> None:
    """End to end: a work delayed by 1e12 s (or inf, once queue_delayed_work refuses it) must not
    stop the delayed works queued after it."""
    wq = WorkQueue(f"timer-huge-{uuid.uuid4().hex[:6]}")
    far = DelayedWork(lambda: None)
    try:
        assert wq.queue_delayed_work(far, 1e12)
        never = DelayedWork(lambda: None)
        try:
            if wq.queue_delayed_work(never, math.inf):
                never.cancel()
        except ValueError:
            pass  # refused by timer.check_delay: just as good
        time.sleep(0.05)
        ran = threading.Event()
        assert wq.queue_delayed_work(DelayedWork(ran.set), 0.01)
        assert ran.wait(5), "a delayed work queued after a huge delay never ran"
    finally:
        far.cancel()
        wq.destroy()


# -- nothing a callback raises ends the thread -----------------------------------------------------


class Odd(BaseException):
    pass


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, SystemExit, GeneratorExit, Odd])
def test_a_raising_callback_is_logged_and_the_thread_goes_on(
        wheel: Any, exc: type[BaseException], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cmwq_exec.timer")

    def boom() -> None:
        raise exc("from a timer callback")

    wheel.add(0, boom)
    assert fired(wheel), f"the thread died of {exc.__name__}"
    assert wheel.thread.is_alive()
    records = [r for r in caplog.records if r.name == "cmwq_exec.timer"]
    assert records and records[0].exc_info and records[0].exc_info[0] is exc


def test_a_failing_wait_does_not_end_the_thread(wheel: Any, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's own code failing (here Condition.wait, as it did with an overflowing timeout) is
    logged and the loop goes on."""
    caplog.set_level(logging.ERROR, logger="cmwq_exec.timer")
    wait = wheel.cond.wait
    failures = []

    def failing_wait(timeout: float | None = None) -> bool:
        if not failures:
            failures.append(timeout)
            raise OverflowError("timestamp out of range for platform time_t")
        return wait(timeout)

    monkeypatch.setattr(wheel.cond, "wait", failing_wait)
    assert fired(wheel, 0.05)
    assert failures, "the wait was never called"
    assert wheel.thread.is_alive()
    assert any(r.exc_info and r.exc_info[0] is OverflowError for r in caplog.records)


def test_add_timer_restarts_a_dead_thread(wheel: Any) -> None:
    dead = threading.Thread(target=lambda: None, name="cmwq-timer")
    dead.start()
    dead.join()
    wheel.thread = dead  # as if it had been killed
    assert fired(wheel)
    assert wheel.thread is not dead and wheel.thread.is_alive()


# -- shutdown ---------------------------------------------------------------------------------------


def test_shutdown_stops_the_thread_drops_its_timers_and_add_starts_a_fresh_one(wheel: Any) -> None:
    assert fired(wheel)
    first = wheel.thread
    ran: list[int] = []
    dropped = wheel.add(0.2, lambda: ran.append(1))
    assert wheel.shutdown(timeout=5)
    assert not first.is_alive() and wheel.thread is None and not wheel.heap
    time.sleep(0.3)
    assert not ran, "a timer fired after shutdown"
    assert dropped.pending and dropped.cancel()  # its owner can still take it back
    assert fired(wheel)
    assert wheel.thread is not first and wheel.thread.is_alive()


def test_shutdown_without_a_thread_and_twice(wheel: Any) -> None:
    assert wheel.shutdown()
    assert fired(wheel)
    assert wheel.shutdown() and wheel.shutdown()


def test_shutdown_from_a_callback_does_not_wait_for_itself(wheel: Any) -> None:
    result: list[tuple[threading.Thread, bool]] = []
    done = threading.Event()

    def stop() -> None:
        result.append((threading.current_thread(), wheel.shutdown(timeout=5)))
        done.set()

    wheel.add(0, stop)
    assert done.wait(5)
    old, ended = result[0]
    assert not ended  # it could not have ended yet: it is this very thread
    wait_for("the old timer thread to end", lambda: not old.is_alive())
    assert fired(wheel)


def test_shutdown_times_out_on_a_long_callback_and_the_old_thread_then_ends(wheel: Any) -> None:
    gate = threading.Event()
    started = threading.Event()

    def long() -> None:
        started.set()
        gate.wait(10)

    wheel.add(0, long)
    assert started.wait(5)
    old = wheel.thread
    assert not wheel.shutdown(timeout=0.05)
    assert fired(wheel), "a fresh thread did not start while the old one still ran its callback"
    gate.set()
    old.join(5)
    assert not old.is_alive()
    assert wheel.thread.is_alive()


def test_module_shutdown_then_add_timer(fresh_system: Any) -> None:
    fresh_system()  # the pools whose timers this drops are replaced when the test ends
    assert timer.shutdown(timeout=5)
    assert timer._wheel.thread is None
    event = threading.Event()
    timer.add_timer(0.01, event.set)
    assert event.wait(5)


# -- fork -------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_timers_work_in_a_child_forked_while_the_wheel_lock_was_held() -> None:
    timer.add_timer(0, lambda: None)  # the parent has a timer thread
    with timer._wheel.lock:
        pid = os.fork()
        if pid == 0:  # child: the lock it inherited is held by the parent's thread
            code = 1
            try:
                signal.alarm(10)  # a deadlocked child dies instead of hanging the test
                event = threading.Event()
                timer.add_timer(0.01, event.set)
                code = 0 if event.wait(5) else 2
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# -- the watched socket (the hotplug monitor's, served by this thread) ------------------------------


def test_a_watched_socket_is_served_on_the_timer_thread_and_timers_still_fire(wheel: Any) -> None:
    import socket

    reader, writer = socket.socketpair()
    reader.setblocking(False)
    served: list[str] = []

    def on_ready() -> None:
        served.append(threading.current_thread().name)
        reader.recv(4096)

    try:
        wheel.watch(reader, on_ready)
        assert fired(wheel)  # the thread sleeps in select now: a new earliest timer pokes it
        writer.send(b"x")
        wait_for("the socket served", lambda: served == ["cmwq-timer"])
        event = threading.Event()
        wheel.add(3600, lambda: None)
        wheel.add(0.05, event.set)  # earlier than the head: the poke must wake the select
        started = time.monotonic()
        assert event.wait(5) and time.monotonic() - started < 2
        wheel.unwatch(reader)
        writer.send(b"y")
        assert fired(wheel) and served == ["cmwq-timer"]  # no longer served
    finally:
        reader.close()
        writer.close()


def test_a_socket_closed_while_watched_is_dropped_and_the_thread_goes_on(wheel: Any) -> None:
    import socket

    reader, writer = socket.socketpair()
    wheel.watch(reader, lambda: None)
    assert fired(wheel)
    with log_messages("cmwq_exec.timer", logging.WARNING) as messages:
        reader.close()  # without unwatch(): select fails on it
        wheel.add(0, lambda: None)  # poke: the next select sees the closed socket
        wait_for("the socket dropped", lambda: wheel.watched is None)
    writer.close()
    assert fired(wheel)
    assert any("no longer watched" in m for m in messages), messages


def test_a_raising_socket_callback_is_logged_and_the_thread_goes_on(wheel: Any) -> None:
    import socket

    reader, writer = socket.socketpair()
    reader.setblocking(False)
    calls = []

    def on_ready() -> None:
        calls.append(1)
        reader.recv(4096)
        raise RuntimeError("boom")

    try:
        with log_messages("cmwq_exec.timer", logging.ERROR) as messages:
            wheel.watch(reader, on_ready)
            writer.send(b"x")
            wait_for("the callback ran", lambda: calls == [1])
            assert fired(wheel)
        assert any("socket callback" in m for m in messages), messages
    finally:
        wheel.unwatch(reader)
        reader.close()
        writer.close()


def test_an_exception_raised_as_a_lock_is_taken_never_leaves_the_timer_lock_held(wheel: Any) -> None:
    """add() and cancel() also run on task threads (blocking() hands a running slot on through
    add_timer), where a Celery time limit may raise at any call's return. Condition.__enter__ is a
    Python function: an exception raised as it returns keeps the lock. So they take the plain lock,
    whose __enter__ is C; here the Condition's __enter__ raises with the lock taken, as such an
    exception would, and nothing may go through it."""

    class Injected(Exception):
        pass

    class RaisingOnEnter(threading.Condition):
        def __enter__(self) -> bool:
            super().__enter__()
            raise Injected

    wheel.cond = RaisingOnEnter(wheel.lock)
    tm = wheel.add(3600, lambda: None)
    assert tm.cancel()
    assert not wheel.lock.locked()
    assert fired(wheel)
    wheel.unwatch(object())
    assert not wheel.lock.locked()


# -- a cancelled timer costs nothing ---------------------------------------------------------------


class Owner:
    """Something a callback holds (a job, a work, a pool): it must die with its last user's reference."""

    def __init__(self) -> None:
        self.fired = threading.Event()

    def fire(self) -> None:
        self.fired.set()


def collected(ref: weakref.ref[Any]) -> bool:
    gc.collect()
    return ref() is None


def test_a_cancelled_timer_drops_its_callback(wheel: Any) -> None:
    owner = Owner()
    ref = weakref.ref(owner)
    tm = wheel.add(3600, owner.fire)  # the bound method holds the owner
    del owner
    assert not collected(ref), "the pending timer must keep its callback's objects"
    assert tm.cancel()
    assert collected(ref), "a cancelled timer (still in the heap) keeps its callback's objects alive"
    assert tm.callback is None and not tm.pending and not tm.cancel()


def test_a_fired_timer_drops_its_callback(wheel: Any) -> None:
    owner = Owner()
    ref = weakref.ref(owner)
    fired_event = owner.fired
    tm = wheel.add(0, owner.fire)
    del owner
    assert fired_event.wait(5)
    wait_for("the fired timer to let its callback go", lambda: collected(ref))
    assert tm.callback is None and not tm.pending and not tm.cancel()


def test_the_heap_stays_bounded_over_many_add_cancel_pairs(wheel: Any) -> None:
    live = [wheel.add(3600 + i, lambda: None) for i in range(1000)]
    longest = 0
    for _ in range(100_000):
        wheel.add(3600, lambda: None).cancel()
        longest = max(longest, len(wheel.heap))
    # cancelled entries are never more than max(_COMPACT_MIN_CANCELLED, the live ones)
    assert longest <= 2 * len(live) + 1, longest
    for tm in live:
        assert tm.cancel()
    assert len(wheel.heap) <= timer._COMPACT_MIN_CANCELLED + 1, len(wheel.heap)
    assert fired(wheel), "the thread no longer serves the rebuilt heap"


def test_a_rebuilt_heap_still_fires_its_live_timers_in_order(wheel: Any) -> None:
    """Cancel most of a heap whose live timers are due soon: the rebuild keeps them all and they fire
    by deadline (then order of adding)."""
    order: list[int] = []
    done = threading.Event()
    gate = threading.Event()
    wheel.add(0, lambda: gate.wait(10))  # hold the thread while the heap is built and cut
    timers = [wheel.add(3600, lambda: None) for _ in range(3 * timer._COMPACT_MIN_CANCELLED)]
    deadlines = [wheel.add(0.001 * (i % 5), lambda i=i: order.append(i)).deadline for i in range(20)]
    wheel.add(1, done.set)  # later than all of them: it fires last
    for tm in timers:
        assert tm.cancel()
    assert len(wheel.heap) <= 22 + timer._COMPACT_MIN_CANCELLED
    gate.set()
    assert done.wait(5)
    assert order == sorted(range(20), key=lambda i: (deadlines[i], i))


def test_a_cancelled_delayed_work_is_let_go(fresh_system: Any) -> None:
    """End to end through queue_delayed_work: the cancelled work's timer no longer holds the work
    (nor its function), and the process's heap does not grow with queue + cancel pairs."""
    fresh_system()
    wq = WorkQueue(f"timer-cancel-{uuid.uuid4().hex[:6]}")
    try:
        owner = Owner()
        owner_ref = weakref.ref(owner)
        dw = DelayedWork(owner.fire)
        work_ref = weakref.ref(dw)
        assert wq.queue_delayed_work(dw, 3600)
        assert dw.cancel()
        del dw, owner
        assert collected(work_ref) and collected(owner_ref)
        before = len(timer._wheel.heap)
        dw = DelayedWork(lambda: None)
        for _ in range(5000):
            assert wq.queue_delayed_work(dw, 3600)
            assert dw.cancel()
        assert len(timer._wheel.heap) <= before + timer._COMPACT_MIN_CANCELLED + 1
    finally:
        wq.destroy()


# -- cancel and fire race -------------------------------------------------------------------------


def test_cancel_and_fire_race_each_timer_fires_at_most_once(wheel: Any) -> None:
    """Timers due now are cancelled by two threads while the timer thread fires them, among far ones
    whose cancels rebuild the heap meanwhile: a timer fires once exactly when no cancel() returned
    True, one cancel() at most returns True, and none fires twice."""
    n = 3000
    counts = [0] * n
    lock = threading.Lock()

    def bump(i: int) -> None:
        with lock:
            counts[i] += 1

    barrier = threading.Barrier(2)
    timers = [wheel.add(0 if i % 2 else 3600, functools.partial(bump, i)) for i in range(n)]
    won: list[list[int]] = [[], []]

    def canceller(k: int, indices: range) -> None:
        barrier.wait(5)
        for i in indices:
            if timers[i].cancel():
                won[k].append(i)

    threads = [threading.Thread(target=canceller, args=(0, range(n))),
               threading.Thread(target=canceller, args=(1, range(n - 1, -1, -1)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    cancelled = won[0] + won[1]
    assert len(cancelled) == len(set(cancelled)), "two cancel() calls returned True for one timer"
    assert set(range(0, n, 2)) <= set(cancelled)  # the far ones cannot have fired
    marker = threading.Event()
    wheel.add(0.001, marker.set)
    assert marker.wait(5)
    wait_for("every uncancelled timer to fire",
             lambda: all(counts[i] == 1 for i in set(range(n)) - set(cancelled)))
    assert all(counts[i] == 0 for i in cancelled)
    assert max(counts) <= 1
    assert all(tm.callback is None for tm in timers)


# -- a model of add, cancel and fire --------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TimerModel(RuleBasedStateMachine):
    """add/cancel/advance the clock against a wheel run by hand (no thread: run_next on this thread)
    and a plain list: timers fire in (deadline, order of adding), once, never after a cancel; the
    heap holds every pending timer and at most max(_COMPACT_MIN_CANCELLED, live) cancelled ones."""

    timers = Bundle("timers")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.wheel = timer._Wheel()
        self.wheel.clock = self.clock
        self.wheel.thread = threading.current_thread()  # alive: add() starts no thread
        self.pending: dict[int, tuple[float, int]] = {}  # index -> (deadline, order)
        self.fired: list[int] = []
        self.objects: list[Any] = []
        self.count = 0

    @rule(target=timers, delay=st.sampled_from([0.0, 1.0, 2.0, 5.0, 3600.0]))
    def add(self, delay: float) -> Any:
        i = self.count
        self.count += 1
        tm = self.wheel.add(delay, lambda: self.fired.append(i))
        self.pending[i] = (self.clock.now + delay, i)
        self.objects.append(tm)
        return i

    @rule(i=timers)
    def cancel(self, i: int) -> None:
        expected = i in self.pending
        assert self.objects[i].cancel() is expected
        self.pending.pop(i, None)

    @rule(repeat=st.integers(1, 40))
    def add_and_cancel_many(self, repeat: int) -> None:
        for _ in range(repeat):
            assert self.wheel.add(7.0, lambda: self.fired.append(-1)).cancel()

    @rule(step=st.sampled_from([0.0, 0.5, 1.0, 3.0, 4000.0]))
    def advance(self, step: float) -> None:
        self.clock.now += step
        due = sorted((deadline, order) for deadline, order in self.pending.values()
                     if deadline <= self.clock.now)
        for _, i in due:
            assert any(e[2].state == 0 and e[0] <= self.clock.now for e in self.wheel.heap)
            assert self.wheel.run_next(self.wheel.thread)
            assert self.fired[-1] == i, (self.fired, due)
            del self.pending[i]

    @invariant()
    def heap_matches(self) -> None:
        heap = self.wheel.heap
        in_heap = [e[2] for e in heap]
        assert {id(self.objects[i]) for i in self.pending} <= {id(tm) for tm in in_heap}
        states = [tm.state for tm in in_heap]
        assert 1 not in states, "a fired timer is still in the heap"
        live = states.count(0)
        assert live == len(self.pending)
        assert len(heap) - live <= max(timer._COMPACT_MIN_CANCELLED, live), (len(heap), live)
        for i, tm in enumerate(self.objects):
            assert (tm.callback is not None) is (i in self.pending)

    def teardown(self) -> None:
        self.wheel.thread = None


def test_timer_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timer, "_COMPACT_MIN_CANCELLED", 2)  # rebuilds in short runs
    run_state_machine_as_test(TimerModel, settings=settings(
        max_examples=150, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))


# -- an exception at any call return of add() leaves the thread serving the heap ---------------------


class _AddScenario:
    """``add()`` of a timer earlier than the head, on a wheel whose thread sleeps until a far timer
    (in ``Condition.wait``, or in ``select`` while a socket is watched), the exception injected at
    each call return of ``add()`` in turn (tests/async_inject.py). Whatever the injection cut, a
    timer that made it into the heap fires: the thread is never left asleep past the heap's head.

    Once an exception landing as ``heappush`` returned skipped the wakeup after it: the thread slept
    on until its old deadline (for ever, with an empty heap), and every later timer, the watchdog's
    included, waited with it."""

    watched = False

    def setup(self) -> None:
        import socket

        self.wheel = timer._Wheel()
        self.sockets = socket.socketpair() if self.watched else ()
        if self.watched:
            self.wheel.watch(self.sockets[0], lambda: None)
        self.wheel.add(3600, lambda: None)
        wait_for("the timer thread asleep", lambda: self.wheel.sleep_until is not None)
        self.event = threading.Event()
        self.added: Any = None

    def body(self) -> None:
        self.added = self.wheel.add(0.02, self.event.set)

    def check(self, run: Any) -> None:
        with self.wheel.lock:
            self.wheel.check_invariants()
            queued = any(entry[2].callback == self.event.set for entry in self.wheel.heap)
        if self.added is not None or queued:
            assert self.event.wait(5), f"{run}: a timer in the heap never fired"

    def teardown(self) -> None:
        self.wheel.shutdown(timeout=5)
        for sock in self.sockets:
            sock.close()


class _WatchedAddScenario(_AddScenario):
    watched = True


@NOT_ON_311
@pytest.mark.parametrize("scenario", [_AddScenario, _WatchedAddScenario], ids=["wait", "select"])
def test_an_exception_at_any_call_return_of_add_never_leaves_the_thread_asleep(scenario: type) -> None:
    runs = inject_everywhere(scenario, "async")
    assert runs[-1].injected is False and len(runs) > 3, runs
