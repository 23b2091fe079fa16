"""The pool treats every task as prefork does: checked against real brokers.

Each behaviour a worker applies to a task (which app runs it, expiry, revocation, ...) gets a test
here that runs it on this pool and checks the outcome prefork gives.
"""

from __future__ import annotations

import pytest
from app import POOL, make_app
from celery import Celery, _state

pytestmark = [pytest.mark.celery, pytest.mark.slow, pytest.mark.timeout(120)]


def test_tasks_run_with_the_workers_app_not_the_default_one(broker, queue, results_redis):
    """Two apps in one process: the worker's app is not the default app (a second embedded
    worker, a Django project's other app). Its tasks are found in its own registry and see it as
    ``current_app``, as in prefork's children."""
    import celery.contrib.testing.tasks  # noqa: F401 - registers celery.ping for the ping check
    from celery.contrib.testing.worker import start_worker

    worker_app = make_app(broker, queue=queue)
    other = Celery("other", set_as_current=False)
    previous_default = _state.default_app
    try:
        with start_worker(worker_app, pool=POOL, concurrency=2, perform_ping_check=False,
                          shutdown_timeout=30):
            other.set_default()  # from now on a thread without a current app gets ``other``
            t = worker_app.tasks
            assert "t.add" not in other.tasks
            assert t["t.add"].delay(2, 3).get(timeout=20) == 5
            assert t["t.current_app"].delay().get(timeout=20) == worker_app.main
    finally:
        _state.default_app = previous_default
        other.close()
        worker_app.close()
