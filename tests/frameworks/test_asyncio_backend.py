"""cmwq_exec.asyncio: event loops whose default executor is a CMWQExecutor of their own, for one
``asyncio.run`` after another, with ``loop_factory``, with the installed policy, and on 3.10's path."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator

import pytest

import cmwq_exec.asyncio as cmwq_asyncio
from cmwq_exec import CMWQExecutor

pytestmark = pytest.mark.timeout(120)


async def _default_executor() -> CMWQExecutor:
    loop = asyncio.get_running_loop()
    executor = loop._default_executor  # type: ignore[attr-defined]
    assert isinstance(executor, CMWQExecutor)
    assert await asyncio.to_thread(sum, [1, 2, 3]) == 6
    assert await loop.run_in_executor(None, pow, 2, 10) == 1024
    return executor


def _nested(loop: asyncio.AbstractEventLoop, depth: int) -> int:
    """A call that waits for another call of the loop's default executor, ``depth`` deep."""
    if depth == 0:
        return threading.get_ident()
    inner = asyncio.run_coroutine_threadsafe(asyncio.to_thread(_nested, loop, depth - 1), loop)
    return inner.result()


async def _many_nested(chains: int, depth: int) -> int:
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(*(asyncio.to_thread(_nested, loop, depth) for _ in range(chains)))
    return len(results)


@pytest.fixture
def installed() -> Iterator[None]:
    cmwq_asyncio.install()
    try:
        yield
    finally:
        cmwq_asyncio.uninstall()


def test_run_twice_gets_a_fresh_executor_each_time() -> None:
    first = cmwq_asyncio.run(_default_executor())
    second = cmwq_asyncio.run(_default_executor())
    assert first is not second
    assert first._shutdown and second._shutdown  # asyncio.run shut each loop's own down
    with pytest.raises(RuntimeError, match="after shutdown"):
        first.submit(int)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.run takes loop_factory from 3.12")
def test_loop_factory_of_asyncio_run() -> None:
    executors = [asyncio.run(_default_executor(), loop_factory=cmwq_asyncio.new_event_loop)  # type: ignore[call-arg,unused-ignore]
                 for _ in range(3)]
    assert len({id(executor) for executor in executors}) == 3


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is new in 3.11")
def test_runner_runs_twice_on_one_executor() -> None:
    with asyncio.Runner(loop_factory=cmwq_asyncio.new_event_loop) as runner:  # type: ignore[attr-defined,unused-ignore]
        assert runner.run(_default_executor()) is runner.run(_default_executor())


def test_installed_policy_serves_every_asyncio_run(installed: None) -> None:
    # kept alive while compared: a collected executor's id may be the next one's
    executors = [asyncio.run(_default_executor()) for _ in range(3)]
    assert len({id(executor) for executor in executors}) == 3
    loop = asyncio.new_event_loop()
    try:
        assert isinstance(loop._default_executor, CMWQExecutor)  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_uninstall_puts_the_standard_policy_back(installed: None) -> None:
    cmwq_asyncio.uninstall()
    assert not isinstance(asyncio.get_event_loop_policy(), cmwq_asyncio.EventLoopPolicy)
    loop = asyncio.new_event_loop()
    try:
        assert loop._default_executor is None  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_nested_to_thread_beyond_the_stock_default_size_completes() -> None:
    # asyncio's default executor has at most 32 threads: 40 chains, each holding a thread while it
    # waits for the next call, never finish there.
    chains = 40
    assert cmwq_asyncio.run(_many_nested(chains, 3)) == chains


def test_run_refuses_what_is_not_a_coroutine() -> None:
    with pytest.raises(ValueError, match="needs a coroutine as main, got function"):
        cmwq_asyncio.run(_default_executor)  # type: ignore[arg-type]


def test_run_310_path_runs_and_shuts_the_executor_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(asyncio, "Runner", raising=False)
    executor = cmwq_asyncio.run(_default_executor())
    assert executor._shutdown
    assert cmwq_asyncio.run(_many_nested(4, 2)) == 4
