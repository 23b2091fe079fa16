"""Entry-point plugins load one by one: a plugin that fails to import is named (distribution, entry
point, error) and skipped while the others load; a plugin whose own setting is invalid stops the
program, as a bad core setting does.

Each test runs a fresh interpreter (the plugin manager is made once per process) with temporary
distributions on ``sys.path``: a ``.dist-info`` directory with an ``entry_points.txt`` is what
``importlib.metadata`` finds for an installed package. The real environment's entry points (the
first-party plugins, installed for the tests) load too.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from helpers import run_python

pytestmark = pytest.mark.timeout(120)

#: starts the pools (which load the entry points), then says which plugins are registered
PROGRAM = """
import logging
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
import cmwq_exec
from cmwq_exec import plugin
assert cmwq_exec.CMWQExecutor().submit(int, "7").result(timeout=30) == 7
pm = plugin.get_plugin_manager()
for name, _ in pm.list_name_plugin():
    print("registered:", name)
print("worker created events:", __import__("cmwq_loading_good").created > 0)
"""


def distribution(root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """A directory holding an installed distribution ``name`` 1.0 (metadata, ``cmwq_exec`` entry
    points, modules), to put on ``sys.path``."""
    root.mkdir()
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[cmwq_exec]\n{lines}")
    for module, text in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(text))
    return root


GOOD_PLUGIN = """
    import pluggy

    hookimpl = pluggy.HookimplMarker("cmwq_exec")
    created = 0


    @hookimpl
    def cmwq_worker_created(pool, worker):
        global created
        created += 1
"""


def run(*paths: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """PROGRAM with ``paths`` first on sys.path, in that order."""
    pythonpath = os.pathsep.join([*map(str, paths), *filter(None, [os.environ.get("PYTHONPATH")])])
    # none of the outside world's settings of the plugins (empty is unset for each)
    env = {"CMWQ_EXEC_DISABLE_PLUGIN_AUTOLOAD": "", "CMWQ_FIXED_CONCURRENCY": "", "CMWQ_EVENT_LOG": "", **env}
    return run_python(PROGRAM, timeout=60, PYTHONPATH=pythonpath, **env)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return distribution(tmp_path / "good", "cmwq-loading-good", {"good": "cmwq_loading_good"},
                        {"cmwq_loading_good": GOOD_PLUGIN})


def test_a_plugin_that_fails_to_import_is_named_and_skipped_and_the_next_loads(tmp_path: Path,
                                                                                 good: Path) -> None:
    broken = distribution(tmp_path / "broken", "cmwq-loading-broken",
                          {"broken": "cmwq_loading_missing_module"}, {})
    proc = run(broken, good)  # the broken distribution comes first on sys.path, so loads first
    assert proc.returncode == 0, proc.stderr
    assert "registered: good\n" in proc.stdout
    assert "worker created events: True" in proc.stdout  # and its hook is called
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR cmwq_exec.plugin")]
    assert len(errors) == 1, proc.stderr
    assert errors[0] == ("ERROR cmwq_exec.plugin: cmwq_exec plugin 'broken' (entry point broken = "
                         "cmwq_loading_missing_module, distribution cmwq-loading-broken 1.0) failed to "
                         "load and is skipped: ModuleNotFoundError: No module named "
                         "'cmwq_loading_missing_module'")


def test_a_plugin_that_raises_while_it_registers_is_skipped_too(tmp_path: Path, good: Path) -> None:
    """An import that works but raises something else (here at module level) is no different."""
    raising = distribution(tmp_path / "raising", "cmwq-loading-raising", {"raising": "cmwq_loading_raising"},
                           {"cmwq_loading_raising": "raise RuntimeError('no database to talk to')\n"})
    proc = run(raising, good)
    assert proc.returncode == 0, proc.stderr
    assert "worker created events: True" in proc.stdout
    assert ("cmwq_exec plugin 'raising' (entry point raising = cmwq_loading_raising, distribution "
            "cmwq-loading-raising 1.0) failed to load and is skipped: RuntimeError: no database to talk "
            "to") in proc.stderr


def test_an_invalid_plugin_setting_stops_the_program_naming_the_variable(good: Path) -> None:
    """The fixed-concurrency plugin (installed for the tests) reads CMWQ_FIXED_CONCURRENCY."""
    proc = run(good, CMWQ_FIXED_CONCURRENCY="abc")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ("SettingError: CMWQ_FIXED_CONCURRENCY must be a positive integer (the most busy workers per "
            "pool) or unset, not 'abc'") in proc.stderr
    assert "registered:" not in proc.stdout


def test_an_event_log_that_cannot_be_written_stops_the_program(tmp_path: Path, good: Path) -> None:
    target = tmp_path / "no-such-directory" / "events.jsonl"
    proc = run(good, CMWQ_EVENT_LOG=str(target))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"SettingError: CMWQ_EVENT_LOG={str(target)!r}: cannot append to that file: " in proc.stderr


def test_a_third_party_plugin_signals_its_invalid_setting_with_setting_error(tmp_path: Path,
                                                                             good: Path) -> None:
    strict = distribution(tmp_path / "strict", "cmwq-loading-strict", {"strict": "cmwq_loading_strict"},
                          {"cmwq_loading_strict": """
                              import os
                              from cmwq_exec.plugin import SettingError

                              if os.environ.get("CMWQ_LOADING_STRICT") != "ok":
                                  raise SettingError("CMWQ_LOADING_STRICT must be 'ok'")
                          """})
    assert run(strict, good, CMWQ_LOADING_STRICT="ok").returncode == 0
    proc = run(good, strict, CMWQ_LOADING_STRICT="no")  # stops even after others loaded
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SettingError: CMWQ_LOADING_STRICT must be 'ok'" in proc.stderr


def test_the_processes_supervisor_refuses_an_invalid_plugin_setting_before_starting_a_child() -> None:
    """The Celery supervisor checks the configuration before it starts a child, plugins included: a
    child that failed on it at start-up would only be started again."""
    proc = run_python("from cmwq_exec import celery_processes\ncelery_processes.check_configuration()\n",
                      timeout=60, CMWQ_FIXED_CONCURRENCY="abc", CMWQ_EXEC_DISABLE_PLUGIN_AUTOLOAD="",
                      CMWQ_EVENT_LOG="")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SettingError: CMWQ_FIXED_CONCURRENCY must be a positive integer" in proc.stderr
