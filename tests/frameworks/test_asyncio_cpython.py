"""CPython's own asyncio tests of executors and runners (``test_asyncio``'s test_threads,
test_base_events and test_runners) run with :mod:`cmwq_exec.asyncio`'s policy as the default one, from
the interpreter's installed ``test`` package.

The policy takes ``asyncio.DefaultEventLoopPolicy``'s place for the module: the suites reset the
policy (``set_event_loop_policy(None)``) between tests, and asyncio then makes a new default one,
which is ours. Their loops made by ``asyncio.run``, ``Runner`` and ``new_event_loop()`` get a cmwq
default executor; the module checks at its end that some did. Interpreters installed without their
test suite skip these.
"""

from __future__ import annotations

import asyncio
import importlib
import unittest
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

import cmwq_exec.asyncio as cmwq_asyncio
from cmwq_exec import CMWQExecutor

pytestmark = pytest.mark.timeout(600)

_MODULES = ("test_threads", "test_base_events", "test_runners")


def _cpython_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"test.test_asyncio.{name}")
    except ImportError:
        return None


def _test_cases(module: ModuleType) -> dict[str, type]:
    """The module's TestCase classes, under names that say where they come from."""
    return {f"{module.__name__.rsplit('.', 1)[-1]}__{name}": value for name, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, unittest.TestCase)
            and value.__module__ == module.__name__}


_loaded = {name: _cpython_module(name) for name in _MODULES}
_executors_made: list[int] = []

def _not_installed(name: str) -> Any:
    def test() -> None:
        pytest.skip(f"this interpreter does not ship CPython's test_asyncio.{name} (its test package is "
                    "not installed)")
    return test


for _name, _module in _loaded.items():
    if _module is None:
        globals()[f"test_{_name}_not_installed"] = _not_installed(_name)
    else:
        globals().update(_test_cases(_module))
del _name, _module


@pytest.fixture(autouse=True, scope="module")
def cmwq_default_policy() -> Iterator[None]:
    """Our policy as asyncio's default for the module; counts the loops it gave a cmwq executor."""
    policy_class: Any = asyncio.DefaultEventLoopPolicy  # type: ignore[attr-defined,unused-ignore]
    made_loop = cmwq_asyncio.EventLoopPolicy.new_event_loop

    def counting_new_event_loop(self: cmwq_asyncio.EventLoopPolicy) -> asyncio.AbstractEventLoop:
        loop = made_loop(self)
        assert isinstance(loop._default_executor, CMWQExecutor)  # type: ignore[attr-defined]
        _executors_made.append(1)
        return loop

    asyncio.DefaultEventLoopPolicy = cmwq_asyncio.EventLoopPolicy  # type: ignore[attr-defined,misc]
    cmwq_asyncio.EventLoopPolicy.new_event_loop = counting_new_event_loop  # type: ignore[method-assign]
    asyncio.set_event_loop_policy(None)
    try:
        yield
    finally:
        asyncio.DefaultEventLoopPolicy = policy_class  # type: ignore[attr-defined,misc]
        cmwq_asyncio.EventLoopPolicy.new_event_loop = made_loop  # type: ignore[method-assign]
        asyncio.set_event_loop_policy(None)
    if any(module is not None for module in _loaded.values()):
        assert _executors_made, "no event loop of CPython's suites got a cmwq default executor"
