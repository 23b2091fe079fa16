"""cmwq_exec.huey.Consumer in one process, on MemoryHuey: tasks that wait overlap, a limit bounds
the running ones, timeouts and interrupts reach a task's thread, shutdown keeps Huey's rules, and
bad options are refused. Huey's own consumer tests run on it through tests/huey/run_huey_suite.py."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_for

import cmwq_exec

huey_api = pytest.importorskip("huey.api")
from huey import signals as S  # noqa: E402
from huey.exceptions import ConfigurationError, TaskException  # noqa: E402

from cmwq_exec.huey import Consumer  # noqa: E402


@pytest.fixture
def signals(memory_huey: Any) -> list[tuple[str, str]]:
    """(signal, task id) as Huey emits them."""
    seen: list[tuple[str, str]] = []

    @memory_huey.signal()
    def record(signal: str, task: Any, *args: Any, **kwargs: Any) -> None:
        seen.append((signal, task.id))

    return seen


@pytest.fixture
def consumer(memory_huey: Any) -> Iterator[Any]:
    """A started consumer polling every millisecond; stopped gracefully after the test."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        options.setdefault("initial_delay", 0.001)
        options.setdefault("max_delay", 0.001)
        options.setdefault("check_worker_health", False)
        c = Consumer(memory_huey, **options)
        c.start()
        made.append(c)
        return c

    yield make
    for c in made:
        if not c.stop_flag.is_set():
            c.stop(graceful=True)


def test_waiting_tasks_overlap(memory_huey: Any, consumer: Any) -> None:
    """Twenty tasks asleep in blocking() at once: the stock consumer's one thread would hold one."""
    gate, inside = threading.Event(), []

    @memory_huey.task()
    def wait(i: int) -> int:
        inside.append(i)
        with cmwq_exec.blocking():
            assert gate.wait(30)
        return i

    consumer()
    results = [wait(i) for i in range(20)]
    wait_for("20 tasks waiting at once", lambda: len(inside) == 20)
    gate.set()
    assert sorted(r.get(blocking=True, timeout=30) for r in results) == list(range(20))


def test_workers_bounds_the_running_tasks(memory_huey: Any, consumer: Any) -> None:
    """-w 2: never more than two tasks outside blocking() at once; waits still overlap."""
    lock, running, most = threading.Lock(), [0], [0]

    @memory_huey.task()
    def step(i: int) -> int:
        for _ in range(3):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            for _ in range(20_000):  # compute, counted as running
                pass
            with lock:
                running[0] -= 1
            with cmwq_exec.blocking():
                time.sleep(0.001)
        return i

    c = consumer(workers=2)
    results = [step(i) for i in range(30)]
    assert sorted(r.get(blocking=True, timeout=60) for r in results) == list(range(30))
    assert 1 <= most[0] <= 2
    assert c.stats()["max-running"] == 2


def test_timeout_is_raised_in_the_task_thread(memory_huey: Any, consumer: Any, signals: Any) -> None:
    """A task spinning past its timeout gets TaskTimeout in its thread, as in Huey's process
    workers; Huey records it, and the pool runs the next task."""

    @memory_huey.task(timeout=0.2)
    def spin() -> None:
        while True:
            pass

    @memory_huey.task()
    def after() -> str:
        return "ran"

    consumer()
    r = spin()
    with pytest.raises(TaskException) as caught:
        r.get(blocking=True, timeout=30)
    assert caught.value.metadata["error"] == "TaskTimeout('timeout 0.2s')"
    assert (S.SIGNAL_TIMEOUT, r.id) in signals
    assert after().get(blocking=True, timeout=30) == "ran"


def test_a_task_that_ends_in_time_is_not_interrupted(memory_huey: Any, consumer: Any) -> None:
    """The timer of a finished task never fires into its thread: the next task on that thread
    (the pool keeps one running) finishes normally, long after the first one's timeout."""

    @memory_huey.task(timeout=0.05)
    def quick() -> int:
        return 1

    @memory_huey.task()
    def slower() -> int:
        with cmwq_exec.blocking():
            time.sleep(0.2)
        for _ in range(200_000):
            pass
        return 2

    consumer(workers=1)
    assert quick().get(blocking=True, timeout=30) == 1
    assert slower().get(blocking=True, timeout=30) == 2


def test_cooperative_timeout_still_works(memory_huey: Any, consumer: Any) -> None:
    """task.check_timeout(), what Huey's thread workers offer, raises as before."""

    @memory_huey.task(timeout=0.1, context=True)
    def polite(task: Any = None) -> None:
        while True:
            with cmwq_exec.blocking():
                time.sleep(0.01)
            task.check_timeout()

    consumer()
    with pytest.raises(TaskException) as caught:
        polite().get(blocking=True, timeout=30)
    assert "TaskTimeout" in caught.value.metadata["error"]


def test_scheduled_and_periodic_tasks_run(memory_huey: Any, consumer: Any) -> None:
    """A task scheduled in the past and a periodic one go through the consumer's scheduler."""
    ran = []

    @memory_huey.task()
    def later(n: int) -> int:
        return n + 1

    @memory_huey.periodic_task(huey_api.crontab(minute="*"))
    def tick() -> None:
        ran.append("tick")

    consumer()
    r = later.schedule((2,), eta=datetime.datetime.now() - datetime.timedelta(seconds=1))
    assert r.get(blocking=True, timeout=30) == 3
    wait_for("the periodic task to run", lambda: ran)


def test_graceful_stop_finishes_the_running_task_and_leaves_the_rest(memory_huey: Any, consumer: Any,
                                                                     signals: Any) -> None:
    """A graceful stop waits for the running task and dequeues nothing more: the tasks still in the
    queue stay there, as with Huey's own consumer."""
    started, release = threading.Event(), threading.Event()

    @memory_huey.task()
    def hold() -> str:
        started.set()
        assert release.wait(30)  # not in blocking(): with -w 1 nothing else runs meanwhile
        return "held"

    c = consumer(workers=1)
    r = hold()
    assert started.wait(30)
    rest = [hold() for _ in range(3)]
    stopper = threading.Thread(target=c.stop, kwargs={"graceful": True})
    stopper.start()
    wait_for("the stop flag", c.stop_flag.is_set)
    release.set()
    stopper.join(30)
    assert not stopper.is_alive()
    assert r.get() == "held"
    assert len(memory_huey) == len(rest) == 3
    assert all(x.get() is None for x in rest)
    assert not [s for s in signals if s[0] == S.SIGNAL_INTERRUPTED]


def test_interrupt_reports_the_running_task_once(memory_huey: Any, consumer: Any, signals: Any) -> None:
    """The interrupting stop raises KeyboardInterrupt in the running task: Huey reports it
    interrupted, once, with no result; the task behind it stays in the queue."""
    started, ran = threading.Event(), []

    @memory_huey.task()
    def stuck() -> None:
        started.set()
        while True:  # computes: with -w 1 the next task cannot start
            pass

    @memory_huey.task()
    def other() -> None:
        ran.append(1)

    c = consumer(workers=1)
    first = stuck()
    assert started.wait(30)
    second = other()
    c.stop(graceful=False)
    wait_for("the task reported", lambda: (S.SIGNAL_INTERRUPTED, first.id) in signals)
    memory_huey.notify_interrupted_tasks()  # what Consumer.run does next
    assert [i for s, i in signals if s == S.SIGNAL_INTERRUPTED] == [first.id]
    assert first.get() is None and second.get() is None
    assert not ran and len(memory_huey) == 1
    wait_for("the consumer idle", lambda: c.stats()["in-flight"] == 0)


def test_shutdown_timeout_interrupts(memory_huey: Any, consumer: Any, signals: Any) -> None:
    """-t: a graceful stop that outlasts the shutdown timeout interrupts the running task."""
    started = threading.Event()

    @memory_huey.task()
    def stuck() -> None:
        started.set()
        while True:
            with cmwq_exec.blocking():
                time.sleep(0.01)

    c = consumer(shutdown_timeout=0.2)
    r = stuck()
    assert started.wait(30)
    c.stop(graceful=True)
    wait_for("the task reported interrupted", lambda: (S.SIGNAL_INTERRUPTED, r.id) in signals)


def test_startup_hooks_run_on_the_task_threads(memory_huey: Any, consumer: Any) -> None:
    """An on_startup hook runs on a thread before the first task it runs, once per thread;
    on_shutdown hooks run once when the consumer stops."""
    threads, shutdowns = [], []

    @memory_huey.on_startup()
    def setup() -> None:
        threads.append(threading.get_ident())

    @memory_huey.on_shutdown()
    def teardown() -> None:
        shutdowns.append(1)

    @memory_huey.task()
    def whoami() -> int:
        return threading.get_ident()

    c = consumer()
    ran_on = {whoami().get(blocking=True, timeout=30) for _ in range(5)}
    assert ran_on <= set(threads) and len(threads) == len(set(threads))
    c.stop(graceful=True)
    assert shutdowns == [1]


@pytest.mark.parametrize(("options", "message"), [
    ({"worker_type": "process"}, "worker_type must be 'thread'"),
    ({"worker_type": "greenlet"}, "worker_type must be 'thread'"),
    ({"workers": 0}, "workers must be None"),
    ({"workers": True}, "workers must be None"),
    ({"workers": "4"}, "workers must be None"),
])
def test_bad_options_are_refused(memory_huey: Any, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Consumer(memory_huey, **options)


def test_with_detection_an_unannotated_wait_in_a_task_is_a_sleep(memory_huey: Any, consumer: Any) -> None:
    """With blocking detection on (CMWQ_DETECT_BLOCKING=1), a task's own wait that it does not wrap
    in blocking() tells the pool its worker sleeps: the consumer's run of a task is a user call
    site of cmwq_exec.detect."""
    from helpers import sleeps_as_its_worker_sees

    @memory_huey.task()
    def sleeper() -> bool:
        return sleeps_as_its_worker_sees()

    cmwq_exec.detect_blocking()
    try:
        consumer()
        assert sleeper().get(blocking=True, timeout=30) is True
    finally:
        cmwq_exec.undetect_blocking()
