"""The pool treats every task as prefork does: checked against real brokers.

Each behaviour a worker applies to a task (which app runs it, expiry, revocation, ...) gets a test
here that runs it on this pool and checks the outcome prefork gives.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from app import POOL, make_app, process_init_key, revoked_key, signals_key
from celery import Celery, _state
from celery.exceptions import TaskRevokedError, TimeLimitExceeded
from celery_harness import wait_for
from kombu.exceptions import ChannelError

pytestmark = [pytest.mark.celery, pytest.mark.slow, pytest.mark.timeout(120)]


def test_tasks_run_with_the_workers_app_not_the_default_one(broker, queue, results_redis):
    """Two apps in one process: the worker's app is not the default app (a second embedded
    worker, a Django project's other app). Its tasks are found in its own registry and see it as
    ``current_app``, as in prefork's children."""
    import celery.contrib.testing.tasks  # noqa: F401 - registers celery.ping for the ping check
    from celery.contrib.testing.worker import start_worker

    worker_app = make_app(broker, queue=queue)
    other = Celery("other", set_as_current=False)
    previous_default = _state.default_app
    root_level = logging.getLogger().level  # the embedded worker sets the root logger's level
    try:
        with start_worker(worker_app, pool=POOL, concurrency=2, perform_ping_check=False,
                          shutdown_timeout=30):
            other.set_default()  # from now on a thread without a current app gets ``other``
            t = worker_app.tasks
            assert "t.add" not in other.tasks
            assert t["t.add"].delay(2, 3).get(timeout=20) == 5
            assert t["t.current_app"].delay().get(timeout=20) == worker_app.main
            # a retry is sent and run through the worker's app too
            assert t["t.class_autoretry"].delay().get(timeout=20) == 1
    finally:
        logging.getLogger().setLevel(root_level)
        _state.default_app = previous_default
        other.close()
        worker_app.close()


# -- expiry and revocation of a task the pool holds ----------------------------------------------
#
# -c 1 and tasks that sleep without saying so (t.sleep_raw): one runs at a time and the others wait
# inside the pool (its workqueue admits the prefetch window, 4 x 1). prefork would hand the waiting
# one over only when a process is free and Celery would refuse it then: REVOKED in the backend, the
# task_revoked signal, the message acked. t.record is acks_late, t.record_early is not.

ACKS = pytest.mark.parametrize("task", ["t.record", "t.record_early"], ids=["acks_late", "acks_early"])


def revoked_signals(results_redis: Any, task_id: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in results_redis.lrange(revoked_key(task_id), 0, -1)]


def reserved_ids(app: Celery, worker: Any) -> set[str]:
    """Tasks the worker received and handed to its pool but did not start."""
    reply = app.control.inspect([worker.name], timeout=1.0).reserved() or {}
    return {request["id"] for request in reply.get(worker.name, [])}


def assert_acked(app: Celery, worker: Any, queue: str) -> None:
    """After a warm shutdown every unacked message is back in the queue (RabbitMQ requeues on
    close, kombu's Redis transport restores them): none there means all were acked."""
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(30) == 0, worker.tail()
    with app.connection_for_write() as conn:
        try:
            ready = conn.default_channel.queue_declare(queue, passive=True).message_count
        except ChannelError:  # kombu's Redis transport: a queue exists while it holds messages
            ready = 0
    assert ready == 0, f"{ready} messages went back to the queue: the refused task was not acked"


def ran(results_redis: Any, key: str, token: str) -> bool:
    return bool(results_redis.sismember(key, token) or results_redis.sismember(key + ":started", token))


@ACKS
def test_a_task_that_expires_while_the_pool_holds_it_is_revoked(celery_app, start_worker, results_redis,
                                                                 key, queue, task):
    worker = start_worker(concurrency=1, via="setting")
    t = celery_app.tasks
    blockers = [t["t.sleep_raw"].delay(1.5, i) for i in range(3)]
    sent = time.monotonic()
    r = t[task].apply_async((key, "late"), expires=2)
    wait_for("the worker to hold the task", lambda: r.id in reserved_ids(celery_app, worker), 10)
    assert time.monotonic() - sent < 2, "it arrived expired: Celery refused it, not the pool"

    with pytest.raises(TaskRevokedError, match="expired"):
        r.get(timeout=20)
    assert r.state == "REVOKED"
    assert [b.get(timeout=20) for b in blockers] == [0, 1, 2]
    assert not ran(results_redis, key, "late")
    # the signal comes after the state is stored
    wait_for(f"the task_revoked signal\n{worker.tail()}", lambda: revoked_signals(results_redis, r.id), 10)
    assert revoked_signals(results_redis, r.id) == [{"terminated": False, "expired": True, "signum": None}]
    assert_acked(celery_app, worker, queue)


@ACKS
def test_a_task_revoked_while_the_pool_holds_it_is_revoked(celery_app, start_worker, results_redis, key,
                                                           queue, task):
    worker = start_worker(concurrency=1, via="custom")
    t = celery_app.tasks
    blocker = t["t.sleep_raw"].delay(2.0, "blocker")
    r = t[task].delay(key, "revoked")
    wait_for("the worker to hold the task", lambda: r.id in reserved_ids(celery_app, worker), 10)
    celery_app.control.revoke(r.id)  # no terminate: it is not running

    assert blocker.get(timeout=20) == "blocker"
    # The revoke command itself marks a task it does not see running REVOKED in the backend; only
    # the refusal at start sends the signal (and keeps it from running and overwriting that).
    wait_for(f"the task_revoked signal\n{worker.tail()}", lambda: revoked_signals(results_redis, r.id), 10)
    assert t["t.add"].delay(1, 1).get(timeout=10) == 2  # the pool goes on
    assert revoked_signals(results_redis, r.id) == [{"terminated": False, "expired": False, "signum": None}]
    assert r.state == "REVOKED" and not ran(results_redis, key, "revoked")
    assert_acked(celery_app, worker, queue)


def test_revoke_by_stamped_header_refuses_only_the_matching_held_task(celery_app, start_worker,
                                                                       results_redis, key, queue):
    """Two held tasks stamped ``batch``: revoking ``batch=b1`` refuses that one; the other, whose
    stamp has another value, still runs."""
    worker = start_worker(concurrency=1, via="setting")
    t = celery_app.tasks
    blocker = t["t.sleep_raw"].delay(2.0, "blocker")
    signatures = {batch: t["t.record"].s(key, batch) for batch in ("b1", "b2")}
    results = {}
    for batch, sig in signatures.items():
        sig.stamp(batch=batch)
        results[batch] = sig.apply_async()
    wait_for("the worker to hold both tasks",
             lambda: {r.id for r in results.values()} <= reserved_ids(celery_app, worker), 10)
    celery_app.control.revoke_by_stamped_headers({"batch": "b1"}, destination=[worker.name], reply=True)

    assert blocker.get(timeout=20) == "blocker"
    assert results["b2"].get(timeout=20) == "b2"
    with pytest.raises(TaskRevokedError):
        results["b1"].get(timeout=20)
    assert not ran(results_redis, key, "b1")
    wait_for("the task_revoked signal", lambda: revoked_signals(results_redis, results["b1"].id), 10)
    assert revoked_signals(results_redis, results["b1"].id) == [
        {"terminated": False, "expired": False, "signum": None}]
    assert revoked_signals(results_redis, results["b2"].id) == []
    assert_acked(celery_app, worker, queue)


def test_revoke_terminate_of_a_held_task_refuses_it_as_prefork_does(celery_app, start_worker,
                                                                     results_redis, key, queue):
    """revoke(terminate=True) of a task that has not started: nothing to terminate; prefork (its
    semaphore) refuses it when a process frees up, as revoked, not terminated."""
    worker = start_worker(concurrency=1, via="custom")
    t = celery_app.tasks
    blocker = t["t.sleep_raw"].delay(2.0, "blocker")
    r = t["t.record"].delay(key, "terminated")
    wait_for("the worker to hold the task", lambda: r.id in reserved_ids(celery_app, worker), 10)
    celery_app.control.revoke(r.id, terminate=True, signal="SIGKILL")

    assert blocker.get(timeout=20) == "blocker"
    wait_for(f"the task_revoked signal\n{worker.tail()}", lambda: revoked_signals(results_redis, r.id), 10)
    assert t["t.add"].delay(1, 1).get(timeout=10) == 2
    assert revoked_signals(results_redis, r.id) == [{"terminated": False, "expired": False, "signum": None}]
    assert r.state == "REVOKED" and not ran(results_redis, key, "terminated")
    assert_acked(celery_app, worker, queue)


# -- the rest of a task's treatment ----------------------------------------------------------------


def signals_of(results_redis: Any, task_id: str) -> list[str]:
    return [json.loads(item)["signal"] for item in results_redis.lrange(signals_key(task_id), 0, -1)]


def wait_signals(results_redis: Any, task_id: str, last: str, count: int = 1) -> list[str]:
    """The task's signals once ``last`` was sent ``count`` times (postrun comes after the state)."""
    return wait_for(f"{last} x{count} for {task_id}",
                    lambda: signals_of(results_redis, task_id).count(last) >= count
                    and signals_of(results_redis, task_id), 10)


def test_task_signals_retry_and_autoretry(celery_app, start_worker, results_redis, key):
    """The tracer runs as in prefork: the same signals in the same order for a success, a failure,
    retries by ``self.retry`` and by ``autoretry_for``, and retries running out."""
    start_worker(concurrency=2, via="setting")
    t = celery_app.tasks
    ok = t["t.add"].delay(1, 2)
    assert ok.get(timeout=20) == 3
    assert wait_signals(results_redis, ok.id, "postrun") == ["prerun", "success", "postrun"]

    failed = t["t.fail"].delay("boom")
    with pytest.raises(ValueError, match="boom"):
        failed.get(timeout=20)
    assert wait_signals(results_redis, failed.id, "postrun") == ["prerun", "failure", "postrun"]

    retried = t["t.retry_then"].delay(key + "r", 2)
    assert retried.get(timeout=20) == 3
    assert wait_signals(results_redis, retried.id, "postrun", 3) == [
        "prerun", "retry", "postrun"] * 2 + ["prerun", "success", "postrun"]

    auto = t["t.autoretry"].delay(key + "a", 2)
    assert auto.get(timeout=20) == 3
    assert wait_signals(results_redis, auto.id, "postrun", 3) == [
        "prerun", "retry", "postrun"] * 2 + ["prerun", "success", "postrun"]

    exhausted = t["t.autoretry"].delay(key + "x", 5)  # max_retries 2: the third failure is final
    with pytest.raises(ValueError, match="run 3"):
        exhausted.get(timeout=20)
    assert exhausted.state == "FAILURE"
    assert wait_signals(results_redis, exhausted.id, "postrun", 3) == [
        "prerun", "retry", "postrun"] * 2 + ["prerun", "failure", "postrun"]


def test_countdown_eta_chain_and_ignore_result(celery_app, start_worker, results_redis, key):
    start_worker(concurrency=2, via="custom")
    t = celery_app.tasks
    sent = time.time()
    later = t["t.add"].apply_async((1, 1), countdown=1.5)
    at = t["t.add"].apply_async((2, 2), eta=datetime.now(timezone.utc) + timedelta(seconds=1.5))
    assert (later.get(timeout=20), at.get(timeout=20)) == (2, 4)
    for r in (later, at):
        started = json.loads(results_redis.lrange(signals_key(r.id), 0, 0)[0])["time"]
        assert started >= sent + 1.5 - 0.05, f"{r.id} started {started - sent:.2f}s after it was sent"

    assert (t["t.add"].s(1, 1) | t["t.add"].s(2) | t["t.add"].s(3))().get(timeout=20) == 7

    ignored = t["t.no_result"].delay(key, "ignored")
    wait_for("the task to run", lambda: results_redis.sismember(key, "ignored"), 20)
    wait_signals(results_redis, ignored.id, "postrun")
    assert results_redis.get(f"celery-task-meta-{ignored.id}") is None
    assert ignored.state == "PENDING"  # nothing stored, as with every pool


def test_rate_limit_spaces_task_starts(celery_app, start_worker, results_redis, key):
    """rate_limit='4/s': the consumer's token bucket releases one task per 0.25 s; the pool runs
    each when released (it does not batch them).

    A start can come late (a busy machine) but never before its release: the last start is at
    least 1.25 s after the tasks were sent, and most gaps between starts are a release apart. A
    late first start alone shortens only the first gap (CI once saw starts at 0, 0.03, 0.28, 0.53,
    0.79, 1.04 s: the first task started ~0.2 s after its release, the others on time)."""
    start_worker(concurrency=4, via="setting")
    sent = time.time()
    results = [celery_app.tasks["t.rate_limited"].delay(key) for _ in range(6)]
    for r in results:
        r.get(timeout=20)
    times = sorted(float(x) for x in results_redis.lrange(key, 0, -1))
    assert len(times) == 6
    starts = [round(x - sent, 2) for x in times]
    assert times[-1] - sent >= 5 * 0.25 - 0.1, starts
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert sum(gap >= 0.15 for gap in gaps) >= 3, starts


def test_reject_requeue_and_acks_on_failure_or_timeout(celery_app, start_worker, results_redis, key):
    """``Reject(requeue=True)`` puts the message back and the task runs again; a hard time limit
    on an acks_late task with ``acks_on_failure_or_timeout=False`` requeues it too (prefork: the
    child is killed, the message rejected with requeue), and the second run succeeds."""
    start_worker(concurrency=2, via="setting")
    t = celery_app.tasks
    rejected = t["t.reject_once"].delay(key + "j")
    assert rejected.get(timeout=30) == 2
    assert int(results_redis.get(key + "j:deliveries")) == 2

    timed = t["t.timeout_once"].apply_async((key + "t",), time_limit=1)
    # FAILURE (TimeLimitExceeded) is stored first, then the second run's SUCCESS; read the backend
    # afresh each time (a result caches the first ready state it sees)
    wait_for("the requeued second run to succeed",
             lambda: celery_app.backend.get_task_meta(timed.id, cache=False)["status"] == "SUCCESS", 30)
    assert celery_app.backend.get_task_meta(timed.id, cache=False)["result"] == 2
    # The first run: prerun, then the timeout's task_failure (consumer thread), which comes before
    # the message is requeued and so before the second run's prerun. The first run's task_postrun
    # comes when its thread unwinds: the asynchronous exception lands when its sleep(0.02)
    # returns, which may be after the requeued second run started (and even after it ended).
    signals = wait_signals(results_redis, timed.id, "postrun", 2)
    expected = ["prerun", "failure", "postrun", "prerun", "success", "postrun"]
    assert sorted(signals) == sorted(expected), signals
    second = signals.index("prerun", 1)
    assert signals[0] == "prerun" and "failure" in signals[1:second], signals
    assert "postrun" in signals[signals.index("success"):], signals
    assert signals.index("success") > second, signals
    assert int(results_redis.get(key + "t:runs")) == 2


def test_worker_process_init_is_sent_once_by_the_process_that_runs_the_tasks(celery_app, start_worker,
                                                                              results_redis):
    """Per-process setup (``worker_process_init`` handlers) runs before tasks: prefork sends it in
    every child, solo once in its only process; this pool's process runs every task: once."""
    worker = start_worker(concurrency=2, via="setting")
    assert celery_app.tasks["t.add"].delay(1, 1).get(timeout=20) == 2
    pids = [int(pid) for pid in results_redis.lrange(process_init_key(worker.name), 0, -1)]
    assert pids == [worker.pid]


def test_acks_late_failure_and_timeout_are_acked_by_default(celery_app, start_worker, results_redis, key,
                                                            queue):
    """``acks_on_failure_or_timeout`` (default True): an acks_late task that fails, or passes its
    hard limit, is acked, not delivered again."""
    worker = start_worker(concurrency=2, via="custom")
    t = celery_app.tasks
    failed = t["t.fail_late"].delay(key + "f")
    timed = t["t.timeout_acked"].apply_async((key + "t",), time_limit=1)
    with pytest.raises(ValueError, match="late failure"):
        failed.get(timeout=20)
    with pytest.raises(TimeLimitExceeded):
        timed.get(timeout=20)
    assert t["t.add"].delay(1, 1).get(timeout=10) == 2
    assert_acked(celery_app, worker, queue)
    assert (int(results_redis.get(key + "f:runs")), int(results_redis.get(key + "t:runs"))) == (1, 1)
