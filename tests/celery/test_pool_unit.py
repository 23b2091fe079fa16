"""cmwq_exec.celery.TaskPool in-process, without a broker: the pool's own contract.

These drive the pool the way Celery's Request does (``apply_async`` with the five callbacks and
the limits) using plain functions as targets, so each rule is checked in isolation and fast; the
real-worker tests in test_celery_pool.py check the same rules end to end.
"""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
from celery.exceptions import ImproperlyConfigured, SoftTimeLimitExceeded
from celery_harness import wait_for

import cmwq_exec
from cmwq_exec.celery import TaskPool
from cmwq_exec.core import lockdep

pytestmark = [pytest.mark.celery, pytest.mark.timeout(60)]


class Calls:
    """Records every callback the pool makes, per job."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, Any, tuple[Any, ...]]] = []

    def callbacks(self, tag: Any) -> dict[str, Any]:
        def record(kind: str) -> Any:
            def callback(*args: Any) -> None:
                with self.lock:
                    self.events.append((kind, tag, args))
            return callback

        return {"callback": record("success"), "error_callback": record("error"),
                "accept_callback": record("accept"), "timeout_callback": record("timeout")}

    def of(self, tag: Any, kind: str | None = None) -> list[tuple[Any, ...]]:
        with self.lock:
            return [args for k, t, args in self.events if t == tag and (kind is None or k == kind)]

    def kinds(self, tag: Any) -> list[str]:
        with self.lock:
            return [k for k, t, _ in self.events if t == tag]


@pytest.fixture
def make_pool():
    pools: list[TaskPool] = []

    def make(limit: int = 2, **options: Any) -> TaskPool:
        pool = TaskPool(limit=limit, **options)
        pool.start()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        if pool._state == pool.RUN:
            pool.stop()


def test_results_errors_and_a_distinct_id_per_task(make_pool):
    pool, calls = make_pool(limit=4), Calls()
    for i in range(6):
        pool.apply_async(lambda x: x * 10, (i,), **calls.callbacks(i))
    pool.apply_async(lambda: 1 / 0, **calls.callbacks("boom"))
    wait_for("every job to report",
             lambda: all(calls.of(i, "success") for i in range(6)) and calls.of("boom", "error"), 10)
    assert [calls.of(i, "success")[0][0] for i in range(6)] == [0, 10, 20, 30, 40, 50]
    exc = calls.of("boom", "error")[0][0].exception  # billiard wraps it as Celery's Request expects
    assert isinstance(getattr(exc, "exc", exc), ZeroDivisionError)
    pids = [calls.of(i, "accept")[0][0] for i in [*range(6), "boom"]]
    assert len(set(pids)) == 7 and all(isinstance(pid, int) for pid in pids)
    for i in range(6):  # accepted before the result, exactly once each
        assert calls.kinds(i) == ["accept", "success"]


def test_tasks_run_with_the_pools_app_as_current_app_and_only_they_do(make_pool):
    """Every target sees the worker's app as ``current_app`` (not the process's default app); the
    shared cmwq thread gets its own current app back afterwards."""
    from celery import Celery, _state, current_app

    app = Celery("the-workers-app", set_as_current=False)
    pool, calls = make_pool(limit=1, app=app), Calls()
    try:
        pool.apply_async(lambda: (current_app._get_current_object(), threading.get_ident()),
                         **calls.callbacks("task"))
        wait_for("the task to report", lambda: calls.of("task", "success"), 10)
        seen, thread = calls.of("task", "success")[0][0]
        assert seen is app
        # a later work on the same thread, of a pool without an app, finds no app left behind
        bare, after = make_pool(limit=1), Calls()
        bare.apply_async(lambda: (getattr(_state._tls, "current_app", None), threading.get_ident()),
                         **after.callbacks("next"))
        wait_for("the next task to report", lambda: after.of("next", "success"), 10)
        left, next_thread = after.of("next", "success")[0][0]
        assert left is None or next_thread != thread, "the task's app stayed on its thread"
    finally:
        app.close()


class FakeRequest:
    """Stands for Celery's Request, which the pool finds as ``accept_callback.__self__``.
    ``revoked()`` answers ``answer`` and records that it was asked."""

    def __init__(self, calls: Calls, task_id: str, answer: bool, expires: Any = None,
                 stamped_headers: tuple[str, ...] = ()) -> None:
        self.id, self.answer, self.expires = task_id, answer, expires
        self.stamped_headers = list(stamped_headers)
        self.asked = 0
        self._accepted = calls.callbacks(task_id)["accept_callback"]

    def revoked(self) -> bool:
        self.asked += 1
        return self.answer

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        self._accepted(pid, time_accepted)


@pytest.fixture
def revoked_state():
    """Celery's worker state (revoked ids, revoked stamps), put back afterwards."""
    from celery.worker import state

    ids, stamps = set(state.revoked), dict(state.revoked_stamps)
    yield state
    state.revoked.clear()
    state.revoked.update(ids)
    state.revoked_stamps.clear()
    state.revoked_stamps.update(stamps)


@pytest.mark.parametrize("why", ["revoked", "expired", "revoked-stamp"])
def test_a_revoked_or_expired_task_is_refused_when_it_would_start(make_pool, revoked_state, why):
    """The worker thread finds it may be revoked; Celery's Request.revoked() decides and reports
    it (on the callbacks' thread); the target never runs and the job leaves the pool."""
    from datetime import datetime, timedelta, timezone

    pool, calls = make_pool(limit=1), Calls()
    a_second_ago = datetime.now(timezone.utc) - timedelta(seconds=1)
    request = FakeRequest(calls, f"task-{why}", answer=True,
                          expires=a_second_ago if why == "expired" else None,
                          stamped_headers=("mystamp",) if why == "revoked-stamp" else ())
    if why == "revoked":
        revoked_state.revoked.add(request.id)
    elif why == "revoked-stamp":
        revoked_state.revoked_stamps["mystamp"] = ["v1"]
    ran = threading.Event()
    callbacks = calls.callbacks(request.id)
    callbacks["accept_callback"] = request.on_accepted
    pool.apply_async(ran.set, **callbacks)
    wait_for("the job to be refused", lambda: request.asked and not pool._jobs, 10)
    pool.apply_async(lambda: "next", **calls.callbacks("next"))  # the pool goes on
    wait_for("the next job", lambda: calls.of("next", "success"), 10)
    assert not ran.is_set() and request.asked == 1 and calls.kinds(request.id) == []


def test_a_task_celery_does_not_refuse_after_all_runs_once(make_pool, revoked_state):
    """A revoked stamp name with other values: the pool asks, Celery says no, the job runs (once,
    without asking again); a task that cannot be revoked is never asked about."""
    pool, calls = make_pool(limit=1), Calls()
    revoked_state.revoked_stamps["mystamp"] = ["other-value"]
    asked = FakeRequest(calls, "stamped", answer=False, stamped_headers=("mystamp",))
    plain = FakeRequest(calls, "plain", answer=False)
    for request in (asked, plain):
        callbacks = calls.callbacks(request.id)
        callbacks["accept_callback"] = request.on_accepted
        pool.apply_async(lambda tag=request.id: tag, **callbacks)
    wait_for("both jobs", lambda: calls.of("stamped", "success") and calls.of("plain", "success"), 10)
    assert calls.kinds("stamped") == ["accept", "success"] and asked.asked == 1
    assert calls.kinds("plain") == ["accept", "success"] and plain.asked == 0


def test_concurrency_counts_running_tasks_and_follows_grow_and_shrink(make_pool):
    """-c bounds the tasks running at once (a plain wait counts as running); a task waiting inside
    blocking() hands its slot on, and in flight stay within the window (4 x the limit).

    Each batch's tasks wait on a gate until as many as the bound allows are in; the gate opens
    only then, so no task finishes before the last one the bound admits has started, however slow
    the machine. Meanwhile no further task may start."""
    pool, calls = make_pool(limit=2), Calls()
    lock = threading.Lock()
    now = [0]
    peaks: list[int] = []
    gate = threading.Event()

    def task(annotated: bool) -> None:
        with lock:
            now[0] += 1
            peaks.append(now[0])
        if annotated:
            with cmwq_exec.blocking():
                gate.wait(30)
        else:
            gate.wait(30)
        with lock:
            now[0] -= 1

    def batch(first: int, n: int, annotated: bool, bound: int) -> int:
        peaks.clear()
        gate.clear()
        for i in range(first, first + n):
            pool.apply_async(task, (annotated,), **calls.callbacks(i))
        try:
            wait_for(f"{bound} of tasks {first}..{first + n - 1} in", lambda: now[0] == bound, 20)
        except AssertionError as exc:  # say where the missing tasks are
            info, wq = pool.info, pool._wq
            counts = {k: info[k] for k in ("running", "queued", "max-running", "max-in-flight")}
            raise AssertionError(
                f"{exc}: {now[0]} in; pool {counts}; workqueue active={wq._nr_active} "
                f"sleeping={wq._nr_sleeping} inactive={len(wq._inactive)} {info['workqueue']}; "
                f"pools {info['pools']}") from None
        time.sleep(0.1)  # room for a task past the bound to start (none may)
        gate.set()
        wait_for(f"tasks {first}..{first + n - 1}",
                 lambda: all(calls.of(i, "success") for i in range(first, first + n)), 20)
        return max(peaks)

    assert batch(0, 10, annotated=False, bound=2) == 2
    assert batch(10, 12, annotated=True, bound=8) == 8
    pool.grow(3)
    assert pool.num_processes == 5 and pool.info["max-concurrency"] == 5
    assert batch(100, 20, annotated=False, bound=5) == 5
    assert batch(200, 25, annotated=True, bound=20) == 20
    pool.shrink(4)
    assert pool.num_processes == 1
    assert batch(300, 6, annotated=False, bound=1) == 1
    assert batch(400, 6, annotated=True, bound=4) == 4
    with pytest.raises(ValueError, match="cannot shrink"):
        pool.shrink(2)


def test_a_zero_limit_holds_tasks_until_the_pool_grows(make_pool):
    pool, calls = make_pool(limit=0), Calls()
    pool.apply_async(lambda: "ran", **calls.callbacks("held"))
    time.sleep(0.1)  # give it every chance to run wrongly; the state we wait for is "nothing"
    assert calls.of("held") == [] and pool.info["held"] == 1
    pool.grow(1)
    wait_for("the held task to run after grow", lambda: calls.of("held", "success"), 5)


def test_soft_limit_raises_inside_the_task(make_pool):
    pool, calls = make_pool(), Calls()

    def polite() -> str:
        try:
            while True:
                time.sleep(0.005)
        except SoftTimeLimitExceeded:
            return "caught"

    pool.apply_async(polite, soft_timeout=0.1, **calls.callbacks("soft"))
    wait_for("the task to catch its soft limit", lambda: calls.of("soft", "success"), 10)
    assert calls.of("soft", "timeout") == [(True, 0.1)]
    assert calls.of("soft", "success") == [("caught",)]


# The unwinding is checked through the pool (a job leaves it when its thread returns), not the task's
# own ``finally``: CPython 3.13 may skip the handlers of the frame an async exception lands in while it
# spins in a tight loop (python/cpython#139622); the exception then surfaces in the caller.


def left_the_pool(pool: TaskPool) -> bool:
    return not pool._jobs


def test_hard_limit_reports_at_once_and_unwinds_the_thread(make_pool):
    pool, calls = make_pool(limit=1), Calls()

    def runaway() -> None:
        while True:
            pass

    pool.apply_async(runaway, timeout=0.2, **calls.callbacks("hard"))
    wait_for("the hard limit", lambda: calls.of("hard", "timeout"), 10)
    assert calls.of("hard", "timeout") == [(False, 0.2)]
    wait_for("the runaway thread to unwind", lambda: left_the_pool(pool), 5)
    pool.apply_async(lambda: "next", **calls.callbacks("next"))
    wait_for("the next task", lambda: calls.of("next", "success"), 5)
    assert calls.kinds("hard") == ["accept", "timeout"]  # never a second, late report
    wait_for("the slot to be settled",
             lambda: not pool._job_limits.abandoned and (pool._wq.max_running, pool._wq.max_active) == (1, 4),
             5)


def test_a_task_that_ignores_its_hard_limit_is_abandoned_not_counted(make_pool):
    pool, calls = make_pool(limit=1), Calls()
    release = threading.Event()
    swallowed = []

    def stubborn() -> str:
        while not release.is_set():
            try:
                with cmwq_exec.blocking():
                    time.sleep(0.005)
            except BaseException as exc:  # noqa: BLE001 - the point of the test
                swallowed.append(exc)
        return "late"

    pool.apply_async(stubborn, timeout=0.1, **calls.callbacks("stubborn"))
    wait_for("the hard limit", lambda: calls.of("stubborn", "timeout"), 10)
    wait_for("the task to swallow the unwind", lambda: swallowed, 5)
    # its slot is given back: with limit 1 another task runs while it still runs
    pool.apply_async(lambda: "other", **calls.callbacks("other"))
    wait_for("another task to run beside the abandoned one", lambda: calls.of("other", "success"), 5)
    info = pool.info
    assert info["abandoned"] == 1 and info["running"] == 0 and info["max-concurrency"] == 1
    release.set()
    wait_for("the abandoned task to end", lambda: pool.info["abandoned"] == 0, 5)
    assert calls.kinds("stubborn") == ["accept", "timeout"]  # "late" is discarded
    assert (pool._wq.max_running, pool._wq.max_active) == (1, 4)


def test_terminate_job_unwinds_only_that_task(make_pool):
    pool, calls = make_pool(limit=3), Calls()
    stop = threading.Event()

    def long(name: str) -> str:
        while not stop.is_set():
            with cmwq_exec.blocking():
                time.sleep(0.005)
        return name

    pool.apply_async(long, ("victim",), **calls.callbacks("victim"))
    pool.apply_async(long, ("survivor",), **calls.callbacks("survivor"))
    wait_for("both to start", lambda: calls.of("victim", "accept") and calls.of("survivor", "accept"), 5)
    victim, survivor = calls.of("victim", "accept")[0][0], calls.of("survivor", "accept")[0][0]
    pool.terminate_job(victim, 15)
    wait_for("the victim to unwind", lambda: victim not in pool._jobs, 5)
    assert survivor in pool._jobs and pool.info["running"] == 1
    stop.set()
    wait_for("the survivor to finish", lambda: calls.of("survivor", "success"), 5)
    assert calls.kinds("victim") == ["accept"]  # Celery reports the revoke itself


def test_terminate_with_sigusr1_raises_the_soft_limit_as_prefork_does(make_pool):
    pool, calls = make_pool(limit=1), Calls()

    def polite() -> str:
        try:
            while True:
                with cmwq_exec.blocking():
                    time.sleep(0.005)
        except SoftTimeLimitExceeded:
            return "cleaned up"

    pool.apply_async(polite, **calls.callbacks("usr1"))
    wait_for("the task to start", lambda: calls.of("usr1", "accept"), 5)
    pool.terminate_job(calls.of("usr1", "accept")[0][0], signal.SIGUSR1)
    wait_for("the task to catch it and return", lambda: calls.of("usr1", "success"), 5)
    assert calls.of("usr1", "success") == [("cleaned up",)]


def test_terminate_before_start_runs_nothing(make_pool):
    pool, calls = make_pool(limit=1), Calls()
    gate = threading.Event()
    ran = []
    pool.apply_async(lambda: gate.wait(5), **calls.callbacks("first"))
    job = pool.apply_async(lambda: ran.append(1), **calls.callbacks("queued"))
    job.terminate(15)  # Request.terminate on a task not yet started
    gate.set()
    wait_for("the revoked task to report accepted", lambda: calls.of("queued", "accept"), 5)
    wait_for("the pool to settle", lambda: pool.info["running"] == 0, 5)
    assert ran == [] and calls.kinds("queued") == ["accept"]


def test_warm_stop_finishes_running_tasks_and_never_starts_queued_ones(make_pool):
    pool, calls = make_pool(limit=1), Calls()

    def work(name: str) -> str:
        time.sleep(0.2)  # not inside blocking(): it keeps its slot, so the others stay queued
        return name

    for name in ("running", "queued1", "queued2"):
        pool.apply_async(work, (name,), **calls.callbacks(name))
    wait_for("the first task to start", lambda: calls.of("running", "accept"), 5)
    pool.stop()
    assert calls.of("running", "success") == [("running",)]
    assert calls.of("queued1") == [] and calls.of("queued2") == []


@pytest.mark.parametrize("how", ["terminate", "stop-in-cold-shutdown"])
def test_cold_shutdown_unwinds_running_tasks(make_pool, monkeypatch, how):
    """pool.terminate() unwinds the running tasks. So does pool.stop() once Celery has begun a cold
    shutdown: Celery cancels the requests it knows, sets should_terminate, then calls pool.stop(),
    and a task it did not know about yet must not make that stop wait."""
    from celery.worker import state

    pool, calls = make_pool(limit=2), Calls()

    def forever() -> None:
        while True:
            with cmwq_exec.blocking():
                time.sleep(0.005)

    pool.apply_async(forever, **calls.callbacks("forever"))
    wait_for("the task to start", lambda: calls.of("forever", "accept"), 5)
    if how == "terminate":
        pool.terminate()
    else:
        monkeypatch.setattr(state, "should_terminate", 1)
        started = time.monotonic()
        pool.stop()
        assert time.monotonic() - started < 2, "stop() waited for a task during a cold shutdown"
    wait_for("the running task to unwind", lambda: left_the_pool(pool), 5)
    assert calls.kinds("forever") == ["accept"]


def test_bad_input_gets_a_clear_error(monkeypatch):
    with pytest.raises(ImproperlyConfigured, match=r"concurrency .* must be a non-negative integer"):
        TaskPool(limit="eight")
    with pytest.raises(ImproperlyConfigured, match="got 2.5"):
        TaskPool(limit=2.5)
    with pytest.raises(ValueError, match="time limit must be a finite number of seconds"):
        TaskPool(limit=1, timeout="soon")
    for endless in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="time limit must be a finite number of seconds"):
            TaskPool(limit=1, timeout=endless)
    pool = TaskPool(limit=1)
    with pytest.raises(ImproperlyConfigured, match="pool_grow n"):
        pool.grow(-1)
    monkeypatch.setenv("CMWQ_METRICS_PORT", "http")
    with pytest.raises(ImproperlyConfigured, match="CMWQ_METRICS_PORT must be a TCP port"):
        TaskPool(limit=1).start()


def test_worker_default_limits_apply_when_the_task_has_none(make_pool):
    pool, calls = make_pool(limit=1, soft_timeout=0.1, timeout=5.0), Calls()

    def polite() -> str:
        try:
            while True:
                time.sleep(0.005)
        except SoftTimeLimitExceeded:
            return "caught"

    pool.apply_async(polite, **calls.callbacks("t"))
    wait_for("the default soft limit", lambda: calls.of("t", "success"), 10)
    assert pool.info["timeouts"] == [0.1, 5.0]


@pytest.mark.skipif(lockdep.ENABLED, reason="debug mode: CheckedLock.__enter__ is a Python function, "
                    "so an exception injected as it returns keeps the lock (plain locks' is C)")
@pytest.mark.parametrize("naps", [0, 3], ids=["spinning", "napping"])
def test_injected_exceptions_never_escape_into_the_worker(make_pool, caplog, naps):
    """Limits that race the end of their task: every job reports exactly once, no exception
    reaches the cmwq worker loop, and the pool ends clean. "napping" tasks also sleep inside
    blocking() between spins, so limits land in the middle of a running slot being handed to a
    waiting task and taken back (max_running): the workqueue's counts must still end at zero."""
    pool, calls = make_pool(limit=4), Calls()
    rng = random.Random(5)
    caplog.set_level(logging.ERROR, logger="cmwq_exec")

    def brief(spin: float) -> str:
        for _ in range(naps + 1):
            end = time.perf_counter() + spin / (naps + 1)
            while time.perf_counter() < end:
                pass
            if naps:
                with cmwq_exec.blocking():
                    time.sleep(spin / (naps + 1))
        return "ok"

    n = 300
    for i in range(n):
        spin = rng.uniform(0.0, 0.004)
        pool.apply_async(brief, (spin,), soft_timeout=rng.choice([None, 0.001, 0.002]),
                         timeout=rng.choice([None, 0.002, 0.003]), **calls.callbacks(i))
    terminal = {"success", "error"}

    def reported(i: int) -> bool:
        kinds = calls.kinds(i)
        return bool(terminal & set(kinds)) or ("timeout", (False,)) in [
            (k, args[:1]) for k, t, args in calls.events if t == i]

    wait_for("every job to report", lambda: all(reported(i) for i in range(n)), 30)
    for i in range(n):
        finals = [args for kind, tag, args in calls.events
                  if tag == i and (kind in terminal or (kind == "timeout" and args[0] is False))]
        assert len(finals) == 1, (i, calls.kinds(i))
    wait_for("the pool to settle", lambda: not pool._jobs and pool._job_limits.abandoned == 0, 10)
    assert (pool._wq.max_running, pool._wq.max_active) == (4, 16)
    wq = pool._wq
    wait_for("the workqueue's counts to settle at zero",
             lambda: (wq._nr_active, wq._nr_sleeping, len(wq._inactive)) == (0, 0, 0), 10)
    assert not [r for r in caplog.records if "raised" in r.getMessage()], caplog.text
    pool.apply_async(lambda: "still fine", **calls.callbacks("after"))
    wait_for("a task after the storm", lambda: calls.of("after", "success"), 5)


def test_no_task_starts_once_celery_is_told_to_shut_down(make_pool, monkeypatch):
    """Celery's warm-shutdown handler sets should_stop at once; the pool is closed only when the
    event loop ends. Tasks that had not started by then never do (and report nothing: unacked)."""
    from celery.worker import state

    pool, calls = make_pool(limit=1), Calls()
    release = threading.Event()
    pool.apply_async(release.wait, (10,), **calls.callbacks("running"))
    wait_for("the first task to start", lambda: calls.of("running", "accept"), 5)
    pool.apply_async(lambda: "late", **calls.callbacks("queued"))
    monkeypatch.setattr(state, "should_stop", 0)
    release.set()
    wait_for("the running task to finish", lambda: calls.of("running", "success"), 5)
    wait_for("the queued job to be dropped", lambda: not pool._jobs, 5)
    assert calls.of("queued") == []


class ListedRequest:
    """What the pool uses of Celery's Request: revoked(), info(), and the fields may_be_revoked reads."""

    name, expires, stamped_headers = "t.fake", None, ()

    def __init__(self, task_id: str) -> None:
        self.id = task_id

    def revoked(self) -> bool:
        return False

    def info(self, safe: bool = False) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}

    def on_accepted(self, *args: Any) -> None:
        pass


def test_an_abandoned_task_is_listed_logged_and_measured(make_pool, caplog):
    from prometheus_client import CollectorRegistry, generate_latest

    from cmwq_exec.metrics import TaskPoolCollector

    pool, release = make_pool(limit=1), threading.Event()
    registry = CollectorRegistry()
    registry.register(TaskPoolCollector(pool._task_counts))
    caplog.set_level(logging.WARNING, logger="cmwq_exec.celery")

    def stubborn() -> str:
        while not release.is_set():
            try:
                time.sleep(0.005)
            except BaseException:  # noqa: BLE001 - the point of the test
                pass
        return "late"

    request = ListedRequest("abc")
    pool.apply_async(stubborn, accept_callback=request.on_accepted, timeout=0.1)
    wait_for("the task to be abandoned", lambda: pool.abandoned_active(), 10)
    [entry] = pool.abandoned_active()
    assert entry["id"] == "abc" and entry["abandoned"] == "hard", entry
    assert "test_pool_unit.py:" in entry["abandoned_at"], entry
    assert b"cmwq_celery_tasks_abandoned 1.0" in generate_latest(registry)
    wait_for("the log line", lambda: "survived its unwind" in caplog.text, 10)
    assert "t.fake[abc]" in caplog.text and "test_pool_unit.py:" in caplog.text, caplog.text
    release.set()
    wait_for("the thread to return", lambda: not (pool.abandoned_active() or pool._job_limits.abandoned), 5)
    assert b"cmwq_celery_tasks_abandoned 0.0" in generate_latest(registry)


@pytest.mark.parametrize("value", ["-1", "65536", "abc", "80.5"])
def test_a_bad_metrics_port_names_the_variable_and_the_range(make_pool, monkeypatch, value):
    monkeypatch.setenv("CMWQ_METRICS_PORT", value)
    with pytest.raises(ImproperlyConfigured, match=r"CMWQ_METRICS_PORT must be a TCP port number from 0 to "
                                                   r"65535 .*got '" + value.replace(".", r"\.")):
        make_pool(limit=1)


def test_the_setting_selects_the_supervising_pool(monkeypatch):
    """``worker_pool = "cmwq_exec.celery:TaskPool"`` stays the one entry point: with cmwq_processes
    the pool Celery makes is the supervisor (no workqueue, no task), without it the task pool."""
    from celery import Celery

    from cmwq_exec.celery import SupervisorPool

    monkeypatch.delenv("CMWQ_PROCESSES", raising=False)
    app = Celery("select", set_as_current=False)
    app.conf.cmwq_processes = 2
    pool = TaskPool(limit=3, app=app)
    assert type(pool) is SupervisorPool and pool.processes == 2 and pool.num_processes == 3
    with pytest.raises(RuntimeError, match="runs no task"):
        pool.apply_async(lambda: None)
    app.conf.cmwq_processes = 0
    assert type(TaskPool(limit=3, app=app)) is TaskPool


@pytest.mark.skipif(sys.version_info[:2] == (3, 11), reason=(
    "CPython 3.11 spins at the nested close when the harness raises from its profile function at "
    "some of these call returns (an artefact of injecting through sys.setprofile, seen on 3.11 only; "
    "3.10, 3.12 and 3.13 run the test)"))
def test_an_exception_at_every_call_return_of_the_window_close_is_absorbed(make_pool, caplog):
    """The pool closes a task's injection window with injection.INJECTIONS + 1 nested closes: an
    exception injected before the close that lands in it, at any call return, is caught by the
    next level. The task reports its own outcome exactly once and nothing reaches the worker."""
    import os

    from async_inject_blocking import install

    from cmwq_exec import celery_jobs

    pool, calls = make_pool(limit=1), Calls()
    caplog.set_level(logging.ERROR, logger="cmwq_exec")
    within = os.path.dirname(cmwq_exec.__file__) + os.sep
    injections = {}
    for k in range(1, 200):
        def task(k: int = k) -> int:
            injections[k] = install(k, celery_jobs.close_window_surely, within=within,
                                    besides=(lockdep.__file__,))
            return k

        pool.apply_async(task, **calls.callbacks(k))
        wait_for(f"job {k} to report", lambda k=k: calls.of(k, "success") or calls.of(k, "error"), 10)
        assert calls.kinds(k) == ["accept", "success"] and calls.of(k, "success") == [(k,)], \
            (injections[k].where, calls.kinds(k), calls.of(k))
        if not injections[k].fired:
            break
    else:
        pytest.fail("more than 200 call returns in the window's close")
    assert k > 3, "the close was not gone through"
    wait_for("the pool to settle", lambda: not pool._jobs, 5)
    assert not [r for r in caplog.records if "escaped" in r.getMessage()], caplog.text


def test_a_cold_shutdown_signal_inside_a_critical_section_does_not_deadlock():
    """Celery's cold-shutdown handler (on_cold_shutdown) stops the pool from inside the signal
    handler, on the event loop's thread, wherever the signal caught it: here inside on_apply's
    critical section (the pool's lock held). The handler must not take that lock (it deadlocked:
    the worker hung in its cold shutdown); the pool terminates when Celery's loop terminates it
    next, and a job running then is unwound. A subprocess, so a deadlock ends in its timeout."""
    script = textwrap.dedent("""
        import os, signal, threading, time
        from celery.utils.log import in_sighandler
        from celery.worker import state
        from cmwq_exec.celery import TaskPool

        pool = TaskPool(limit=2)
        pool.start()
        started, ended = threading.Event(), []

        def task():
            started.set()
            try:
                for _ in range(3000):
                    time.sleep(0.01)  # an asynchronous exception lands between two sleeps
            except BaseException as exc:
                ended.append(type(exc).__name__)
                raise

        pool.apply_async(task)
        assert started.wait(10)

        def cold_shutdown(*_):
            with in_sighandler():
                state.should_terminate = True
                pool.stop()

        signal.signal(signal.SIGUSR1, cold_shutdown)
        with pool._lock:
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(10):  # the handler runs here, at a bytecode boundary
                pass
        print("handler returned", flush=True)
        pool.terminate()  # what Celery's event loop does once it sees should_terminate
        deadline = time.monotonic() + 20
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        print("unwound:", ended, flush=True)
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"deadlocked in the signal handler: {exc.stdout!r}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["handler returned", "unwound: ['Unwind']"], proc.stdout


def test_a_shutdown_signal_wakes_the_event_loop_at_once(make_pool):
    """Celery's SIGTERM handler only sets should_stop (sending worker_shutting_down first); an idle
    loop asleep in poll would see it only at its next timer (seconds: an idle worker's SIGTERM took
    up to 8 s). The pool pokes the loop's wakeup pipe on that signal, and stops once it is shut."""
    import os

    from celery import signals

    class Hub:
        def __init__(self) -> None:
            self.readers: dict[int, Any] = {}

        def add_reader(self, fd: int, callback: Any) -> None:
            self.readers[fd] = callback

    pool = make_pool(limit=1)
    hub = Hub()
    pool.register_with_event_loop(hub)
    (fd,) = hub.readers
    hub.readers[fd]()  # the loop drains what registering queued

    def poked() -> bool:
        try:
            return bool(os.read(fd, 4096))
        except BlockingIOError:
            return False

    assert not poked()
    signals.worker_shutting_down.send(sender="w@h", sig="SIGTERM", how="Warm", exitcode=0)
    assert poked(), "the loop was not woken by the shutdown signal"
    pool.stop()
    poked()  # the stop pokes the loop itself (_shutdown)
    signals.worker_shutting_down.send(sender="w@h", sig="SIGTERM", how="Warm", exitcode=0)
    assert not poked(), "a stopped pool still listens to the shutdown signal"


def test_with_detection_an_unannotated_wait_in_a_task_is_a_sleep(make_pool):
    """With blocking detection on (CMWQ_DETECT_BLOCKING=1), a task's own wait that it does not
    wrap in blocking() tells the pool its worker sleeps, as the same wait in an executor's work
    does: the walk out from the wait stops at the pool's call of the task, a user call site."""
    from helpers import sleeps_as_its_worker_sees

    pool, calls = make_pool(limit=2), Calls()
    cmwq_exec.detect_blocking()
    try:
        pool.apply_async(sleeps_as_its_worker_sees, **calls.callbacks("sleeper"))
        wait_for("the task to end", lambda: {"success", "error"} & set(calls.kinds("sleeper")), 10)
    finally:
        cmwq_exec.undetect_blocking()
    assert calls.of("sleeper", "success") == [(True,)], calls.of("sleeper")
