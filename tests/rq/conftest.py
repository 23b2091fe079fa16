"""Fixtures for the RQ worker's tests: a connection to database 12 of the local Redis (the Celery
tests use 13 and 14, the Huey tests 11) and a queue of the test's own, emptied after it. RQ not
installed, or Redis not answering, skips the tests, except under CI (``CI=true``), where it fails
them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import in_ci

REDIS_URL = "redis://127.0.0.1:6379/12"
HERE = Path(__file__).resolve().parent


def _missing(why: str) -> None:
    if in_ci():
        pytest.fail(f"{why} (CI=true: install the test extra and start the brokers)")
    pytest.skip(why)


@pytest.fixture
def connection() -> Any:
    try:
        import redis
        import rq  # noqa: F401
    except ImportError:
        _missing("rq is not installed (pip install -e '.[rq]')")
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=30)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        _missing(f"redis on 127.0.0.1:6379 does not answer: {exc}")
    return client


@pytest.fixture
def queue(connection: Any) -> Iterator[Any]:
    """A queue named after nothing else, and every key RQ made for it deleted after the test."""
    from rq import Queue

    name = f"cmwq-rq-{uuid.uuid4().hex[:10]}"
    yield Queue(name, connection=connection)
    keys = list(connection.scan_iter(f"*{name}*"))
    if keys:
        connection.delete(*keys)
