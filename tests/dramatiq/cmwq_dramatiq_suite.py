"""pytest plugin that runs Dramatiq's own tests on ``cmwq_exec.dramatiq.Worker``.

Loaded with ``-p cmwq_dramatiq_suite`` by ``run_dramatiq_suite.py`` (this directory on
``PYTHONPATH``), which says which worker to test (``CMWQ_DRAMATIQ_SUITE_WORKER``: ``cmwq`` or
``stock``).

Dramatiq's sdist ships its tests without their ``conftest.py`` and ``common.py``; this plugin is
what they need of them, written for this runner: the broker, worker, result-backend and
rate-limiter fixtures the tests name, and (imported by the ``tests/common.py`` the runner writes)
the ``worker`` context manager, the skip marks and the RabbitMQ credentials. The brokers are this
project's: RabbitMQ on 127.0.0.1 (guest), Redis database 9 for the broker and 10 for the result and
rate-limiter backends (flushed with FLUSHDB, never FLUSHALL: other tests share the server).
Memcached is not one of them: the backends' ``memcached`` parameters are not run.

The substitution happens at plugin load, before a test module is imported: ``dramatiq.Worker`` and
``dramatiq.worker.Worker`` become the cmwq worker (which subclasses Dramatiq's), and the command
line the CLI tests start is ``python -m cmwq_exec.dramatiq``. Each test checks that every worker it
built is the cmwq one, so a suite that silently fell back to Dramatiq's proves nothing and fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import dramatiq
import dramatiq.worker
import pika
import pytest
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.rate_limits import backends as rate_limit_backends
from dramatiq.results import backends as result_backends

WORKER = os.environ.get("CMWQ_DRAMATIQ_SUITE_WORKER", "cmwq")
BROKER_URL = "redis://127.0.0.1:6379/9"
BACKEND_URL = "redis://127.0.0.1:6379/10"
_DRAMATIQS = dramatiq.worker.Worker  # Dramatiq's own, which the cmwq worker subclasses

if WORKER == "cmwq":
    from cmwq_exec.dramatiq import Worker as _CmwqWorker

    dramatiq.Worker = _CmwqWorker  # type: ignore[misc]
    dramatiq.worker.Worker = _CmwqWorker  # type: ignore[misc]
    LAUNCHER = [sys.executable, "-m", "cmwq_exec.dramatiq"]
elif WORKER == "stock":
    LAUNCHER = [sys.executable, "-m", "dramatiq"]
else:
    raise pytest.UsageError(f"CMWQ_DRAMATIQ_SUITE_WORKER must be cmwq or stock, got {WORKER!r}")

logging.basicConfig(level=logging.INFO,
                    format="[%(asctime)s] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s")
logging.getLogger("pika").setLevel(logging.WARNING)

# -- what the tests import from tests/common.py -------------------------------------------------

RABBITMQ_USERNAME = os.getenv("RABBITMQ_USERNAME", "guest")
RABBITMQ_PASSWORD = os.getenv("RABBITMQ_PASSWORD", "guest")
RABBITMQ_CREDENTIALS = pika.credentials.PlainCredentials(RABBITMQ_USERNAME, RABBITMQ_PASSWORD)
skip_in_ci = pytest.mark.skipif(os.getenv("GITHUB_ACTION") is not None, reason="skipped in CI")
skip_on_windows = pytest.mark.skipif(platform.system() == "Windows", reason="skipped on Windows")
skip_on_pypy = pytest.mark.skipif(platform.python_implementation() == "PyPy",
                                  reason="time limits are not supported on PyPy")


def _rabbitmq_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


#: Skips a test when RabbitMQ does not answer, except under CI (``CI=true``), where it runs and fails.
skip_unless_rabbit_mq = pytest.mark.skipif(
    not _rabbitmq_answers() and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
    reason="RabbitMQ on 127.0.0.1:5672 does not answer")


@contextlib.contextmanager
def worker(*args: Any, **kwargs: Any) -> Iterator[Any]:
    """A started worker of the class under test, stopped on the way out."""
    built = dramatiq.Worker(*args, **kwargs)
    try:
        built.start()
        yield built
    finally:
        built.stop()


# -- fixtures ---------------------------------------------------------------------------------

_built: list[object] = []


@pytest.fixture(autouse=True)
def _worker_is_substituted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Record every worker a test builds; after it, each must be the one under test."""
    _built.clear()
    init = _DRAMATIQS.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        _built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(_DRAMATIQS, "__init__", recording_init)
    yield
    if WORKER == "cmwq":
        wrong = [type(w).__name__ for w in _built if not isinstance(w, _CmwqWorker)]
        assert not wrong, f"the test built workers that are not cmwq_exec.dramatiq.Worker: {wrong}"


def _redis(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"redis on 127.0.0.1:6379 does not answer: {exc}")
    return client


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    broker = StubBroker()
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    yield broker
    broker.flush_all()
    broker.close()


@pytest.fixture
def rabbitmq_broker() -> Iterator[RabbitmqBroker]:
    broker = RabbitmqBroker(host="127.0.0.1", max_priority=10, credentials=RABBITMQ_CREDENTIALS)
    try:
        broker.connection  # noqa: B018 (connects)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"RabbitMQ on 127.0.0.1:5672 does not answer: {exc}")
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    yield broker
    broker.flush_all()
    broker.close()


@pytest.fixture
def redis_broker() -> Iterator[RedisBroker]:
    client = _redis(BROKER_URL)
    client.flushdb()
    broker = RedisBroker(client=client)
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    yield broker
    client.flushdb()
    broker.close()


def _started(broker: Any, **kwargs: Any) -> Iterator[Any]:
    built = dramatiq.Worker(broker, **kwargs)
    built.start()
    yield built
    built.stop()


@pytest.fixture
def stub_worker(stub_broker: StubBroker) -> Iterator[Any]:
    yield from _started(stub_broker, worker_timeout=100, worker_threads=32)


@pytest.fixture
def rabbitmq_worker(rabbitmq_broker: RabbitmqBroker) -> Iterator[Any]:
    yield from _started(rabbitmq_broker, worker_threads=32)


@pytest.fixture
def redis_worker(redis_broker: RedisBroker) -> Iterator[Any]:
    yield from _started(redis_broker, worker_threads=32)


@pytest.fixture
def info_logging() -> Iterator[None]:
    logger = logging.getLogger()
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(logging.DEBUG)


@pytest.fixture
def start_cli() -> Iterator[Any]:
    """Start the command line of the worker under test on a broker module."""
    started: list[subprocess.Popen[bytes]] = []

    def run(broker_module: str, *, extra_args: list[str] | None = None,
            **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("bufsize", 0)
        proc = subprocess.Popen([*LAUNCHER, broker_module, *(extra_args or [])], **kwargs)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.terminate()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def redis_rate_limiter_backend() -> Any:
    _redis(BACKEND_URL).flushdb()
    return rate_limit_backends.RedisBackend(url=BACKEND_URL)


@pytest.fixture
def stub_rate_limiter_backend() -> Any:
    return rate_limit_backends.StubBackend()


@pytest.fixture(params=["redis", "stub"])
def rate_limiter_backend(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_rate_limiter_backend")


@pytest.fixture
def redis_result_backend() -> Any:
    _redis(BACKEND_URL).flushdb()
    return result_backends.RedisBackend(url=BACKEND_URL)


@pytest.fixture
def stub_result_backend() -> Any:
    return result_backends.StubBackend()


@pytest.fixture(params=["redis", "stub"])
def result_backend(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_result_backend")
