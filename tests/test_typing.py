"""The public API's types, as a user's type checker sees them after ``pip install -e .``.

``tests/typing/executor_types.py`` lists what mypy and pyright must accept (``assert_type`` of
futures, results, ``map``) and the mistakes they must report (``# E: <code>`` lines). Each checker
runs in a temporary directory, not the repository root, so it finds ``cmwq_exec`` only where a user
would: through the installed distribution.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).resolve().parent / "typing" / "executor_types.py"
pytestmark = pytest.mark.slow  # two type checkers: ~20-40 s


def expected() -> dict[int, str]:
    """{line number (1-based): mypy error code} of every ``# E:`` line."""
    marks = {}
    for number, line in enumerate(CASES.read_text().splitlines(), 1):
        if match := re.search(r"#\s*E:\s*([\w-]+)\s*$", line):
            marks[number] = match.group(1)
    assert marks, "no expected errors found: the case file lost its marks"
    return marks


def copy_cases(tmp_path: Path) -> Path:
    target = tmp_path / CASES.name
    shutil.copy(CASES, target)
    return target


def test_mypy_sees_precise_types(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is in the 'test' extra")
    target = copy_cases(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", "/dev/null",
         "--python-version", f"{sys.version_info[0]}.{sys.version_info[1]}",
         "--show-error-codes", "--no-error-summary", target.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    found: dict[int, str] = {}
    other = []
    for line in proc.stdout.splitlines():
        match = re.match(rf"{re.escape(target.name)}:(\d+): error: .*\[([\w-]+)\]$", line)
        if match:
            found.setdefault(int(match.group(1)), match.group(2))
        elif ": note:" not in line:
            other.append(line)
    assert not other, proc.stdout + proc.stderr
    assert found == expected(), proc.stdout


def test_pyright_sees_precise_types(tmp_path: Path) -> None:
    pytest.importorskip("pyright", reason="pyright is in the 'test' extra")
    target = copy_cases(tmp_path)
    (tmp_path / "pyrightconfig.json").write_text(json.dumps({
        "pythonVersion": f"{sys.version_info[0]}.{sys.version_info[1]}", "typeCheckingMode": "standard"}))
    proc = subprocess.run([sys.executable, "-m", "pyright", "--pythonpath", sys.executable, "--outputjson",
                           target.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not run: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    errors = {d["range"]["start"]["line"] + 1: d["message"] for d in report["generalDiagnostics"]
              if d["severity"] == "error"}
    assert set(errors) == set(expected()), errors
