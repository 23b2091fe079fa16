"""cmwq_exec.metrics: the scrape-time collector, its exposition, and the exporter."""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import urllib.request
import uuid
from typing import Any

import prometheus_client
import pytest
from helpers import in_ci
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import DuplicateTimeseries

import cmwq_exec
from cmwq_exec import Work, WorkQueue, blocking, metrics
from cmwq_exec.metrics import CMWQCollector, cumulative_buckets

POOL_METRICS = {
    "cmwq_pool_nr_running": "gauge",
    "cmwq_pool_idle_workers": "gauge",
    "cmwq_pool_workers": "gauge",
    "cmwq_pool_pending_works": "gauge",
    "cmwq_pool_sleep_seconds_avg": "gauge",
    "cmwq_pool_cm_wakeups": "counter",
    "cmwq_pool_cpu_intensive": "counter",
    "cmwq_pool_online": "gauge",
}
WQ_METRICS = {
    "cmwq_workqueue_works_started": "counter",
    "cmwq_workqueue_works_completed": "counter",
    "cmwq_workqueue_mayday": "counter",
    "cmwq_workqueue_rescued": "counter",
    "cmwq_workqueue_inflight": "gauge",
    "cmwq_workqueue_cpu_seconds": "counter",
    "cmwq_workqueue_cpu_intensive": "counter",
    "cmwq_workqueue_cm_wakeups": "counter",
    "cmwq_workqueue_queue_latency_seconds": "histogram",
    "cmwq_workqueue_execution_seconds": "histogram",
}


# -- a stand-in system with known numbers ------------------------------------------------------


def _hist(counts: list[int], total: float) -> dict[str, Any]:
    return {"buckets": (0.001, 0.01, 0.1, math.inf), "counts": counts, "sum": total}


class _Stats:
    def __init__(self, stats: dict[str, Any]) -> None:
        self._stats = stats

    def stats(self) -> dict[str, Any]:
        return self._stats


class _StubSystem:
    def __init__(self) -> None:
        self.timing_enabled = 0
        self.pools = [_Stats({"pool": "cpu0", "cpu": 0, "online": False, "nr_running": 1, "nr_idle": 2,
                              "nr_workers": 4, "nr_pending": 7, "cm_wakeups": 11, "cpu_intensive": 3,
                              "mayday": 5, "sleep_avg": 0.0125})]
        wq = {"workqueue": "wq", "started": 10, "completed": 9, "inflight": 1, "cpu_seconds": 0.25,
              "cpu_intensive": 2, "cm_wakeups": 6, "mayday": 1, "rescued": 4,
              "queue_latency": _hist([1, 2, 0, 3], 1.5), "execution": _hist([0, 0, 9, 0], 0.5)}
        self.workqueues = [_Stats(wq), _Stats(dict(wq, queue_latency=_hist([1, 0, 0, 0], 0.0005)))]

    def enable_timing(self) -> None:
        self.timing_enabled += 1


def _families(registry: CollectorRegistry) -> dict[str, Any]:
    text = metrics.generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    for family in families.values():
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError((sample_name, labels))


def test_cumulative_buckets_turns_per_bucket_counts_into_prometheus_buckets() -> None:
    buckets, count, total = cumulative_buckets(_hist([1, 2, 0, 3], 1.5))
    assert buckets == [("0.001", 1), ("0.01", 3), ("0.1", 3), ("+Inf", 6)]
    assert (count, total) == (6, 1.5)


@pytest.mark.parametrize("bad", [
    {"buckets": (0.1, math.inf), "counts": [1], "sum": 0.0},       # lengths differ
    {"buckets": (0.1, 1.0), "counts": [1, 1], "sum": 0.0},         # no +Inf bucket
])
def test_cumulative_buckets_rejects_malformed_histograms(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        cumulative_buckets(bad)


def test_collector_exports_every_documented_metric_with_types_help_and_labels() -> None:
    registry = CollectorRegistry()
    registry.register(CMWQCollector(_StubSystem()))
    families = _families(registry)
    for name, kind in {**POOL_METRICS, **WQ_METRICS}.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert len(families[name].documentation) > 20, name
        label = "pool" if name.startswith("cmwq_pool_") else "workqueue"
        assert all(label in sample.labels for sample in families[name].samples), name


def test_collector_reports_the_stats_numbers() -> None:
    registry = CollectorRegistry()
    registry.register(CMWQCollector(_StubSystem()))
    families = _families(registry)
    assert _value(families, "cmwq_pool_nr_running", pool="cpu0") == 1
    assert _value(families, "cmwq_pool_idle_workers", pool="cpu0") == 2
    assert _value(families, "cmwq_pool_workers", pool="cpu0") == 4
    assert _value(families, "cmwq_pool_pending_works", pool="cpu0") == 7
    assert _value(families, "cmwq_pool_sleep_seconds_avg", pool="cpu0") == 0.0125
    assert _value(families, "cmwq_pool_cm_wakeups_total", pool="cpu0") == 11
    assert _value(families, "cmwq_pool_cpu_intensive_total", pool="cpu0") == 3
    assert _value(families, "cmwq_pool_online", pool="cpu0") == 0
    # Two workqueues named "wq" are added up into one series.
    assert _value(families, "cmwq_workqueue_works_started_total", workqueue="wq") == 20
    assert _value(families, "cmwq_workqueue_rescued_total", workqueue="wq") == 8
    assert _value(families, "cmwq_workqueue_cpu_seconds_total", workqueue="wq") == 0.5
    assert _value(families, "cmwq_workqueue_queue_latency_seconds_bucket", workqueue="wq", le="0.001") == 2
    assert _value(families, "cmwq_workqueue_queue_latency_seconds_bucket", workqueue="wq", le="0.01") == 4
    assert _value(families, "cmwq_workqueue_queue_latency_seconds_bucket", workqueue="wq", le="+Inf") == 7
    assert _value(families, "cmwq_workqueue_queue_latency_seconds_count", workqueue="wq") == 7
    assert _value(families, "cmwq_workqueue_queue_latency_seconds_sum", workqueue="wq") == 1.5005
    assert _value(families, "cmwq_workqueue_execution_seconds_bucket", workqueue="wq", le="0.1") == 18


def test_creating_the_collector_enables_timing_and_registering_twice_is_refused() -> None:
    system = _StubSystem()
    registry = CollectorRegistry()
    registry.register(CMWQCollector(system))
    assert system.timing_enabled == 1
    with pytest.raises(DuplicateTimeseries):
        registry.register(CMWQCollector(system))


def test_registering_reads_no_pool_state() -> None:
    class Exploding:
        def stats(self) -> dict[str, Any]:
            raise AssertionError("describe() must not read stats")

    system = _StubSystem()
    system.pools = [Exploding()]
    CollectorRegistry().register(CMWQCollector(system))


def test_register_uses_get_system_and_enables_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    system = _StubSystem()
    monkeypatch.setattr(cmwq_exec.core.system, "get_system", lambda: system)
    registry = CollectorRegistry()
    collector = metrics.register(registry)
    assert metrics.register(registry) is collector  # idempotent per registry
    assert system.timing_enabled >= 1
    assert _value(_families(registry), "cmwq_pool_workers", pool="cpu0") == 4


# -- the real thing -----------------------------------------------------------------------------


def _run_works(name: str, n: int) -> WorkQueue:
    wq = WorkQueue(name)
    done = threading.Barrier(n + 1, timeout=30)

    def work() -> None:
        with blocking():
            done.wait()

    for _ in range(n):
        assert wq.queue_work(Work(work))
    done.wait()  # all n run at once: each blocked one made the pool start another worker
    wq.flush()
    return wq


def test_real_workload_shows_in_the_exposition() -> None:
    registry = CollectorRegistry()
    metrics.register(registry)  # turns timing on before the works run
    name = f"metrics_test_{uuid.uuid4().hex[:8]}"
    wq = _run_works(name, 4)
    try:
        families = _families(registry)
        assert _value(families, "cmwq_workqueue_works_started_total", workqueue=name) == 4
        assert _value(families, "cmwq_workqueue_works_completed_total", workqueue=name) == 4
        assert _value(families, "cmwq_workqueue_inflight", workqueue=name) == 0
        assert _value(families, "cmwq_workqueue_queue_latency_seconds_count", workqueue=name) == 4
        assert _value(families, "cmwq_workqueue_execution_seconds_count", workqueue=name) == 4
        assert _value(families, "cmwq_workqueue_cm_wakeups_total", workqueue=name) >= 1

        pools = {s.labels["pool"] for s in families["cmwq_pool_workers"].samples}
        system = cmwq_exec.get_system()
        assert pools == {pool.stats()["pool"] for pool in system.pools}
        assert "unbound" in pools
        assert sum(s.value for s in families["cmwq_pool_workers"].samples) >= 4
        assert all(s.value == 1 for s in families["cmwq_pool_online"].samples)
    finally:
        wq.destroy()


def test_promtool_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if in_ci():
            pytest.fail("promtool is missing in CI: .ci/install-prometheus.sh should install it")
        pytest.skip("promtool is not installed (run .ci/install-prometheus.sh)")
    wq = _run_works(f"promtool_test_{uuid.uuid4().hex[:8]}", 2)
    try:
        registry = CollectorRegistry()
        metrics.register(registry)
        exposition = metrics.generate_latest(registry)
        assert b"cmwq_workqueue_queue_latency_seconds_bucket" in exposition
        result = subprocess.run([promtool, "check", "metrics"], input=exposition,
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
        assert result.stdout.strip() == b"" and result.stderr.strip() == b"", result
    finally:
        wq.destroy()


def test_promtool_rejects_a_bad_exposition() -> None:
    """The promtool check above can fail: a counter without _total is a lint problem."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    bad = b"# HELP cmwq_bad A counter.\n# TYPE cmwq_bad counter\ncmwq_bad 1\n"
    result = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, timeout=60)
    assert result.returncode != 0


# -- the exporter -------------------------------------------------------------------------------


@pytest.mark.parametrize("port, error", [
    (-1, ValueError), (65536, ValueError), ("9464", TypeError), (9464.0, TypeError), (True, TypeError),
    (None, TypeError),
])
def test_start_http_server_validates_the_port(port: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="port must be"):
        metrics.start_http_server(port, registry=CollectorRegistry())


def test_start_http_server_serves_on_loopback_by_default() -> None:
    registry = CollectorRegistry()
    server, thread = metrics.start_http_server(0, registry=registry)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
        assert "# TYPE cmwq_pool_workers gauge" in body
        assert 'cmwq_pool_workers{pool="unbound"}' in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_start_http_server_reports_a_port_in_use() -> None:
    registry = CollectorRegistry()
    server, thread = metrics.start_http_server(0, registry=registry)
    try:
        with pytest.raises(OSError, match="cannot serve metrics on 127.0.0.1"):
            metrics.start_http_server(server.server_address[1], registry=registry)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _samples(registry: CollectorRegistry, name: str) -> int:
    text = prometheus_client.generate_latest(registry).decode()
    return sum(1 for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)


@pytest.mark.parametrize("order", ["by hand first", "register() first"])
def test_registering_by_hand_and_through_register_exports_the_metrics_once(
    order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = _StubSystem()
    monkeypatch.setattr(cmwq_exec.core.system, "get_system", lambda: system)
    registry = CollectorRegistry()
    by_hand = CMWQCollector()
    if order == "by hand first":
        registry.register(by_hand)
        assert metrics.register(registry) is by_hand
    else:
        metrics.register(registry)
        registry.register(by_hand)  # no DuplicateTimeseries
        assert metrics.register(registry) is by_hand
    assert metrics.register(registry) is by_hand
    assert _samples(registry, "cmwq_pool_workers") == len(system.pools)


def test_start_http_server_after_registering_by_hand_serves_the_metrics_once() -> None:
    registry = CollectorRegistry()
    registry.register(CMWQCollector())
    server, _thread = metrics.start_http_server(0, registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        server.shutdown()
    assert text.count("# TYPE cmwq_pool_workers gauge") == 1
