"""The executor state machine of test_model.py with CPU hotplug added: cpu_down/cpu_up (the explicit
API) interleave with submits, blocked calls, releases, cancels, flushes and shutdowns. The pools'
invariants hold after every step, and every call still runs exactly once or is visibly cancelled."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule
from test_model import ExecutorModel  # tests/ is on sys.path (rootdir-less test modules)

import cmwq_exec

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")]


class HotplugModel(ExecutorModel):
    @rule()
    def cpu_down(self) -> None:
        cmwq_exec.get_system().cpu_down(1)

    @rule()
    def cpu_up(self) -> None:
        cmwq_exec.get_system().cpu_up(1)

    @rule()
    def cpu_down_and_up(self) -> None:
        """Back up while the trustee may still be draining: RELEASE."""
        system = cmwq_exec.get_system()
        system.cpu_down(1)
        system.cpu_up(1)

    def teardown(self) -> None:
        try:
            cmwq_exec.get_system().cpu_up(1)
        finally:
            super().teardown()
        pool = cmwq_exec.get_system().cpu_pools[1]
        with pool.lock:
            assert pool.online


HotplugModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_hotplug_model = HotplugModel.TestCase
