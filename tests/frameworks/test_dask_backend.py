"""cmwq_exec.dask.get: nested compute on a bounded executor completes, the caller's context reaches
the tasks, num_workers is the number of tasks kept in flight, bad arguments are named."""

from __future__ import annotations

import contextvars
import functools
import threading
from typing import Any

import pytest

dask = pytest.importorskip("dask")

import cmwq_exec.dask as cmwq_dask  # noqa: E402
from cmwq_exec import CMWQExecutor  # noqa: E402

pytestmark = pytest.mark.timeout(120)

_request = contextvars.ContextVar("request", default="none")


def _leaf(i: int) -> int:
    return i * 2


def _outer(i: int) -> int:
    # a compute() inside a task: the outer task waits for tasks of the same bounded executor
    return sum(dask.compute(*[dask.delayed(_leaf)(i + k) for k in range(3)]))


def test_nested_compute_on_a_bounded_executor_completes() -> None:
    with CMWQExecutor(max_workers=2) as executor:
        scheduler = functools.partial(cmwq_dask.get, executor=executor)
        with dask.config.set(scheduler=scheduler):
            results = dask.compute(*[dask.delayed(_outer)(i) for i in range(12)])
    assert list(results) == [sum(2 * (i + k) for k in range(3)) for i in range(12)]


def test_tasks_see_the_callers_context() -> None:
    token = _request.set("r-42")
    try:
        assert dask.compute(dask.delayed(_request.get)(), scheduler=cmwq_dask.get) == ("r-42",)
    finally:
        _request.reset(token)


def test_num_workers_bounds_the_tasks_in_flight() -> None:
    lock = threading.Lock()
    running = [0, 0]  # now, most

    def task(i: int) -> int:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        try:
            threading.Event().wait(0.01)
        finally:
            with lock:
                running[0] -= 1
        return i

    results = dask.compute(*[dask.delayed(task)(i) for i in range(30)], scheduler=cmwq_dask.get,
                           num_workers=3)
    assert list(results) == list(range(30))
    assert 1 <= running[1] <= 3


def test_in_flight_defaults() -> None:
    assert cmwq_dask._in_flight(CMWQExecutor(max_workers=5), None) == 5
    assert cmwq_dask._in_flight(CMWQExecutor(), None) == cmwq_dask.IN_FLIGHT_PER_CPU * cmwq_dask._cpu_count()


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_bad_num_workers_is_named(value: Any) -> None:
    with pytest.raises(ValueError, match="num_workers must be a positive int or None"):
        cmwq_dask.get({"x": 1}, "x", num_workers=value)


def test_executor_must_be_an_executor() -> None:
    with pytest.raises(TypeError, match="executor must be a concurrent.futures.Executor, got int"):
        cmwq_dask.get({"x": 1}, "x", executor=4)  # type: ignore[arg-type]
