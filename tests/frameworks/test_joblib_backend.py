"""The joblib backend "cmwq": n_jobs bounds the running calls, nested Parallel on a bounded backend
completes, errors keep joblib's captured traceback, generators work, loky workers get the name
from the initializer."""

from __future__ import annotations

import os
import threading
import traceback
from typing import Any

import pytest

pytest.importorskip("joblib")

from joblib import Parallel, delayed, parallel_config  # noqa: E402

import cmwq_exec.joblib as cmwq_joblib  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class _Peak:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __call__(self, i: int) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            threading.Event().wait(0.005)
        finally:
            with self.lock:
                self.now -= 1
        return i


def test_n_jobs_bounds_the_running_calls() -> None:
    peak = _Peak()
    with parallel_config(backend="cmwq"):
        assert Parallel(n_jobs=3)(delayed(peak)(i) for i in range(40)) == list(range(40))
    assert 1 <= peak.most <= 3


def _inner(i: int) -> int:
    return sum(Parallel(n_jobs=2)(delayed(pow)(i, k) for k in range(3)))


@pytest.mark.parametrize("n_jobs", [-1, 2])
def test_nested_parallel_completes(n_jobs: int) -> None:
    with parallel_config(backend="cmwq"):
        assert Parallel(n_jobs=n_jobs)(delayed(_inner)(i) for i in range(8)) == [
            sum(i**k for k in range(3)) for i in range(8)]


def _fails(i: int) -> int:
    if i == 3:
        raise ZeroDivisionError("call three")
    return i


def test_an_error_keeps_the_calls_traceback() -> None:
    with parallel_config(backend="cmwq"), pytest.raises(ZeroDivisionError, match="call three") as info:
        Parallel(n_jobs=2)(delayed(_fails)(i) for i in range(6))
    assert "_fails" in "".join(traceback.format_exception(info.value))


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_generators(return_as: str) -> None:
    with parallel_config(backend="cmwq"):
        out = Parallel(n_jobs=2, return_as=return_as)(delayed(pow)(i, 2) for i in range(10))
        assert not isinstance(out, list)
        assert sorted(out) == [i * i for i in range(10)]


def test_n_jobs_one_runs_in_the_caller() -> None:
    with parallel_config(backend="cmwq"):
        assert Parallel(n_jobs=1)(delayed(threading.get_ident)() for _ in range(3)) == [
            threading.get_ident()] * 3


@pytest.mark.parametrize("n_jobs", ["4", 2.5])
def test_bad_n_jobs_is_named(n_jobs: Any) -> None:
    with pytest.raises(ValueError, match="n_jobs"):
        cmwq_joblib.CMWQBackend().configure(n_jobs=n_jobs)


def _pid_and_mark() -> tuple[int, str | None]:
    return os.getpid(), os.environ.get("CMWQ_TEST_LOKY_MARK")


def _mark(value: str) -> None:
    os.environ["CMWQ_TEST_LOKY_MARK"] = value


def test_loky_workers_know_the_name_and_still_run_the_initializer_asked_for() -> None:
    # joblib's nested_loop names the backend in a module that does not import cmwq_exec.joblib:
    # a loky worker started from a process that imported it knows the name all the same
    suite = pytest.importorskip("joblib.test.test_parallel")
    with parallel_config(backend="loky"):
        assert Parallel(n_jobs=2)(delayed(suite.nested_loop)("cmwq") for _ in range(2)) == [None, None]
    # the user's own initializer runs after ours, with its initargs; loky reuses its workers
    with parallel_config(backend="loky", initializer=_mark, initargs=("set",)):
        first = Parallel(n_jobs=2)(delayed(_pid_and_mark)() for _ in range(4))
        assert Parallel(n_jobs=2)(delayed(suite.nested_loop)("cmwq") for _ in range(2)) == [None, None]
        again = Parallel(n_jobs=2)(delayed(_pid_and_mark)() for _ in range(4))
    assert {mark for _, mark in first + again} == {"set"}
    workers = {pid for pid, _ in first + again}
    assert len(workers) <= 2, f"loky started new workers: {workers}"  # a restart would add two
    assert os.getpid() not in workers


def test_the_loky_initializer_compares_equal_for_the_same_user_initializer() -> None:
    assert cmwq_joblib.RegisterFirst(_mark) == cmwq_joblib.RegisterFirst(_mark)
    assert cmwq_joblib.RegisterFirst(None) != cmwq_joblib.RegisterFirst(_mark)
    assert hash(cmwq_joblib.RegisterFirst(None)) == hash(cmwq_joblib.RegisterFirst(None))
