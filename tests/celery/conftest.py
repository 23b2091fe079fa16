"""Fixtures for the Celery integration tests: real brokers, real ``celery worker`` processes.

* ``broker`` is parametrized over Redis and RabbitMQ; results always go to Redis (chords need a
  result backend). A broker that does not answer skips the test, except under CI (``CI=true``),
  where it fails: CI must have started it (``.ci/services.sh``).
* every test gets its own queue name, so no test sees another's messages, and its own worker
  node names; the queue is deleted at teardown.
* ``start_worker`` starts ``celery worker`` subprocesses; teardown kills every one still running.

The helpers live in celery_harness.py (a unique module name: every test directory may have a
``conftest``).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from app import DEFAULT_BACKEND, make_app  # noqa: E402
from celery_harness import BROKERS, Worker, broker_problem  # noqa: E402
from helpers import in_ci  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # pyproject registers them too; this keeps the directory runnable on its own.
    config.addinivalue_line("markers", "celery: starts celery worker processes against real brokers")
    config.addinivalue_line("markers", "slow: real-world tests (subprocesses, brokers)")


@pytest.fixture(scope="session")
def results_redis() -> Any:
    import redis

    problem = broker_problem("redis")
    if problem:
        if in_ci():
            pytest.fail(f"{problem} (CI=true: brokers must run; see .ci/services.sh)")
        pytest.skip(f"{problem} (start it with .ci/services.sh)")
    return redis.Redis.from_url(DEFAULT_BACKEND)


@pytest.fixture(params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest, results_redis: Any) -> str:
    """The broker URL, one test per broker."""
    problem = broker_problem(request.param)
    if problem:
        if in_ci():
            pytest.fail(f"{problem} (CI=true: brokers must run; see .ci/services.sh)")
        pytest.skip(f"{problem} (start it with .ci/services.sh)")
    return BROKERS[request.param]


@pytest.fixture
def queue() -> str:
    return f"cmwq-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def key() -> str:
    """A fresh Redis key prefix for the test's records."""
    return f"cmwq-test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def celery_app(broker: str, queue: str, results_redis: Any, key: str) -> Iterator[Any]:
    """The client side: an app on the test's broker and queue."""
    app = make_app(broker, queue=queue)
    try:
        yield app
    finally:
        try:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
        except Exception:  # noqa: BLE001 - best effort; the queue name is unique anyway
            pass
        for name in results_redis.scan_iter(key + "*"):
            results_redis.delete(name)
        app.close()


@pytest.fixture
def start_worker(celery_app: Any, broker: str, queue: str, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """``start_worker(concurrency=4, via="setting"|"custom", args=(...), env={...})`` -> a ready
    Worker. Every worker started is killed at teardown if still running."""
    started: list[Worker] = []

    def start(concurrency: int | None = 4, via: str = "setting", args: tuple[str, ...] = (),
              env: dict[str, str] | None = None, ready: bool = True) -> Worker:
        worker = Worker(celery_app, broker, queue, tmp_path / f"worker{len(started)}.log",
                        concurrency=concurrency, via=via, args=args, env=env or {})
        started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.kill()
