"""The cmwq Dramatiq worker in one process, on a StubBroker: waiting messages overlap, time limits
and shutdown notifications raise in the message's thread through the injection window (and other
workers' threads keep Dramatiq's managers), the running bound and the prefetch, and bad arguments
(what a stop acks and requeues needs a broker that requeues: test_dramatiq_brokers.py)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import cmwq_exec


def compute_forever() -> None:
    """Pure Python until an exception is raised in here (a function of its own: CPython 3.12.1
    raises an asynchronous exception at a loop's backward jump past the enclosing ``try`` of the
    same frame)."""
    n = 0
    while True:
        n += 1


def test_waiting_messages_overlap(stub_broker: Any) -> None:
    """Twelve messages that each wait for all twelve to wait: a fixed pool of eight threads (Dramatiq's
    default) would break the barrier; here every waiting message gets a thread."""
    import dramatiq

    from cmwq_exec.dramatiq import Worker

    meeting = threading.Barrier(12, timeout=30)
    met: list[int] = []

    @dramatiq.actor(max_retries=0)
    def meet(i: int) -> None:
        with cmwq_exec.blocking():
            meeting.wait()
        met.append(i)

    worker = Worker(stub_broker, worker_timeout=100)
    worker.start()
    try:
        for i in range(12):
            meet.send(i)
        stub_broker.join(meet.queue_name, fail_fast=True)
        worker.join()
    finally:
        worker.stop()
    assert sorted(met) == list(range(12))
    assert worker.workers[0].stats()["links"] == 0  # the chain ended with the stop


def test_time_limit_raises_in_the_message_and_the_worker_goes_on(stub_broker: Any) -> None:
    """A message past its time_limit gets TimeLimitExceeded (raised by the cmwq timer into its
    window); it is nacked as a failure, and the next message runs on the same worker."""
    import dramatiq
    from dramatiq.middleware import TimeLimitExceeded

    from cmwq_exec.dramatiq import Worker

    seen: list[str] = []

    @dramatiq.actor(time_limit=100, max_retries=0)
    def spin() -> None:
        try:
            compute_forever()
        except TimeLimitExceeded:
            seen.append("limit")
            raise

    @dramatiq.actor(max_retries=0)
    def after() -> None:
        seen.append("after")

    worker = Worker(stub_broker, worker_timeout=100)
    worker.start()
    try:
        spin.send()
        stub_broker.join(spin.queue_name, fail_fast=False)
        after.send()
        stub_broker.join(after.queue_name, fail_fast=False)
        worker.join()
    finally:
        worker.stop()
    assert seen == ["limit", "after"]
    assert len(stub_broker.dead_letters) == 1  # the spinning one, rejected


def test_a_stock_worker_on_the_same_broker_keeps_dramatiqs_time_limits(stub_broker: Any) -> None:
    """The managers this worker puts in TimeLimit hand threads that are not its own to Dramatiq's:
    after a cmwq worker ran on the broker, a stock worker's messages are still limited."""
    import dramatiq
    import dramatiq.worker
    from dramatiq.middleware import TimeLimitExceeded

    from cmwq_exec.dramatiq import Worker

    caught: list[str] = []

    @dramatiq.actor(time_limit=100, max_retries=0)
    def spin() -> None:
        try:
            compute_forever()
        except TimeLimitExceeded:
            caught.append(threading.current_thread().name)
            raise

    cmwq_worker = Worker(stub_broker, worker_timeout=100)
    cmwq_worker.start()
    cmwq_worker.stop()
    stock = dramatiq.worker.Worker(stub_broker, worker_timeout=100, worker_threads=1)
    stock.start()
    try:
        spin.send()
        stub_broker.join(spin.queue_name, fail_fast=False)
        stock.join()
    finally:
        stock.stop()
    assert len(caught) == 1


def test_stop_sends_shutdown_to_messages_that_asked(stub_broker: Any) -> None:
    """With ShutdownNotifications, stop() raises Shutdown in a running message that asked for it
    (notify_shutdown=True), through its window; the message ends and the stop completes."""
    import dramatiq
    from dramatiq.middleware import Shutdown, ShutdownNotifications

    from cmwq_exec.dramatiq import Worker

    stub_broker.add_middleware(ShutdownNotifications())
    started, outcome = threading.Event(), []

    @dramatiq.actor(notify_shutdown=True, max_retries=0)
    def long_running() -> None:
        started.set()
        try:
            while True:
                with cmwq_exec.blocking():
                    threading.Event().wait(0.01)
        except Shutdown:
            outcome.append("shutdown")
            raise

    worker = Worker(stub_broker, worker_timeout=100)
    worker.start()
    long_running.send()
    assert started.wait(30)
    worker.stop(timeout=30_000)
    assert outcome == ["shutdown"]


def test_worker_threads_is_the_running_bound(stub_broker: Any) -> None:
    """worker_threads is max_running of the workqueue and sets the prefetch as Dramatiq does; left
    out, there is no bound and the prefetch is DEFAULT_PREFETCH."""
    from cmwq_exec.dramatiq import DEFAULT_PREFETCH, Worker

    bounded = Worker(stub_broker, worker_threads=3)
    assert bounded.queue_prefetch == 6
    bounded.start()
    try:
        assert bounded.stats()["max-running"] == 3
        assert bounded.stats()["workqueue"]["workqueue"] == "dramatiq"
    finally:
        bounded.stop()
    free = Worker(stub_broker)
    assert free.queue_prefetch == DEFAULT_PREFETCH
    assert Worker(stub_broker, prefetch=5).queue_prefetch == 5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"worker_threads": 0}, "worker_threads must be None or a positive integer, got 0"),
    ({"worker_threads": True}, "worker_threads must be None or a positive integer, got True"),
    ({"prefetch": -1}, "prefetch must be None or a positive integer, got -1"),
    ({"worker_timeout": 0}, "worker_timeout must be a positive number of milliseconds, got 0"),
])
def test_bad_arguments_are_refused(stub_broker: Any, kwargs: dict[str, Any], message: str) -> None:
    from cmwq_exec.dramatiq import Worker

    with pytest.raises(ValueError, match=message):
        Worker(stub_broker, **kwargs)


def test_with_detection_an_unannotated_wait_in_a_message_is_a_sleep(stub_broker: Any) -> None:
    """With blocking detection on (CMWQ_DETECT_BLOCKING=1), a message's own wait that it does not
    wrap in blocking() tells the pool its worker sleeps: the chain's run of a message is a user
    call site of cmwq_exec.detect."""
    import dramatiq
    from helpers import sleeps_as_its_worker_sees

    from cmwq_exec.dramatiq import Worker

    seen: list[bool] = []

    @dramatiq.actor(max_retries=0)
    def sleeper() -> None:
        seen.append(sleeps_as_its_worker_sees())

    cmwq_exec.detect_blocking()
    worker = Worker(stub_broker, worker_timeout=100)
    worker.start()
    try:
        sleeper.send()
        stub_broker.join(sleeper.queue_name, fail_fast=True)
        worker.join()
    finally:
        worker.stop()
        cmwq_exec.undetect_blocking()
    assert seen == [True]
