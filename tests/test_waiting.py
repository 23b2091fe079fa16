"""``cmwq_exec.waiting()``: a call that waits for its sibling calls gives its max_workers slot up.

``blocking()`` keeps the slot (it bounds what runs, a pool of connections say); a wait on
something sibling calls provide must not, or a bounded executor deadlocks as ThreadPoolExecutor
does. ``waiting()`` is what a wait on a cmwq future does by itself, for any other wait.
"""

from __future__ import annotations

import queue
import threading

import pytest

import cmwq_exec
from cmwq_exec import CMWQExecutor, blocking, waiting


def _consumers(ex: CMWQExecutor, wait: object, n: int, timeout: float) -> list[object]:
    """``n`` calls that each queue a producer call and wait, inside ``wait``, for what it puts."""
    def producer(q: queue.Queue[int], i: int) -> None:
        q.put(i)

    def consumer(i: int) -> object:
        q: queue.Queue[int] = queue.Queue()
        ex.submit(producer, q, i)
        with wait:  # type: ignore[attr-defined]
            try:
                return q.get(timeout=timeout)
            except queue.Empty:
                return None

    return [f.result(timeout=timeout + 30) for f in [ex.submit(consumer, i) for i in range(n)]]


def test_waits_for_sibling_calls_do_not_deadlock_a_bounded_executor():
    with CMWQExecutor(max_workers=2) as ex:
        assert _consumers(ex, waiting(), 8, timeout=30) == list(range(8))


def test_blocking_keeps_the_slot():
    # the contrast: every slot held by a consumer, its producer never starts before the timeout
    with CMWQExecutor(max_workers=1) as ex:
        assert _consumers(ex, blocking(), 1, timeout=0.3) == [None]


def test_nested_and_shared_and_outside_a_worker():
    shared = waiting()
    with shared, shared:  # outside a worker: nothing to do
        pass
    event = threading.Event()

    @waiting()
    def wait_for_event() -> bool:
        with waiting():  # nested: only the outer block gives the slot up
            return event.wait(30)

    with CMWQExecutor(max_workers=1) as ex:
        first = ex.submit(wait_for_event)
        ex.submit(event.set).result(timeout=30)  # runs while the first call waits
        assert first.result(timeout=30) is True
        assert ex.workqueue.stats()["inflight"] == 0


def test_an_exception_inside_leaves_nothing_behind():
    with CMWQExecutor(max_workers=1) as ex:
        def fails() -> None:
            with waiting():
                raise KeyError("inside")

        with pytest.raises(KeyError):
            ex.submit(fails).result(timeout=30)
        assert _consumers(ex, waiting(), 3, timeout=30) == [0, 1, 2]


def test_exported():
    assert cmwq_exec.waiting is waiting and "waiting" in cmwq_exec.__all__
