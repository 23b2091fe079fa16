"""Dask's own scheduler tests (``dask/tests/test_threaded.py`` and ``test_local.py``, shipped in its
wheel) run with :func:`cmwq_exec.dask.get` in place of ``dask.threaded.get``, and dask's
``GetFunctionTestMixin`` (the checks every dask ``get`` passes) on it.

The suites call ``get`` through their module's global name (``from dask.threaded import get``) or
import ``dask.threaded.get`` inside a test: both are swapped for the module, and ``dask.config``'s
``scheduler`` is ours too. Skipped where dask is not installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("dask")
pytest.importorskip("dask.tests.test_threaded", reason="this dask was installed without its tests")

import dask  # noqa: E402
import dask.threaded  # noqa: E402
from dask.utils_test import GetFunctionTestMixin  # noqa: E402

import cmwq_exec.dask as cmwq_dask  # noqa: E402

pytestmark = pytest.mark.timeout(300)

_SUITES = ("dask.tests.test_threaded", "dask.tests.test_local")
_modules = [importlib.import_module(name) for name in _SUITES]
_calls: list[int] = []


def _counted_get(*args: Any, **kwargs: Any) -> Any:
    _calls.append(1)
    return cmwq_dask.get(*args, **kwargs)


for _module in _modules:
    globals().update({f"{_module.__name__.rsplit('.', 1)[-1]}__{name}": value
                      for name, value in vars(_module).items()
                      if (name.startswith("test_") and callable(value))
                      or (name.startswith("Test") and isinstance(value, type))})
del _module


class TestCMWQGet(GetFunctionTestMixin):  # type: ignore[misc]
    """dask's checks of a ``get`` function, on ours."""

    get = staticmethod(cmwq_dask.get)


@pytest.fixture(autouse=True, scope="module")
def cmwq_scheduler() -> Iterator[None]:
    """Every ``get`` of dask's suites is ours for the module; at its end, checks it was called."""
    saved = [(module, module.get) for module in (*_modules, dask.threaded) if hasattr(module, "get")]
    for module, _ in saved:
        module.get = _counted_get
    try:
        with dask.config.set(scheduler=_counted_get):
            yield
    finally:
        for module, get in saved:
            module.get = get
    assert _calls, "dask's suites never called cmwq_exec.dask.get"
