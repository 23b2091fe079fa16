"""What a type checker tells a user of cmwq_exec: checked by mypy and pyright (tests/test_typing.py).

Never run, only checked. A line ending in ``# E: <mypy error code>`` must be reported as an error
by both checkers (mypy with that code); every other line must pass, ``assert_type`` lines
included. The mistakes below are the ones both checkers catch with ``ThreadPoolExecutor``.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor, Future

from typing_extensions import assert_type  # typing.assert_type is 3.11+

from cmwq_exec import CMWQExecutor, CMWQFuture, DelayedWork, Work, WorkQueue


def parse(text: str) -> int:
    return int(text)


def typed_executor() -> None:
    with CMWQExecutor() as ex:
        future = ex.submit(parse, "12")
        assert_type(future, CMWQFuture[int])
        assert_type(future.result(), int)
        assert_type(future.result(timeout=1.0), int)
        assert_type(ex.map(parse, ["1", "2"]), Iterator[int])
        assert_type(ex.map(parse, ["1", "2"], chunksize=8), Iterator[int])
        plain: Future[int] = ex.submit(parse, "1")  # a CMWQFuture is a concurrent.futures.Future
        named: CMWQFuture[str] = ex.submit(str, 3)
        executor: Executor = ex  # a drop-in where an Executor is expected
        del plain, named, executor


def mistakes() -> None:
    with CMWQExecutor(max_workers=4) as ex:
        ex.submit(parse, 12)  # E: arg-type
        ex.submit(parse)  # E: call-arg
        ex.submit(parse, "1", base=10)  # E: call-arg
        wrong: CMWQFuture[str] = ex.submit(parse, "1")  # E: arg-type
        text: str = ex.submit(parse, "1").result()  # E: assignment
        numbers: Iterator[str] = ex.map(parse, ["1"])  # E: arg-type
        del wrong, text, numbers


def works() -> None:
    wq = WorkQueue("types", max_active=2)
    assert_type(wq.queue_work(Work(parse, "1")), bool)
    assert_type(wq.queue_delayed_work(DelayedWork(print, "later"), 1.0), bool)
    Work(parse, 1)  # E: arg-type
    DelayedWork(parse)  # E: call-arg
    wq.queue_work(parse)  # E: arg-type
    wq.destroy()
