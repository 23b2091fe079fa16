"""``lockdep.assert_held``: a function documented as called with a lock held checks it in debug mode.

With ``CMWQ_LOCKDEP=1`` it raises when the calling thread does not hold the lock (held by nobody, or
by another thread); without it, it is a function that does nothing, chosen once at import.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import cmwq_exec
from cmwq_exec.core import lockdep


@pytest.fixture
def forget_violations() -> Iterator[None]:
    """The violations these tests provoke on purpose are not the suite's lock-order failures."""
    before = len(lockdep.violations)
    yield
    del lockdep.violations[before:]


def test_a_lock_nobody_holds_fails_naming_the_lock(forget_violations: None) -> None:
    lock = lockdep.CheckedLock("pool")
    with pytest.raises(lockdep.LockNotHeldError, match="lock 'pool' not held by thread 'MainThread'"):
        lockdep._assert_held_checked(lock)
    assert lockdep.violations[-1].startswith("lock 'pool' not held")


def test_a_lock_held_by_this_thread_passes() -> None:
    lock = lockdep.CheckedLock("workqueue")
    with lock:
        lockdep._assert_held_checked(lock)
    cond = threading.Condition(lockdep.CheckedLock("pool"))
    with cond:
        lockdep._assert_held_checked(cond)  # a Condition asks its lock


def test_a_lock_held_by_another_thread_fails(forget_violations: None) -> None:
    lock = lockdep.CheckedLock("pool")
    cond = threading.Condition(lock)
    taken, done = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            taken.set()
            done.wait(60)

    thread = threading.Thread(target=holder, name="holder")
    thread.start()
    try:
        assert taken.wait(60)
        with pytest.raises(lockdep.LockNotHeldError, match="'pool' not held by thread 'MainThread'"):
            lockdep._assert_held_checked(lock)
        with pytest.raises(lockdep.LockNotHeldError, match="'pool' not held"):
            lockdep._assert_held_checked(cond)
    finally:
        done.set()
        thread.join(60)


def _probe(lockdep_env: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CMWQ_LOCKDEP"}
    if lockdep_env is not None:
        env["CMWQ_LOCKDEP"] = lockdep_env
    code = (
        "from cmwq_exec.core import lockdep\n"
        "lock = lockdep.make_lock('pool')\n"
        "print(lockdep.assert_held.__name__)\n"
        "try:\n"
        "    lockdep.assert_held(lock)\n"
        "except lockdep.LockNotHeldError as e:\n"
        "    print('raised', e)\n"
        "else:\n"
        "    print('passed')\n"
        "with lock:\n"
        "    lockdep.assert_held(lock)\n"
        "print('held ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_debug_mode_checks_and_the_default_is_the_no_op() -> None:
    assert _probe("1") == ("_assert_held_checked\nraised lock 'pool' not held by thread 'MainThread'\n"
                           "held ok\n")
    # without the checker: the no-op, chosen at import, does not look at the lock at all
    assert _probe(None) == "_assert_held_noop\npassed\nheld ok\n"
    assert _probe("0") == "_assert_held_noop\npassed\nheld ok\n"


def _probe_decorator(lockdep_env: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CMWQ_LOCKDEP"}
    if lockdep_env is not None:
        env["CMWQ_LOCKDEP"] = lockdep_env
    code = (
        "from cmwq_exec.core import lockdep\n"
        "class Pool:\n"
        "    def __init__(self):\n"
        "        self.lock = lockdep.make_lock('pool')\n"
        "    def plain(self, x):\n"
        "        return x + 1\n"
        "    checked = lockdep.must_hold('lock')(plain)\n"
        "pool = Pool()\n"
        "print(Pool.checked is Pool.plain)\n"
        "try:\n"
        "    print(pool.checked(1))\n"
        "except lockdep.LockNotHeldError as e:\n"
        "    print('raised', e)\n"
        "with pool.lock:\n"
        "    print(pool.checked(2))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_must_hold_checks_in_debug_mode_and_is_the_method_itself_otherwise() -> None:
    assert _probe_decorator("1") == "False\nraised lock 'pool' not held by thread 'MainThread'\n3\n"
    assert _probe_decorator(None) == "True\n2\n3\n"


def test_must_hold_refuses_a_path_that_is_not_an_attribute_name() -> None:
    with pytest.raises(ValueError, match=r"path must be a dotted attribute name, got 'pool\.'"):
        lockdep.must_hold("pool.")


def test_the_core_checks_the_locks_its_docstrings_say_are_held() -> None:
    """In debug mode the pool's per-work methods (decorated), its parts and the watchdog (asserting)
    refuse a caller without the pool lock, and run for one that holds it."""
    env = {**os.environ, "CMWQ_LOCKDEP": "1"}
    code = (
        "from cmwq_exec.core import lockdep, system\n"
        "s = system._reset_for_tests()\n"
        "pool = s.unbound_pool\n"
        "calls = [('wake_up_worker', pool.wake_up_worker), ('kick', pool.kick),\n"
        "         ('give_idle_worker', pool.manager.give_idle_worker),\n"
        "         ('mayday.cancel', pool.mayday.cancel), ('watchdog.arm', lambda: s.watchdog.arm(pool))]\n"
        "for name, call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except lockdep.LockNotHeldError:\n"
        "        print(name, 'refused')\n"
        "    with pool.lock:\n"
        "        call()\n"
        "s.shutdown()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:-1] == [f"{name} refused" for name in
                                            ("wake_up_worker", "kick", "give_idle_worker", "mayday.cancel",
                                             "watchdog.arm")]


# -- every documented precondition is checked ------------------------------------------------------

#: how a docstring says its function is called with a lock held: the legend's letter
#: ("P: held", "W: held (lock order ...)") or a lock by name ("_condition held")
_SAYS_HELD = re.compile(r"\b[A-Z]: held|\b(?:_lock|_condition|pool lock) held")
_SAYS_NONE = re.compile(r"\b[Nn]o (?:pool )?lock held")


def _checks_its_lock(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    if any("must_hold" in ast.unparse(decorator) for decorator in function.decorator_list):
        return True
    return any(isinstance(node, ast.Call) and ast.unparse(node.func).endswith("assert_held")
               for node in ast.walk(function))


def documented_but_unchecked(root: Path) -> tuple[list[str], int]:
    """The functions under ``root`` whose docstring says a lock is held and that neither carry
    ``@must_hold`` nor call ``assert_held``; and how many such functions there are in all."""
    unchecked, documented = [], 0
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            if not _SAYS_HELD.search(doc) or _SAYS_NONE.search(doc):
                continue
            documented += 1
            if not _checks_its_lock(node):
                unchecked.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}")
    return unchecked, documented


def test_every_function_documented_as_called_with_a_lock_held_checks_it() -> None:
    """The package's rule (core/lockdep.py): a docstring's "P: held" is checked by the function
    (``@must_hold`` or ``assert_held``), so the lockdep lane catches a caller without the lock."""
    unchecked, documented = documented_but_unchecked(Path(cmwq_exec.__file__).parent)
    assert documented >= 40, f"only {documented} functions say a lock is held: has the legend changed?"
    assert not unchecked, "documented as called with a lock held, not checked:\n" + "\n".join(unchecked)


def test_the_check_finds_a_documented_function_that_does_not_check(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text(
        "from lockdep import assert_held, must_hold\n"
        "def unchecked(pool):\n    '''Do it. P: held.'''\n\n"
        "def asserted(pool):\n    '''Do it. P: held.'''\n    assert_held(pool.lock)\n\n"
        "class C:\n    @must_hold('lock')\n    def decorated(self):\n        '''W: held.'''\n\n"
        "def free():\n    '''No lock held (P: held by nobody).'''\n")
    assert documented_but_unchecked(package) == (["pkg/m.py:2 unchecked"], 3)


def test_a_future_finished_before_anyone_waited_passes_the_check() -> None:
    """A future that finished before anyone asked for its Condition gets the shared stand-in
    (future_waits._FINISHED_CONDITION), which _wait_done asserts held like a real one: in debug
    mode it must say it is (it raised AttributeError: the bench's no-op loop failed so in CI)."""
    # _get reads the state, then the Condition: a future that finishes between the two hands
    # _wait_done the stand-in; done here in that order on purpose
    code = ("from cmwq_exec import CMWQExecutor\n"
            "with CMWQExecutor() as ex:\n"
            "    future = ex.submit(pow, 2, 10)\n"
            "    while future._state != 'FINISHED':  # done() would make its Condition\n"
            "        pass\n"
            "    condition = future._condition\n"
            "    assert type(condition).__name__ == '_FinishedCondition', condition\n"
            "    with condition:\n"
            "        future._wait_done(None)\n"
            "    print(future.result())\n")
    env = {**os.environ, "CMWQ_LOCKDEP": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1024"
