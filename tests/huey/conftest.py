"""Fixtures for the Huey consumer's tests: an in-memory Huey for the in-process tests, a RedisHuey on
database 11 of the local Redis (the Celery tests use 13 and 14, the RQ tests 12) for the real-broker
ones. Huey not installed, or Redis not answering, skips those tests, except under CI (``CI=true``),
where it fails them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import in_ci

REDIS_URL = "redis://127.0.0.1:6379/11"


def _missing(why: str) -> None:
    if in_ci():
        pytest.fail(f"{why} (CI=true: install the test extra and start the brokers)")
    pytest.skip(why)


@pytest.fixture
def memory_huey() -> Any:
    """A fresh MemoryHuey (local time, as Huey's own tests use it)."""
    try:
        from huey import MemoryHuey
    except ImportError:
        _missing("huey is not installed (pip install -e '.[huey]')")
    return MemoryHuey(f"cmwq-test-{uuid.uuid4().hex[:8]}", utc=False)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The URL of database 11, which answers; the test's Huey names its queue after the test."""
    try:
        import huey  # noqa: F401
        import redis
    except ImportError:
        _missing("huey or redis is not installed (pip install -e '.[huey]')")
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        _missing(f"redis on 127.0.0.1:6379 does not answer: {exc}")
    yield REDIS_URL
