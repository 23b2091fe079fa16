"""pytest plugin that runs RQ's own worker tests on ``cmwq_exec.rq.Worker``.

Loaded with ``-p cmwq_rq_suite`` by ``run_rq_suite.py`` (this directory on ``PYTHONPATH``), which
names the port of the suite's own Redis server (``CMWQ_RQ_SUITE_REDIS_PORT``) and the worker to
test (``CMWQ_RQ_SUITE_WORKER``: ``cmwq`` or ``stock``).

At plugin load, before pytest imports a test module: ``redis.Redis()`` without a port (how RQ's
tests connect) gets the suite's server; with ``cmwq``, ``rq.Worker``, ``rq.SimpleWorker``,
``rq.worker.Worker`` and ``rq.worker.SimpleWorker`` become the cmwq worker, the names the tests
import. Each test that starts a worker's work loop then checks that it ran the cmwq worker, so a
suite that silently fell back to RQ's proves nothing and fails instead.
"""

from __future__ import annotations

import os

import pytest
import redis
import rq
import rq.worker

WORKER = os.environ.get("CMWQ_RQ_SUITE_WORKER", "cmwq")
PORT = os.environ.get("CMWQ_RQ_SUITE_REDIS_PORT")
if not PORT:
    raise pytest.UsageError("CMWQ_RQ_SUITE_REDIS_PORT is not set: run tests/rq/run_rq_suite.py")

_redis_init = redis.Redis.__init__


def _on_the_suites_server(self, *args, **kwargs):
    named = "port" in kwargs or "connection_pool" in kwargs or "unix_socket_path" in kwargs
    if not args and not named and kwargs.get("host", "localhost") in ("localhost", "127.0.0.1"):
        kwargs["port"] = int(PORT)
    _redis_init(self, *args, **kwargs)


redis.Redis.__init__ = _on_the_suites_server

_base_work = rq.worker.BaseWorker.work
_worked: list[type] = []

if WORKER == "cmwq":
    from cmwq_exec.rq import Worker

    rq.Worker = rq.SimpleWorker = Worker
    rq.worker.Worker = rq.worker.SimpleWorker = Worker
elif WORKER != "stock":
    raise pytest.UsageError(f"CMWQ_RQ_SUITE_WORKER must be cmwq or stock, got {WORKER!r}")


@pytest.fixture(autouse=True)
def _worker_is_substituted(monkeypatch: pytest.MonkeyPatch):
    """Record the class of every worker whose work loop a test starts; each must be the cmwq one."""
    _worked.clear()

    def work(self, *args, **kwargs):
        _worked.append(type(self))
        return _base_work(self, *args, **kwargs)

    monkeypatch.setattr(rq.worker.BaseWorker, "work", work)
    yield
    if WORKER == "cmwq":
        from cmwq_exec.rq import Worker

        wrong = sorted({cls.__name__ for cls in _worked if not issubclass(cls, Worker)})
        assert not wrong, f"the test ran workers that are not cmwq_exec.rq.Worker: {wrong}"
