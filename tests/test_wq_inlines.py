"""The queueing hot path inlines a formula written elsewhere; this test holds the copy to it.

Choosing a submit's pool (``Queueing._pool_for``) inlines ``System.local_pool()``: the pool of the
CPU the caller runs on, another usable one while that CPU's pool is offline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cmwq_exec import WorkQueue


@pytest.fixture
def pinned() -> Iterator[Callable[[int], None]]:
    """``pin(cpu)``: the test's thread runs on ``cpu`` only, until the test ends."""
    before = os.sched_getaffinity(0)
    yield lambda cpu: os.sched_setaffinity(0, {cpu})
    os.sched_setaffinity(0, before)


def test_a_submit_goes_to_the_local_pool_as_system_local_pool_says(reset_system: Any,
                                                                   pinned: Callable[[int], None]) -> None:
    system = reset_system()
    wq = WorkQueue("inline-local")
    try:
        for cpu in sorted(os.sched_getaffinity(0)):
            if cpu not in system.cpu_pools:
                continue
            pinned(cpu)
            assert wq._pool_for(None) is system.local_pool() is system.cpu_pools[cpu]
            pool = system.cpu_pools[cpu]
            online = system.online_pools
            with pool.lock:
                pool.online = False  # as while its CPU is down: another usable pool takes the work
            with system.lock:
                system.online_pools = [p for p in online if p is not pool]
            try:
                assert wq._pool_for(None) is system.local_pool() is not pool
            finally:
                with system.lock:
                    system.online_pools = online
                with pool.lock:
                    pool.online = True
    finally:
        wq.destroy()
