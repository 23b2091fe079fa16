"""CPython's own initializer tests (``test_concurrent_futures``' ``test_init``) run against
CMWQExecutor, from the interpreter's installed ``test`` package: the initializer runs before the
calls, and a failing one breaks the executor and logs ``Exception in initializer:`` at CRITICAL on
the ``concurrent.futures`` logger with its traceback, as ThreadPoolExecutor does.

Interpreters installed without their test suite (some distributions strip it) skip these; the
CRITICAL log line is also checked directly in tests/test_executor.py.
"""

from __future__ import annotations

import importlib
import unittest
from types import ModuleType
from typing import Any

import pytest

from cmwq_exec import CMWQExecutor

pytestmark = pytest.mark.timeout(120)


def _cpython_init_tests() -> ModuleType | None:
    """The module holding CPython's ``InitializerMixin``: its own module since 3.13 (and late 3.12
    releases), part of ``test.test_concurrent_futures`` before."""
    for name in ("test.test_concurrent_futures.test_init", "test.test_concurrent_futures"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "InitializerMixin") and hasattr(module, "FailingInitializerMixin"):
            return module
    return None


_cpython = _cpython_init_tests()

if _cpython is None:
    def test_cpython_initializer_tests() -> None:
        pytest.skip("this interpreter does not ship CPython's test_concurrent_futures (its test package "
                    "is not installed)")
else:
    # CPython's ThreadPoolMixin with the executor type swapped. unittest.TestCase, not CPython's
    # BaseTestCase: that one waits at tearDown for the process's thread count to come back, and the
    # shared pools keep their workers.
    _CMWQMixin: Any = type("CMWQMixin", (_cpython.ExecutorMixin,), {"executor_type": CMWQExecutor})
    _Initializer: Any = _cpython.InitializerMixin
    _FailingInitializer: Any = _cpython.FailingInitializerMixin

    class CMWQInitializerTest(_Initializer, _CMWQMixin, unittest.TestCase):
        """CPython's InitializerMixin on CMWQExecutor."""

    class CMWQFailingInitializerTest(_FailingInitializer, _CMWQMixin, unittest.TestCase):
        """CPython's FailingInitializerMixin on CMWQExecutor."""
