"""The ``cmwq-exec`` command, run the way users run it: as a console script in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmwq_exec import cli

ROOT = Path(__file__).resolve().parent.parent


def _command() -> list[str]:
    script = shutil.which("cmwq-exec", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "cmwq_exec.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CMWQ_EXEC_DISABLE_PLUGIN_AUTOLOAD="1")
    return subprocess.run([*_command(), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_demo_quick_json_cmwq_finishes_and_tpe_deadlocks_without_hanging():
    start = time.monotonic()
    proc = run("demo", "--quick", "--json", timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 30, f"demo --quick took {elapsed:.1f} s"
    report = json.loads(proc.stdout)
    work = report["workload"]
    cmwq, tpe = report["results"]["cmwq"], report["results"]["tpe"]

    assert cmwq["finished"] and not cmwq["deadlocked"]
    assert cmwq["completed"] == cmwq["tasks"] == work["tasks"]
    assert all(c["done"] == c["total"] for c in cmwq["categories"].values())
    assert cmwq["wall_s"] < work["timeout"]

    # ThreadPoolExecutor() waits on calls queued behind its own waiting workers: it never finishes
    # the nested calls, and was abandoned at the timeout.
    assert not tpe["finished"] and tpe["deadlocked"]
    nested = tpe["categories"]["nested"]
    assert nested["done"] < nested["total"]
    assert tpe["wall_s"] >= work["timeout"]
    # Its throughput counts the calls that do not wait on others, over the time they took, so the
    # deadlock timeout does not show up as a low rate.
    flat_s = max(tpe["categories"][kind]["seconds"] or 0 for kind in ("waits", "cpu"))
    assert 0 < flat_s <= tpe["wall_s"]
    assert tpe["calls_per_s"] and cmwq["calls_per_s"]


@pytest.mark.slow
def test_demo_live_output_has_the_table():
    proc = run("demo", "--quick", "--timeout", "1", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "CMWQExecutor()" in out and "ThreadPoolExecutor()" in out
    assert "deadlocked after 1 s" in out
    assert "calls/s (waits + CPU)" in out and "peak worker threads" in out


def test_dash_dash_version_prints_the_package_version():
    import cmwq_exec

    proc = run("--version", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"cmwq-exec {cmwq_exec.__version__}\n"


def test_version():
    proc = run("version", timeout=30)
    assert proc.returncode == 0, proc.stderr
    import cmwq_exec

    assert proc.stdout.startswith(f"cmwq_exec {cmwq_exec.__version__} ")


@pytest.mark.parametrize("argv", [["bogus"], ["--bogus"], ["demo", "--no-such-option"],
                                  ["demo", "--timeout", "-1"],
                                  ["version", "extra"]])
def test_bad_usage_exits_2_with_a_message(argv):
    proc = run(*argv, timeout=30)
    assert proc.returncode == 2
    assert "cmwq-exec" in proc.stderr and "error:" in proc.stderr


def test_a_bare_command_prints_the_help():
    proc = run(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: cmwq-exec")
    assert "demo" in proc.stdout and "top" in proc.stdout and proc.stderr == ""


@pytest.mark.parametrize("argv", [["demo", "--quik"], ["version", "--json"]])
def test_a_mistyped_option_shows_its_commands_usage(argv):
    proc = run(*argv, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: cmwq-exec {argv[0]}"), proc.stderr
    assert f"unrecognized arguments: {argv[1]}" in proc.stderr


def test_main_in_process(capsys):
    assert cli.main(["version"]) == 0
    assert "cmwq_exec" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["nope"])
    assert exc.value.code == 2


def test_top_is_delegated():
    proc = run("top", "--help", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "cmwq-exec top" in proc.stdout


def test_top_reports_an_unreachable_url():
    proc = run("top", "--json", "--url", "http://127.0.0.1:9/metrics", "--timeout", "1", timeout=30)
    assert proc.returncode == 1
    assert "cmwq-exec top" in proc.stderr


def test_top_absent_is_said_clearly(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_top(name, globals=None, locals=None, fromlist=(), level=0):
        if (name == "cmwq_exec" and fromlist and "top" in fromlist) or name == "cmwq_exec.top":
            raise ModuleNotFoundError("No module named 'cmwq_exec.top'", name="cmwq_exec.top")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.delitem(sys.modules, "cmwq_exec.top", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_top)
    assert cli.main(["top"]) == 1
    assert "not available" in capsys.readouterr().err


def test_bench_help_is_the_benchmark_scripts():
    if not (ROOT / "benchmarks" / "bench_core.py").is_file():
        pytest.skip("no benchmarks/ in this tree")
    proc = run("bench", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout


def test_bench_without_the_script_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_bench_script", lambda: tmp_path / "missing.py")
    assert cli.main(["bench", "--quick"]) == 1
    assert "source tree" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quick_writes_every_figure(tmp_path):
    if not (ROOT / "benchmarks" / "bench_core.py").is_file():
        pytest.skip("no benchmarks/ in this tree")
    out = tmp_path / "bench.json"
    proc = run("bench", "--quick", "--json", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    figures = " ".join(row["figure"] for row in report["rows"] + report["settings_rows"])
    for needle in ("no-op tasks/s", "round trip", "CPU-bound", "blocking()", "time.sleep", "fib(14)",
                   "pin_workers", "plugin", "Barrier"):
        assert needle in figures
    barrier = [row for row in report["rows"] if "Barrier" in row["figure"]]
    assert barrier and all(row["met"] for row in barrier)  # calls that wait for each other complete
    nested = [row for row in report["rows"] if "fib(" in row["figure"]]
    assert nested and all(row["met"] for row in nested)  # cmwq completes; TPE shown deadlocked
    assert all("deadlocked" in row["b"] for row in nested)
