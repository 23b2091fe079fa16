"""Units the size of the kernel's: no module of the package over 600 lines, no class over 300, no
function over 80 (a concept that outgrows them is split, the way workqueue.c's sections read).
Checked here so that the rule holds as the code grows, not only when someone counts."""

from __future__ import annotations

import ast
from pathlib import Path

import cmwq_exec

LIMITS = {"module": 600, "class": 300, "function": 80}


def oversized(root: Path) -> list[str]:
    """Every module, class and function under ``root`` longer than its limit, with its length."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(root.parent)
        lines = len(text.splitlines())
        if lines > LIMITS["module"]:
            found.append(f"module {name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                kind = "class"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "function"
            else:
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > LIMITS[kind]:
                found.append(f"{kind} {name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_class_or_function_of_the_package_outgrows_its_limit() -> None:
    found = oversized(Path(cmwq_exec.__file__).parent)
    assert not found, "split by concept:\n" + "\n".join(found)


def test_the_check_finds_what_is_too_long(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (package / "m.py").write_text(f"def long():\n{body}\n\ndef short():\n    pass\n")
    assert oversized(package) == ["function pkg/m.py:1 long: 81 lines"]
