"""Run Dramatiq's own tests (from the sdist of the installed Dramatiq) on the cmwq worker.

    python tests/dramatiq/run_dramatiq_suite.py [--worker cmwq|stock] [--keep DIR] [PYTEST ARGS...]

Downloads the sdist of exactly the installed Dramatiq version from the package index (``pip
download --no-deps --no-binary :all:``: a test dependency fetched at run time, nothing of
Dramatiq's is kept in this repository), unpacks its ``tests/`` into a temporary directory, and runs
pytest there on every test file but ``SKIPPED_FILES``, plus the remaining arguments.

The sdist leaves out the tests' ``conftest.py`` and ``common.py``: the runner writes a
``tests/__init__.py`` (the tests import ``.common``), a ``tests/common.py`` that takes its names from
the plugin ``cmwq_dramatiq_suite`` (beside this file), and no conftest: that plugin, loaded with
``-p``, has the fixtures. With ``--worker cmwq`` (the default) it makes ``cmwq_exec.dramatiq.Worker``
the worker every test builds and ``python -m cmwq_exec.dramatiq`` the command line the CLI tests
start; ``--worker stock`` runs the same tests on Dramatiq's own worker and ``dramatiq`` command, to
tell this worker's failures from the suite's. The tests that are not the cmwq worker's to pass are
deselected, each with its reason (``NOT_CMWQS``).

One run at a time: two runs share the Redis databases and the RabbitMQ queues. The tests that
stop the shared broker itself (``ALONE``) run only with ``--alone``, while nothing else uses it.
Needs RabbitMQ (127.0.0.1:5672, guest) and Redis (127.0.0.1:6379, databases 9 and 10; one test of
Dramatiq's own, ``test_redis_broker_can_connect_via_client``, makes its broker on database 0).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Test files of the sdist not run, and why.
SKIPPED_FILES = {
    "tests/test_watch.py": "the code-reloading watcher (needs dramatiq[watch], and builds a Redis "
                           "broker on database 0): the command line's, not the worker's",
}

#: Tests of the suite that are not the cmwq worker's to pass, and why.
NOT_CMWQS: dict[str, str] = {}

#: Tests of the suite that disturb the shared brokers, and how: deselected from a run unless it
#: asks for them alone (``--alone``), which CI does while no other environment runs.
ALONE = {
    "tests/test_rabbitmq.py::test_rabbitmq_workers_handle_rabbit_failures_gracefully":
        "stops and starts the RabbitMQ application (rabbitmqctl stop_app, start_app): every other "
        "connection to 127.0.0.1:5672 is closed and refused meanwhile",
}

COMMON = '''"""What Dramatiq's tests import from their common.py, which the sdist leaves out (written by
cmwq_exec's tests/dramatiq/run_dramatiq_suite.py)."""
from cmwq_dramatiq_suite import (  # noqa: F401
    RABBITMQ_CREDENTIALS, RABBITMQ_PASSWORD, RABBITMQ_USERNAME, skip_in_ci, skip_on_pypy,
    skip_on_windows, skip_unless_rabbit_mq, worker)
'''


def download_sdist(project: str, version: str, into: Path, wanted: tuple[str, ...]) -> Path:
    """Fetch ``project``'s ``version`` sdist into ``into`` and unpack the members whose path (below the
    sdist's top directory) starts with one of ``wanted``; return that top directory."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                    ":all:", f"{project}=={version}", "--dest", str(into)], check=True)
    sdists = [p for p in into.glob("*.tar.gz") if p.name.lower().startswith(f"{project.lower()}-")]
    if len(sdists) != 1:
        raise SystemExit(f"expected one {project} sdist in {into}, found {sorted(p.name for p in sdists)}")
    top = sdists[0].name.removesuffix(".tar.gz")
    prefixes = tuple(f"{top}/{w}" for w in wanted)
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefixes)]
        if not members:
            raise SystemExit(f"the {project} {version} sdist has none of {wanted}")
        tar.extractall(into, members=members, filter="data")
    return into / top


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("cmwq", "stock"), default="cmwq",
                        help="the worker the tests build (default: cmwq_exec.dramatiq.Worker)")
    parser.add_argument("--alone", action="store_true",
                        help="run only the tests that disturb the shared brokers (ALONE), which the "
                             "other runs deselect: run it while nothing else uses the brokers")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="unpack into DIR and leave it there (default: a temporary directory)")
    options, pytest_args = parser.parse_known_args(argv)
    version = importlib.metadata.version("dramatiq")
    with tempfile.TemporaryDirectory(prefix="cmwq-dramatiq-suite-") as scratch:
        into = options.keep or Path(scratch)
        into.mkdir(parents=True, exist_ok=True)
        root = download_sdist("dramatiq", version, into, ("tests/",))
        tests = root / "tests"
        (tests / "__init__.py").write_text("")
        (tests / "common.py").write_text(COMMON)
        env = dict(os.environ, CMWQ_DRAMATIQ_SUITE_WORKER=options.worker)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(root), env.get("PYTHONPATH")]))
        # Dramatiq's reload on SIGHUP re-executes "python -m dramatiq": the python of this environment
        env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
        files = sorted(str(p.relative_to(root)) for p in tests.glob("test_*.py")
                       if str(p.relative_to(root)) not in SKIPPED_FILES)
        if any(arg.startswith("tests/") for arg in pytest_args) or options.alone:
            files = []  # the tests asked for instead of the whole suite
        for skipped, why in SKIPPED_FILES.items():
            print(f"not run: {skipped}: {why}", flush=True)
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "cmwq_dramatiq_suite",
                   "--rootdir", str(root), *files]
        if options.alone:
            command += list(ALONE)
        else:
            command += [f"--deselect={test}" for test in ALONE]
            for test, why in ALONE.items():
                print(f"deselected {test} (run with --alone): {why}", flush=True)
        if options.worker == "cmwq":
            command += [f"--deselect={test}" for test in NOT_CMWQS]
            for test, why in NOT_CMWQS.items():
                print(f"deselected {test}: {why}", flush=True)
        print(f"dramatiq {version} tests in {root}, worker {options.worker}", flush=True)
        return subprocess.run(command + pytest_args, cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
