"""Run RQ's own worker tests (from the sdist of the installed RQ) on the cmwq worker.

    python tests/rq/run_rq_suite.py [--worker cmwq|stock] [--keep DIR] [PYTEST ARGS...]

Downloads the sdist of exactly the installed RQ version from the package index (``pip download
--no-deps --no-binary :all:``, as tests/huey/run_huey_suite.py does: nothing of RQ's is kept in
this repository), unpacks its ``tests/`` into a temporary directory, and runs pytest there on
``tests/test_worker.py`` (``SUITE``), its slow tests included (``RUN_SLOW_TESTS_TOO=1``), plus the
remaining arguments. RQ's tests need ``psutil``.

Redis: RQ's tests take the first empty database from 4 to 16 of ``Redis()`` (localhost:6379) and
flush it before and after every test. So that they never flush a database of the shared server,
they run against a ``redis-server`` of their own on a free port (tests/celery_suite's
``private_redis``), to which the plugin ``cmwq_rq_suite`` (beside this file) points every
``Redis()`` that names no port.

With ``--worker cmwq`` (the default) the plugin makes ``cmwq_exec.rq.Worker`` the ``Worker`` and
``SimpleWorker`` the tests build (``rq.Worker``, ``rq.SimpleWorker`` and their ``rq.worker``
names); ``--worker stock`` runs the same tests on RQ's own classes. The tests that are not the
cmwq worker's to pass are deselected, each with its reason (``NOT_CMWQS``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "huey"), str(HERE.parent / "celery_suite")]
from run_celery_suite import private_redis  # noqa: E402
from run_huey_suite import download_sdist  # noqa: E402

SUITE = ("tests/test_worker.py",)

#: Tests of the suite that are not the cmwq worker's to pass, and why.
NOT_CMWQS: dict[str, str] = {
    "tests/test_worker.py::TestWorkerSubprocess":
        "starts `rq worker` on redis://127.0.0.1:6379 (the shared server, not the suite's own)",
    "tests/test_worker.py::TestRoundRobinWorker":
        "tests RQ's RoundRobinWorker class, a forking Worker of its own, not substituted (the cmwq "
        "worker takes the strategy as work(dequeue_strategy='round_robin'))",
    "tests/test_worker.py::TestWorker::test_simpleworker_heartbeat_ttl":
        "expects SimpleWorker's worker-key TTL, longer than the job's timeout because SimpleWorker "
        "sends no heartbeat while a job runs; the cmwq worker sends them every job_monitoring_interval "
        "and uses RQ's Worker TTL, which test_get_heartbeat_ttl checks (the same class stands in for both)",
    "tests/test_worker.py::TestRandomWorker":
        "tests RQ's RandomWorker class (as above, dequeue_strategy='random')",
    "tests/test_worker.py::TestWorker::test_heartbeat_busy":
        "calls execute_job() by hand and expects the job finished, with the heartbeats RQ's horse "
        "monitor sent meanwhile, when it returns: the cmwq worker's returns once the pool has room "
        "for another job (this job blocked in time.sleep), and sends heartbeats from the pool",
    "tests/test_worker.py::WorkerShutdownTestCase::test_work_horse_death_sets_job_failed":
        "drives RQ's forking Worker by hand (fork_work_horse, monitor_work_horse): no work horse here",
    "tests/test_worker.py::WorkerShutdownTestCase::test_work_horse_force_death":
        "drives RQ's forking Worker by hand (fork_work_horse, monitor_work_horse): no work horse here",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("cmwq", "stock"), default="cmwq",
                        help="the worker the tests build (default: cmwq_exec.rq.Worker)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="unpack into DIR and leave it there (default: a temporary directory)")
    options, pytest_args = parser.parse_known_args(argv)
    version = importlib.metadata.version("rq")
    with tempfile.TemporaryDirectory(prefix="cmwq-rq-suite-") as scratch:
        into = options.keep or Path(scratch)
        into.mkdir(parents=True, exist_ok=True)
        root = download_sdist("rq", version, into, ("tests/",))
        with private_redis(Path(scratch)) as port:
            env = dict(os.environ, CMWQ_RQ_SUITE_WORKER=options.worker, CMWQ_RQ_SUITE_REDIS_PORT=str(port),
                       RUN_SLOW_TESTS_TOO="1")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
            command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "cmwq_rq_suite",
                       "--rootdir", str(root), *SUITE]
            for test, why in NOT_CMWQS.items():
                command.append(f"--deselect={test}")
                print(f"deselected {test}: {why}", flush=True)
            print(f"rq {version} worker tests in {root}, worker {options.worker}, redis port {port}",
                  flush=True)
            return subprocess.run(command + pytest_args, cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
