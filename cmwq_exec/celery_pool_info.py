"""What the Celery pool shows of itself: ``inspect stats``, ``inspect active`` and its metrics endpoint.

This module owns the pool's outside views: the ``pool`` section of ``inspect stats`` (limits, task
counts, the cmwq pools and workqueue), the abandoned tasks added to ``inspect active``, and the
Prometheus endpoint (its address, checked with the name of the setting or variable it came from,
and the pool's own gauges beside the cmwq collector). The pool (cmwq_exec.celery) calls in here;
nothing here changes the pool's state.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from celery.exceptions import ImproperlyConfigured

from . import celery_processes

log = logging.getLogger("cmwq_exec.celery")

#: The environment variables, besides the app's settings, that configure the endpoint.
PORT_VARIABLE, ADDR_VARIABLE = "CMWQ_METRICS_PORT", "CMWQ_METRICS_ADDR"


def metrics_address(conf: Mapping[str, Any]) -> tuple[int, str] | None:
    """(port, address) of the metrics endpoint the worker is configured with, or None; a bad port
    is an ImproperlyConfigured naming where it came from and what is allowed."""
    port: Any = conf.get("cmwq_metrics_port")
    source = "the cmwq_metrics_port setting"
    if port in (None, ""):
        port, source = os.environ.get(PORT_VARIABLE), f"the environment variable {PORT_VARIABLE}"
    if port in (None, ""):
        return None
    addr = conf.get("cmwq_metrics_addr") or os.environ.get(ADDR_VARIABLE) or "127.0.0.1"
    try:
        number = int(port)
    except (TypeError, ValueError):
        number = -1
    if isinstance(port, bool) or not 0 <= number <= 65535 or (isinstance(port, float) and port != number):
        raise ImproperlyConfigured(
            f"{source} must be a TCP port number from 0 to 65535 (0 picks a free port), got {port!r}")
    return number, addr


def prefetch_window(conf: Mapping[str, Any]) -> int:
    """How many tasks per concurrency slot the consumer keeps in flight: Celery's
    ``worker_prefetch_multiplier`` (4 unless set to a whole number of at least 1)."""
    multiplier = conf.get("worker_prefetch_multiplier")
    if isinstance(multiplier, int) and not isinstance(multiplier, bool) and multiplier >= 1:
        return multiplier
    return 4


class MetricsServer:
    """The pool's Prometheus endpoint: the HTTP server and the pool's collector, while it runs."""

    def __init__(self) -> None:
        self.server: Any = None
        self.collector: Any = None
        self.registry: Any = None

    def start(self, address: tuple[int, str], child: int | None, counts: Callable[[], Any]) -> None:
        port, addr = address
        if child is not None:
            port, addr = 0, "127.0.0.1"  # the supervisor serves the worker's endpoint and reads ours
        try:
            from . import metrics
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"cmwq_metrics_port is set but cmwq_exec.metrics cannot be imported ({exc}); "
                "install prometheus_client") from exc
        from prometheus_client import REGISTRY

        self.server, _ = metrics.start_http_server(port, addr)
        self.collector, self.registry = metrics.TaskPoolCollector(counts), REGISTRY
        REGISTRY.register(self.collector)
        if child is not None:
            celery_processes.report_metrics_port(self.server.server_port)
            return
        log.info("cmwq_exec: serving Prometheus metrics on http://%s:%s/metrics", addr, port)

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        collector, self.collector = self.collector, None
        if collector is not None:
            self.registry.unregister(collector)


def task_counts(jobs: list[Any], held: int, limit: int, limits: tuple[int, int],
                timeouts: tuple[float | None, float | None]) -> dict[str, Any]:
    """The pool's limits and task counts from a snapshot of its jobs (``inspect stats``, metrics)."""
    from .celery_jobs import QUEUED, RUNNING

    max_active, max_running = limits
    return {
        "max-concurrency": limit,
        # the workqueue's limits: running tasks (-c plus abandoned ones), and all in flight
        # (the prefetch window), see "What -c means" in cmwq_exec.celery
        "max-running": max_running,
        "max-in-flight": max_active,
        "running": sum(1 for job in jobs if job.state is RUNNING and job.unwind is None),
        "queued": sum(1 for job in jobs if job.state is QUEUED),
        "held": held,
        "abandoned": sum(1 for job in jobs if job.unwind is not None),
        "timeouts": list(timeouts),
    }


def pool_stats(info: dict[str, Any], counts: Mapping[str, Any], child: int | None, wq: Any) -> None:
    """Complete the ``pool`` section of ``inspect stats``: ``counts`` (the pool's limits and task
    counts), the cmwq pools, the workqueue's counters, and the child's place in processes mode."""
    info.update(counts)
    try:
        from .core.system import get_system

        pools = [pool.stats() for pool in get_system().pools]
    except Exception as exc:  # stats must never break inspect
        pools = [{"error": repr(exc)}]
    if child is not None:
        cpu = int(os.environ.get(celery_processes.CHILD_CPU) or -1)
        info["cmwq-child"] = {"index": child, "cpu": cpu, "parent-pid": os.getppid()}
    info["workers"] = sum(p.get("nr_workers", 0) for p in pools)
    info["pools"] = pools
    if wq is not None:
        info["workqueue"] = wq.counters()


def show_abandoned_in_inspect_active() -> None:
    """Make ``inspect active`` list the abandoned tasks of a cmwq pool too (once per process).

    Celery lists ``worker_state.active_requests``, from which a task leaves when its hard limit
    is reported; a thread that swallowed the unwind still runs it. The command is wrapped, not
    replaced: it lists what Celery lists, then asks the consumer's pool for the entries it adds
    (``abandoned_active(safe)``), which other pools do not have."""
    from celery.worker import control

    original = control.Panel.data.get("active")
    if original is None or getattr(original, "cmwq_exec_wrapped", False):
        return

    @functools.wraps(original)
    def active(state: Any, safe: bool = False, **kwargs: Any) -> Any:
        listed = original(state, safe=safe, **kwargs)
        pool = getattr(getattr(state, "consumer", None), "pool", None)
        more = getattr(pool, "abandoned_active", None)
        if more is not None:
            listed = list(listed) + more(safe)
        return listed

    active.cmwq_exec_wrapped = True  # type: ignore[attr-defined]
    control.Panel.data["active"] = active
