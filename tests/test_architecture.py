"""The layering of the package holds, and the check of it can fail.

pyproject.toml's import-linter contracts put the front-ends above the plugin and sleep-detection
layers, those above the core, and order the core's own modules; every import counts (under
TYPE_CHECKING and inside functions too). Here the contracts are checked on the real tree, and on a
copy where a core module imports a front-end inside a function: that copy must be refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = shutil.which("lint-imports", path=os.path.dirname(sys.executable))

pytestmark = pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS is not None
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--config", str(tree / "pyproject.toml")],
                          cwd=tree, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tree)})


def copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "cmwq_exec", tree / "cmwq_exec",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_layers_are_kept(tmp_path: Path) -> None:
    proc = lint_imports(copy_tree(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "upper"), [
    ("core/pool.py", "from cmwq_exec import executor"),  # the core reaching a front-end
    ("core/worker.py", "from cmwq_exec.core import pool"),  # a lower core module reaching a higher one
    ("core/system.py", "import pluggy"),  # the core needing the plugin layer's package
])
def test_an_upward_import_is_refused_even_inside_a_function(tmp_path: Path, module: str,
                                                            upper: str) -> None:
    tree = copy_tree(tmp_path)
    path = tree / "cmwq_exec" / module
    path.write_text(path.read_text() + f"\n\ndef _upward() -> None:\n    {upper}  # noqa\n")
    proc = lint_imports(tree)
    assert proc.returncode != 0, proc.stdout
    assert "BROKEN" in proc.stdout or "broken" in proc.stdout


def test_a_core_module_outside_the_layers_is_refused(tmp_path: Path) -> None:
    """The core's contract is exhaustive: a new module must be given its layer."""
    tree = copy_tree(tmp_path)
    (tree / "cmwq_exec" / "core" / "newcomer.py").write_text('"""Not placed in any layer."""\n')
    proc = lint_imports(tree)
    assert proc.returncode != 0, proc.stdout
    assert "newcomer" in proc.stdout + proc.stderr


def _first_contract_modules(pyproject: Path) -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    contracts = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]["contracts"]
    names: set[str] = set()
    for layer in contracts[0]["layers"]:
        names.update(name.strip() for name in layer.replace(":", "|").split("|"))
    return names


def _package_modules(package: Path) -> set[str]:
    """Every module of the package above the core, as import-linter names it."""
    names = {"cmwq_exec." + path.stem for path in package.glob("*.py") if path.stem != "__init__"}
    names.update("cmwq_exec." + path.parent.name for path in package.glob("*/__init__.py"))
    return names


def test_every_module_of_the_package_is_in_a_contract() -> None:
    """The first contract names every module outside the core (the core's own is exhaustive): a
    module in no contract could import anything."""
    missing = _package_modules(ROOT / "cmwq_exec") - _first_contract_modules(ROOT / "pyproject.toml")
    assert not missing, f"modules in no import-linter contract (add them to the first one): {sorted(missing)}"


def test_a_module_missing_from_the_contracts_is_found(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    (tree / "cmwq_exec" / "newcomer.py").write_text('"""Not placed in any layer."""\n')
    missing = _package_modules(tree / "cmwq_exec") - _first_contract_modules(tree / "pyproject.toml")
    assert missing == {"cmwq_exec.newcomer"}


def test_the_core_names_its_protocols_in_interfaces_only() -> None:
    """One Protocol per seam, all in cmwq_exec/core/interfaces.py: a Protocol elsewhere in the core
    is a second name for something (a ``System`` beside the real System)."""
    import ast

    elsewhere = []
    for path in sorted((ROOT / "cmwq_exec" / "core").glob("*.py")):
        if path.name == "interfaces.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any("Protocol" in ast.unparse(base) for base in node.bases):
                elsewhere.append(f"{path.name}:{node.name}")
    assert not elsewhere, f"Protocols outside core/interfaces.py: {elsewhere}"
