"""Prometheus metrics for cmwq_exec: a collector read at scrape time.

Nothing here runs on the hot path.  The pools and workqueues keep plain
integer counters under their own locks (see ``WorkerPool.stats()`` and
``WorkQueue.stats()``); :class:`CMWQCollector` reads those dicts only when
Prometheus scrapes, and turns them into metric families.  A process that is
never scraped pays nothing for this module beyond importing it.

Typical use::

    from cmwq_exec import metrics
    server, thread = metrics.start_http_server(9464)        # 127.0.0.1 only

or, in a process that already runs an exporter::

    from prometheus_client import REGISTRY
    from cmwq_exec.metrics import CMWQCollector
    REGISTRY.register(CMWQCollector())     # or metrics.register(REGISTRY): either way, once

Per pool (label ``pool``: ``cpu0``, ``cpu1``, ..., ``unbound``) and per
workqueue (label ``workqueue``: its name) the names below are exported; the
help text of each says what it counts.  Counters carry the ``_total`` suffix
and times are in seconds, as Prometheus' naming conventions ask.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, CollectorRegistry
from prometheus_client.utils import floatToGoString

__all__ = [
    "ADDR_VARIABLE",
    "CMWQCollector",
    "DEFAULT_PORT",
    "PORT_VARIABLE",
    "address_from_environment",
    "TaskPoolCollector",
    "generate_latest",
    "register",
    "start_http_server",
]

#: The port that ``cmwq-exec top`` reads by default (``http://127.0.0.1:9464/metrics``).
#: Nothing binds it unless you call :func:`start_http_server` with it.
DEFAULT_PORT = 9464

#: The environment variables that ask a worker front-end (Huey, RQ, Dramatiq; the Celery pool reads
#: its app's settings first) for a metrics endpoint, and the address it binds.
PORT_VARIABLE, ADDR_VARIABLE = "CMWQ_METRICS_PORT", "CMWQ_METRICS_ADDR"


def address_from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """(port, address) from ``CMWQ_METRICS_PORT`` / ``CMWQ_METRICS_ADDR``, or None if no port is
    set; a bad port is a ValueError naming the variable and what is allowed."""
    env = os.environ if environ is None else environ
    raw = env.get(PORT_VARIABLE, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) > 65535:
        raise ValueError(f"{PORT_VARIABLE} must be a TCP port number from 0 to 65535 (0 picks a free "
                         f"port), got {raw!r}")
    return int(raw), env.get(ADDR_VARIABLE) or "127.0.0.1"


# (metric name without _total, help, key in WorkerPool.stats())
_POOL_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("cmwq_pool_nr_running",
     "Workers of the pool that are runnable right now (not blocked); concurrency "
     "management wakes another worker only when this is 0 and works are pending.",
     "nr_running"),
    ("cmwq_pool_idle_workers", "Workers of the pool waiting for work on its idle list.", "nr_idle"),
    ("cmwq_pool_workers", "Worker threads the pool has (idle, busy and the manager).", "nr_workers"),
    ("cmwq_pool_pending_works", "Works queued on the pool's worklist and not yet started.", "nr_pending"),
    ("cmwq_pool_sleep_seconds_avg",
     "Moving average of how long a blocking() sleep of the pool's workers lasts; beyond "
     "unpaced_workers, creation waits while most busy workers slept less than twice this.",
     "sleep_avg"),
)
_POOL_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("cmwq_pool_cm_wakeups",
     "Workers woken by concurrency management because the last running worker of the "
     "pool blocked while works were pending.",
     "cm_wakeups"),
    ("cmwq_pool_cpu_intensive",
     "Works of the pool found hogging the CPU (longer than cpu_intensive_thresh without "
     "sleeping) and excluded from concurrency management.",
     "cpu_intensive"),
    ("cmwq_pool_mayday",
     "Mayday calls of the pool: worker creation stalled and rescuers were summoned.",
     "mayday"),
    ("cmwq_pool_creations_paced",
     "Worker creations the pool put off because a runner came back within create_interval, "
     "or most of its sleepers were due back (beyond unpaced_workers).",
     "paced"),
    ("cmwq_pool_workers_adopted",
     "Idle workers the pool took from another pool instead of creating a thread.",
     "adopted"),
)

_WQ_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("cmwq_workqueue_works_started", "Works of the workqueue that started executing.", "started"),
    ("cmwq_workqueue_works_completed", "Works of the workqueue that finished executing.", "completed"),
    ("cmwq_workqueue_cpu_seconds",
     "CPU time, in seconds, that the workqueue's works consumed on their worker threads.",
     "cpu_seconds"),
    ("cmwq_workqueue_cpu_intensive",
     "Works of the workqueue marked CPU-intensive (ran longer than cpu_intensive_thresh "
     "without sleeping).",
     "cpu_intensive"),
    ("cmwq_workqueue_cm_wakeups",
     "Workers woken by concurrency management while running this workqueue's works.",
     "cm_wakeups"),
    ("cmwq_workqueue_mayday",
     "Mayday requests sent to this workqueue's rescuer because worker creation stalled.",
     "mayday"),
    ("cmwq_workqueue_rescued", "Works of this workqueue executed by its rescuer thread.", "rescued"),
)
_WQ_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("cmwq_workqueue_inflight", "Works of the workqueue queued or running: not yet finished.", "inflight"),
)
_WQ_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("cmwq_workqueue_queue_latency_seconds",
     "Time from queueing a work to a worker starting it, in seconds (recorded only while "
     "timing is enabled).",
     "queue_latency"),
    ("cmwq_workqueue_execution_seconds",
     "Time a work spent executing on its worker, in seconds (recorded only while timing "
     "is enabled).",
     "execution"),
)


def cumulative_buckets(histogram: Mapping[str, Any]) -> tuple[list[tuple[str, float]], float, float]:
    """Turn a stats histogram into Prometheus buckets.

    ``histogram`` is ``{"buckets": upper bounds (ascending, last is inf),
    "counts": per-bucket counts (not cumulative), "sum": float}`` as in the
    stats dicts.  Returns ``(buckets, count, sum)`` where ``buckets`` is a
    list of ``(le, cumulative count)`` ending with ``("+Inf", count)``, as
    :class:`HistogramMetricFamily` wants it.
    """
    bounds: Sequence[float] = histogram["buckets"]
    counts: Sequence[int] = histogram["counts"]
    if len(bounds) != len(counts):
        raise ValueError(f"histogram has {len(bounds)} bounds but {len(counts)} counts")
    if not bounds or not math.isinf(bounds[-1]):
        raise ValueError("histogram bounds must end with +inf")
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, counts, strict=True):
        running += count
        buckets.append((floatToGoString(bound), running))
    return buckets, running, float(histogram["sum"])


def _merge_by_name(stats: Iterable[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    """Sum stats dicts that share a label value, keeping first-seen order.

    Two live workqueues may carry the same name; Prometheus must not see the
    same label set twice, so their numbers are added up.
    """
    merged: dict[str, dict[str, Any]] = {}
    for entry in stats:
        name = str(entry[key])
        into = merged.get(name)
        if into is None:
            merged[name] = {
                k: ({"buckets": tuple(v["buckets"]), "counts": list(v["counts"]), "sum": v["sum"]}
                    if isinstance(v, Mapping) else v)
                for k, v in entry.items()
            }
            continue
        for k, v in entry.items():
            if isinstance(v, Mapping):
                if tuple(v["buckets"]) != into[k]["buckets"]:
                    raise ValueError(f"workqueues named {name!r} use different {k} buckets")
                into[k]["counts"] = [a + b for a, b in zip(into[k]["counts"], v["counts"], strict=True)]
                into[k]["sum"] += v["sum"]
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != key:
                into[k] += v
    return list(merged.values())


class CMWQCollector:
    """A Prometheus collector for the pools and workqueues of cmwq_exec.

    Register it with any :class:`~prometheus_client.CollectorRegistry`::

        REGISTRY.register(CMWQCollector())

    Creating the collector turns on per-work timing
    (``get_system().enable_timing()``), which feeds the latency and execution
    histograms; without it they stay empty.  ``system`` is the object to read
    (anything with ``.pools`` and ``.workqueues`` whose items have
    ``.stats()``); by default ``cmwq_exec.get_system()`` is read at each
    scrape.
    """

    def __init__(self, system: Any | None = None) -> None:
        self._system = system
        target = system if system is not None else _get_system()
        enable_timing = getattr(target, "enable_timing", None)
        if enable_timing is not None:
            enable_timing()

    def describe(self) -> Iterator[Metric]:
        """Yield the families this collector exports, without samples.

        The registry uses this at registration to reject duplicate names; it
        does not touch the pools.
        """
        return self._families()

    def collect(self) -> Iterator[Metric]:
        """Read every pool's and workqueue's stats and yield the families."""
        system = self._system if self._system is not None else _get_system()
        pool_stats = [pool.stats() for pool in list(system.pools)]
        wq_stats = _merge_by_name((wq.stats() for wq in list(system.workqueues)), "workqueue")
        return self._families(pool_stats, wq_stats)

    def _families(
        self,
        pool_stats: Sequence[Mapping[str, Any]] = (),
        wq_stats: Sequence[Mapping[str, Any]] = (),
    ) -> Iterator[Metric]:
        for name, doc, key in _POOL_GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["pool"])
            for stats in pool_stats:
                gauge.add_metric([str(stats["pool"])], stats[key])
            yield gauge
        for name, doc, key in _POOL_COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["pool"])
            for stats in pool_stats:
                counter.add_metric([str(stats["pool"])], stats.get(key, 0))
            yield counter
        online = GaugeMetricFamily(
            "cmwq_pool_online",
            "1 if the pool's CPU is online (the pool runs bound to it), 0 while its CPU is "
            "down and the pool is drained or runs unbound; always 1 for the unbound pool.",
            labels=["pool"],
        )
        for stats in pool_stats:
            online.add_metric([str(stats["pool"])], 1 if stats["online"] else 0)
        yield online

        for name, doc, key in _WQ_COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["workqueue"])
            for stats in wq_stats:
                counter.add_metric([stats["workqueue"]], stats[key])
            yield counter
        for name, doc, key in _WQ_GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["workqueue"])
            for stats in wq_stats:
                gauge.add_metric([stats["workqueue"]], stats[key])
            yield gauge
        for name, doc, key in _WQ_HISTOGRAMS:
            histogram = HistogramMetricFamily(name, doc, labels=["workqueue"])
            for stats in wq_stats:
                buckets, _count, total = cumulative_buckets(stats[key])
                histogram.add_metric([stats["workqueue"]], buckets, total)
            yield histogram


class TaskPoolCollector:
    """The Celery pool's own gauges (:class:`cmwq_exec.celery.TaskPool`), read at scrape time
    from ``counts()``: a mapping with the keys of its ``inspect stats`` (``max-concurrency``,
    ``running``, ``queued``, ``abandoned``). Registered by the pool beside :class:`CMWQCollector`
    when it serves metrics."""

    _GAUGES: tuple[tuple[str, str, str], ...] = (
        ("cmwq_celery_concurrency",
         "The Celery pool's concurrency limit (-c, changed by autoscale, pool_grow, pool_shrink).",
         "max-concurrency"),
        ("cmwq_celery_tasks_running",
         "Tasks of the Celery pool running now (abandoned ones not included).", "running"),
        ("cmwq_celery_tasks_queued",
         "Tasks the Celery pool holds that have not started (its prefetch window).", "queued"),
        ("cmwq_celery_tasks_abandoned",
         "Tasks past their hard time limit or terminated whose thread has not returned: not "
         "counted against the concurrency (a task that swallowed the unwind stays here).",
         "abandoned"),
    )

    def __init__(self, counts: Callable[[], Mapping[str, Any]]) -> None:
        self._counts = counts

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        return self._families(self._counts())

    def _families(self, counts: Mapping[str, Any]) -> Iterator[Metric]:
        for name, doc, key in self._GAUGES:
            gauge = GaugeMetricFamily(name, doc)
            if key in counts:
                gauge.add_metric([], counts[key])
            yield gauge


def _get_system() -> Any:
    # Imported late so that importing this module does not start cmwq_exec.
    from cmwq_exec.core.system import get_system

    return get_system()


def _cmwq_collectors(registry: CollectorRegistry) -> list[CMWQCollector]:
    # prometheus_client keeps no public list of a registry's collectors.
    return [c for c in list(getattr(registry, "_collector_to_names", {})) if isinstance(c, CMWQCollector)]


class _RegisteredCollector(CMWQCollector):
    """The collector :func:`register` adds: it steps aside for one registered by hand.

    It describes no names, so a later ``registry.register(CMWQCollector())``
    does not collide with it, and it exports nothing while the registry holds
    such a collector, so the cmwq metrics appear once in a scrape whichever
    way, and in whichever order, they were registered.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = weakref.ref(registry)

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def _by_hand(self) -> CMWQCollector | None:
        registry = self._registry()
        if registry is None:
            return None
        return next((c for c in _cmwq_collectors(registry) if not isinstance(c, _RegisteredCollector)), None)

    def collect(self) -> Iterator[Metric]:
        if self._by_hand() is not None:
            return iter(())
        return super().collect()


# The collector register() added to each registry.
_registered: weakref.WeakKeyDictionary[CollectorRegistry, _RegisteredCollector] = weakref.WeakKeyDictionary()
_registered_lock = threading.Lock()


def register(registry: CollectorRegistry = REGISTRY) -> CMWQCollector:
    """Make sure ``registry`` exports the cmwq metrics once; return the collector that does.

    Idempotent per registry, together with registering a collector by hand:
    if ``registry`` already holds a :class:`CMWQCollector` (say from
    ``registry.register(CMWQCollector())``), that one is returned and nothing
    is added; otherwise a collector is added the first time and returned
    every time after.  A collector registered by hand *after* this call is
    accepted too, and then exports the metrics alone.  (Registering two
    collectors by hand is refused by prometheus_client, as for any collector.)
    """
    with _registered_lock:
        ours = _registered.get(registry)
        if ours is not None:
            return ours._by_hand() or ours
        by_hand = _cmwq_collectors(registry)
        if by_hand:
            return by_hand[0]
        ours = _RegisteredCollector(registry)
        registry.register(ours)
        _registered[registry] = ours
        return ours


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int between 0 and 65535, not {type(port).__name__} {port!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535 (0 picks a free port), not {port}")
    return port


def start_http_server(
    port: int,
    addr: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
) -> tuple[Any, threading.Thread]:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread.

    ``addr`` defaults to loopback: exposing the metrics to the network is an
    explicit choice (pass ``addr="0.0.0.0"`` or an interface's address).
    ``port`` 0 picks a free port; read it back from
    ``server.server_port``.  ``registry`` defaults to prometheus_client's
    global ``REGISTRY`` (so the process and GC metrics come along); the cmwq
    collector is registered with it if it is not already.

    Returns ``(server, thread)`` like ``prometheus_client.start_http_server``;
    ``server.shutdown()`` stops it.
    """
    port = _check_port(port)
    if not isinstance(addr, str) or not addr:
        raise TypeError(f"addr must be a non-empty str such as '127.0.0.1', not {addr!r}")
    if registry is None:
        registry = REGISTRY
    register(registry)
    try:
        return prometheus_client.start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {addr}:{port}: {exc.strerror}") from exc


def generate_latest(registry: CollectorRegistry | None = None) -> bytes:
    """Return the text exposition of ``registry``.

    With no registry, a private one holding only a :class:`CMWQCollector`
    is used, so the output has the cmwq metrics and nothing else.
    """
    if registry is None:
        registry = CollectorRegistry()
        registry.register(CMWQCollector())
    return prometheus_client.generate_latest(registry)
