"""joblib's own ``Parallel`` tests (``joblib/test/test_parallel.py``, shipped in its wheel),
parametrized with the ``"cmwq"`` backend next to joblib's own.

joblib's suite builds its backend lists when it is imported: from ``BACKENDS`` (where importing
:mod:`cmwq_exec.joblib` first puts ``"cmwq"``), and in ``PARALLEL_BACKENDS``, the list of the
backends that run calls in parallel, which gets ``"cmwq"`` appended before pytest reads the
parametrizations. Only the cases that run on the cmwq backend are kept (tests/frameworks/conftest.py
deselects the others: joblib's own backends are joblib's to test). Skipped where joblib is not
installed.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

pytest.importorskip("joblib")
import cmwq_exec.joblib  # noqa: E402,F401  (registers "cmwq" before joblib's suite reads BACKENDS)

try:
    _suite: Any = importlib.import_module("joblib.test.test_parallel")
except ImportError:
    pytest.skip("this joblib was installed without its tests", allow_module_level=True)

pytestmark = pytest.mark.timeout(300)

for _backends in (_suite.PARALLEL_BACKENDS, _suite.all_backends_for_context_manager):
    if "cmwq" not in _backends:
        _backends.append("cmwq")
if not any(isinstance(backend, cmwq_exec.joblib.CMWQBackend) for backend in _suite.ALL_VALID_BACKENDS):
    _suite.ALL_VALID_BACKENDS += ["cmwq", cmwq_exec.joblib.CMWQBackend()]
if "cmwq" not in _suite.RETURN_GENERATOR_BACKENDS:
    _suite.RETURN_GENERATOR_BACKENDS["cmwq"] = cmwq_exec.joblib.CMWQBackend
del _backends

globals().update({name: value for name, value in vars(_suite).items()
                  if name.startswith("test_") and callable(value)})

