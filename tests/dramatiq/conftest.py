"""Fixtures for the Dramatiq worker's tests: a StubBroker for the in-process tests; Redis database 8
(the Celery tests use 13 and 14, Huey's 11, RQ's 12, Dramatiq's own suite 9 and 10) and RabbitMQ for
the real-broker ones, with queue names of their own. Dramatiq not installed, or a broker not
answering, skips those tests, except under CI (``CI=true``), where it fails them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import in_ci

REDIS_URL = "redis://127.0.0.1:6379/8"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672"


def missing(why: str) -> None:
    if in_ci():
        pytest.fail(f"{why} (CI=true: install the test extra and start the brokers)")
    pytest.skip(why)


@pytest.fixture
def dramatiq_module() -> Any:
    try:
        import dramatiq
    except ImportError:
        missing("dramatiq is not installed (pip install -e '.[dramatiq]')")
    return dramatiq


@pytest.fixture
def stub_broker(dramatiq_module: Any) -> Iterator[Any]:
    """A StubBroker with Dramatiq's default middleware, booted, and the global broker."""
    from dramatiq.brokers.stub import StubBroker

    broker = StubBroker()
    broker.emit_after("process_boot")
    dramatiq_module.set_broker(broker)
    yield broker
    broker.flush_all()
    broker.close()


def real_broker(kind: str) -> Any:
    """A Redis (database 8) or RabbitMQ broker that answers, booted, and the global broker."""
    import dramatiq

    if kind == "redis":
        import redis
        from dramatiq.brokers.redis import RedisBroker

        try:
            redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
        except Exception as exc:  # noqa: BLE001
            missing(f"redis on 127.0.0.1:6379 does not answer: {exc}")
        broker = RedisBroker(url=REDIS_URL)
    else:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = RabbitmqBroker(url=RABBITMQ_URL)
        try:
            broker.connection  # noqa: B018 (connects)
        except Exception as exc:  # noqa: BLE001
            missing(f"RabbitMQ on 127.0.0.1:5672 does not answer: {exc}")
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    return broker


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, dramatiq_module: Any) -> Iterator[Any]:
    """Each real broker in turn; the test's queues are deleted after it."""
    made = real_broker(request.param)
    made.kind = request.param
    yield made
    made.flush_all()
    if request.param == "rabbitmq":
        for name in list(made.queues):
            made.channel.queue_delete(name)
    made.close()


@pytest.fixture
def queue_name() -> str:
    return f"cmwq_dq_{uuid.uuid4().hex[:10]}"
