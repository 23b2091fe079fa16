"""Run Huey's own consumer tests (from the sdist of the installed Huey) on the cmwq consumer.

    python tests/huey/run_huey_suite.py [--consumer cmwq|stock] [--keep DIR] [PYTEST ARGS...]

Downloads the sdist of exactly the installed Huey version from the package index (``pip download
--no-deps --no-binary :all:``: a test dependency fetched at run time, nothing of Huey's is kept in
this repository), unpacks its ``huey/tests/`` into a temporary directory, and runs pytest there on
the files that exercise the consumer and its workers (``SUITE``), with ``HUEY_SLOW_TESTS=1`` so that
the shutdown tests run too, plus the remaining arguments.

The plugin ``cmwq_huey_suite`` (beside this file) puts the unpacked tests in front of the installed
``huey`` package's own copy (``huey.__path__``, so ``import huey`` is the installed Huey and
``huey.tests`` the sdist's) and, with ``--consumer cmwq`` (the default), makes
``cmwq_exec.huey.Consumer`` the consumer every test builds (``huey.consumer.Consumer``, what
``Huey.create_consumer`` returns). ``--consumer stock`` runs the same tests on Huey's own consumer,
to tell this consumer's failures from the suite's. The tests that are not the cmwq consumer's to
pass are deselected, each with its reason (``NOT_CMWQS``: the process worker type, which this
consumer refuses).

Every test of these files uses ``MemoryHuey`` or a SQLite file of its own: no Redis server is
needed (Huey's Redis tests, in test_storage.py, test Redis storage, not the consumer; they use
database 0 of localhost and flush it, so they are not run here).
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
SUITE = ("huey/tests/test_consumer.py", "huey/tests/test_signals.py")

#: Tests of the suite that are not the cmwq consumer's to pass, and why.
NOT_CMWQS = {
    "huey/tests/test_consumer.py::TestConsumerConfig::test_consumer_config":
        "builds a consumer with worker_type='process': the cmwq consumer runs threads only and "
        "refuses it (ConfigurationError)",
    "huey/tests/test_consumer.py::TestConsumerConfig::test_process_environment_uses_fork":
        "worker_type='process' (refused, as above)",
    "huey/tests/test_consumer.py::TestProcessWorkers::test_process_worker_integration":
        "worker_type='process' (refused, as above)",
}


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
    parser.add_argument("--consumer", choices=("cmwq", "stock"), default="cmwq",
                        help="the consumer the tests build (default: cmwq_exec.huey.Consumer)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="unpack into DIR and leave it there (default: a temporary directory)")
    options, pytest_args = parser.parse_known_args(argv)
    version = importlib.metadata.version("huey")
    with tempfile.TemporaryDirectory(prefix="cmwq-huey-suite-") as scratch:
        into = options.keep or Path(scratch)
        into.mkdir(parents=True, exist_ok=True)
        root = download_sdist("huey", version, into, ("huey/tests/",))
        env = dict(os.environ, HUEY_SLOW_TESTS="1", CMWQ_HUEY_SUITE_CONSUMER=options.consumer,
                   CMWQ_HUEY_SUITE_TESTS=str(root / "huey"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "cmwq_huey_suite",
                   "--rootdir", str(root), *SUITE]
        if options.consumer == "cmwq":
            command += [f"--deselect={test}" for test in NOT_CMWQS]
            for test, why in NOT_CMWQS.items():
                print(f"deselected {test}: {why}", flush=True)
        print(f"huey {version} consumer tests in {root}, consumer {options.consumer}", flush=True)
        return subprocess.run(command + pytest_args, cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
