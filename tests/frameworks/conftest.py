"""The frameworks' own suites: of joblib's ``test_parallel``, only the cases on the cmwq backend
(all of them, including those where a loky worker runs a function of joblib's test module that
names ``"cmwq"``: cmwq_exec.joblib gives loky workers the name, see docs/joblib.md).
"""

from __future__ import annotations

from typing import Any

import pytest


def _on_cmwq(value: Any) -> bool:
    if value == "cmwq":
        return True
    cls = value if isinstance(value, type) else type(value)
    return cls.__module__ == "cmwq_exec.joblib"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if item.path.name != "test_joblib_suite.py":
            kept.append(item)
        elif callspec is not None and any(_on_cmwq(value) for value in callspec.params.values()):
            kept.append(item)
        else:
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
