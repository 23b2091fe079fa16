"""Run Celery's own integration tests (from the sdist of the installed Celery) on this pool.

    python tests/celery_suite/run_celery_suite.py [--pool cmwq|prefork] [--keep DIR] [PYTEST ARGS...]

Downloads the sdist of exactly the installed Celery version from the package index (``pip download
--no-deps --no-binary :all:``: a test dependency fetched at run time, nothing of Celery's is kept
in this repository), unpacks its ``t/`` tests and ``pyproject.toml`` (their pytest settings:
``--strict-markers``, ``xfail_strict``) into a temporary directory, and runs pytest there with the
remaining arguments (the test files, ``--deselect``s: see tox.ini's ``celery-suite``). Only ``t/``
is unpacked, so ``import celery`` is the installed Celery, not the sdist's copy.

The plugin ``cmwq_suite_pool`` (beside this file) makes the embedded test worker run
``cmwq_exec.celery:TaskPool`` (``--pool cmwq``, the default) or Celery's own prefork pool
(``--pool prefork``: the same tests and harness, to tell this pool's failures from the suite's).

Redis is broker (database 1) and result backend (database 0, where the suite's tests also read the
backend's keys through ``t.integration.tasks.get_redis_connection``: ``REDIS_HOST``/``REDIS_PORT``)
on a ``redis-server`` of the suite's own, started on a free port for the run and stopped after it.
A server of its own, not databases of the shared one: several of the suite's tests compare
``PUBSUB CHANNELS`` before and after a call, and channels are server-wide, so the result
subscriptions of any other Redis client (another test run beside this one) would show up in them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
POOLS = {"cmwq": "cmwq_exec.celery:TaskPool", "prefork": "prefork"}
REDIS_START_TIMEOUT = 20.0  # seconds; a cold start takes milliseconds, a loaded machine longer


def download_tests(version: str, into: Path) -> Path:
    """Fetch Celery ``version``'s sdist and unpack its ``t/`` and ``pyproject.toml`` under ``into``;
    return the directory to run pytest in."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"celery=={version}", "--dest", str(into)], check=True)
    sdists = list(into.glob("celery-*.tar.gz"))
    if len(sdists) != 1:
        raise SystemExit(f"expected one celery sdist in {into}, found {sorted(p.name for p in sdists)}")
    top = f"celery-{version}"
    wanted = (f"{top}/t/", f"{top}/pyproject.toml")
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(into, members=members, filter="data")
    root = into / top
    if not (root / "t" / "integration" / "conftest.py").is_file():
        raise SystemExit(f"the celery {version} sdist has no t/integration/conftest.py")
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_redis(directory: Path) -> Iterator[int]:
    """A ``redis-server`` on a free port of 127.0.0.1, no persistence, for the block; yields the port."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (Debian: apt-get install redis-server)")
    port = free_port()
    server = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(directory)],
                              stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"redis-server on port {port} did not answer within "
                                     f"{REDIS_START_TIMEOUT} s (exit code {server.poll()})") from None
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", choices=("cmwq", "prefork"), default="cmwq",
                        help="the embedded test worker's pool (default: cmwq_exec.celery:TaskPool)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="unpack into DIR and leave it there (default: a temporary directory)")
    options, pytest_args = parser.parse_known_args(argv)
    version = importlib.metadata.version("celery")
    env = dict(os.environ)
    # celery.contrib.pytest holds the fixtures their conftest builds on (celery_parameters...); the
    # installed Celery does not register it as a pytest plugin by itself.
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "celery.contrib.pytest"]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["CMWQ_CELERY_SUITE_POOL"] = POOLS[options.pool]
    command += ["-p", "cmwq_suite_pool"]
    with tempfile.TemporaryDirectory(prefix="cmwq-celery-suite-") as scratch:
        into = options.keep or Path(scratch)
        into.mkdir(parents=True, exist_ok=True)
        root = download_tests(version, into)
        with private_redis(Path(scratch)) as port:
            env.update(TEST_BROKER=f"redis://127.0.0.1:{port}/1", TEST_BACKEND=f"redis://127.0.0.1:{port}/0",
                       REDIS_HOST="127.0.0.1", REDIS_PORT=str(port))
            print(f"celery {version} integration tests in {root}, pool {options.pool}, "
                  f"broker {env['TEST_BROKER']}, backend {env['TEST_BACKEND']}", flush=True)
            return subprocess.run(command + pytest_args, cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
