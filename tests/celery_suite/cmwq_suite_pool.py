"""pytest plugin that runs Celery's own integration suite on ``cmwq_exec.celery:TaskPool``.

Loaded with ``-p cmwq_suite_pool`` by ``run_celery_suite.py`` (this directory on ``PYTHONPATH``),
which names the pool in ``CMWQ_CELERY_SUITE_POOL``: ``cmwq_exec.celery:TaskPool``, or ``prefork``
to run the same harness on Celery's own pool.

The pool: Celery's ``t/integration/conftest.py`` names the embedded test worker's pool in the
session fixture ``celery_worker_pool`` (``'prefork'``), and ``celery.contrib.pytest``'s
``celery_session_worker`` starts the worker with it. A fixture in a conftest beats a plugin's
fixture of the same name, so this plugin overrides it the way pytest lets anything override a
fixture without touching its file: direct parametrization of the argument, one value at session
scope, for every test whose fixtures reach it (the test ids get ``[cmwq]`` or ``[prefork]``).
Each test that uses the worker checks that it really runs that pool, so a suite that silently fell
back to another pool fails instead of proving nothing.

The garbage of earlier tests: each test starts after a full ``gc.collect()``. The suite's
``test_asyncresult_*_cancels_subscription`` compare Redis's ``PUBSUB CHANNELS`` before and right
after ``add.delay()``, expecting exactly one new channel. An ``AsyncResult`` of an earlier test that
is garbage in a reference cycle still holds its subscription until the collector frees it, and its
``__del__`` then unsubscribes (``cancel_for``): when that happens between the two reads, a channel
of the first read is missing from the second and the test fails. The collector runs whenever
allocations reach its threshold, in whatever thread allocates: the worker's tasks running in this
process (as with this pool) make that likely, but prefork fails the same way when the collector
runs at that point (gc disabled over the earlier tests and run right after the publish: both
tests fail with the same message). Collecting before each test leaves no such garbage behind.
"""

from __future__ import annotations

import gc
import os

import pytest

POOL_VARIABLE = "CMWQ_CELERY_SUITE_POOL"
POOLS = {"cmwq_exec.celery:TaskPool": "cmwq", "prefork": "prefork"}


def _pool() -> str:
    pool = os.environ.get(POOL_VARIABLE, "")
    if pool not in POOLS:
        raise pytest.UsageError(f"{POOL_VARIABLE} must be one of {sorted(POOLS)}, got {pool!r}")
    return pool


def pytest_configure(config: pytest.Config) -> None:
    _pool()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "celery_worker_pool" in metafunc.fixturenames:
        pool = _pool()
        metafunc.parametrize("celery_worker_pool", [pool], ids=[POOLS[pool]], scope="session")


@pytest.fixture(autouse=True)
def _no_garbage_of_earlier_tests() -> None:
    gc.collect()


@pytest.fixture(autouse=True)
def _worker_runs_the_pool(request: pytest.FixtureRequest) -> None:
    if "celery_session_worker" not in request.fixturenames:
        return
    from celery.concurrency import get_implementation

    expected = get_implementation(_pool())
    worker = request.getfixturevalue("celery_session_worker")
    assert type(worker.pool) is expected, f"the test worker runs {type(worker.pool)!r}, not {expected!r}"
