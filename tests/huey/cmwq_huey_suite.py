"""pytest plugin that runs Huey's own consumer tests on ``cmwq_exec.huey.Consumer``.

Loaded with ``-p cmwq_huey_suite`` by ``run_huey_suite.py`` (this directory on ``PYTHONPATH``),
which says where it unpacked the sdist's ``huey/tests`` (``CMWQ_HUEY_SUITE_TESTS``) and which
consumer to test (``CMWQ_HUEY_SUITE_CONSUMER``: ``cmwq`` or ``stock``).

The substitution happens here, at plugin load, before pytest imports a test module: the tests take
the consumer from ``huey.consumer.Consumer`` (``from huey.consumer import Consumer``, and
``TestConsumer`` subclasses it) and from ``Huey.create_consumer`` (``huey.api.Consumer``); both names
are made the cmwq consumer, which itself subclasses Huey's. Each test then checks that the consumer
it built is really the cmwq one, so a suite that silently fell back to Huey's proves nothing and
fails instead.
"""

from __future__ import annotations

import os

import huey
import huey.api
import huey.consumer
import pytest

CONSUMER = os.environ.get("CMWQ_HUEY_SUITE_CONSUMER", "cmwq")
TESTS = os.environ.get("CMWQ_HUEY_SUITE_TESTS")

if not TESTS:
    raise pytest.UsageError("CMWQ_HUEY_SUITE_TESTS is not set: run tests/huey/run_huey_suite.py")
huey.__path__.insert(0, TESTS)  # huey.tests is the sdist's, the rest the installed Huey
_HUEYS = huey.consumer.Consumer  # Huey's own, which the cmwq consumer subclasses

if CONSUMER == "cmwq":
    from cmwq_exec.huey import Consumer

    huey.consumer.Consumer = Consumer
    huey.api.Consumer = Consumer
elif CONSUMER != "stock":
    raise pytest.UsageError(f"CMWQ_HUEY_SUITE_CONSUMER must be cmwq or stock, got {CONSUMER!r}")

_built: list[object] = []


@pytest.fixture(autouse=True)
def _consumer_is_substituted(monkeypatch: pytest.MonkeyPatch):
    """Record every consumer a test builds; after it, each must be the one under test."""
    _built.clear()
    init = _HUEYS.__init__

    def recording_init(self, *args, **kwargs):
        _built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(_HUEYS, "__init__", recording_init)
    yield
    if CONSUMER == "cmwq" and _built:
        from cmwq_exec.huey import Consumer

        wrong = [type(c).__name__ for c in _built if not isinstance(c, Consumer)]
        assert not wrong, f"the test built consumers that are not cmwq_exec.huey.Consumer: {wrong}"
