"""The metrics endpoint of a Celery worker in processes mode: every child's metrics in one place.

Each child serves its own metrics on a loopback port it writes into a status file of the supervisor
(see :mod:`cmwq_exec.celery_processes`); the supervisor serves the one endpoint of the whole worker.

A scrape must not wait on the children, nor pile up behind other scrapes:

* the children are read at most once per :data:`MAX_AGE` seconds: a scrape within that time of the
  last read answers from what it read (Prometheus scrapes every 10-60 s; a burst of scrapes from
  several servers, or a dashboard refreshing, costs the children one read);
* one read at a time: scrapes that arrive while one reads wait for it and answer from it;
* a read asks every child at once, each bounded by :data:`READ_TIMEOUT` seconds, so one stuck child
  delays a read by that much at most and drops only its own samples;
* the server's listen backlog is :data:`REQUEST_QUEUE` (Python's servers keep 5: a burst of
  connections beyond that is refused or left unanswered while the server is busy).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

__all__ = ["MAX_AGE", "READ_TIMEOUT", "REQUEST_QUEUE", "ChildrenCollector", "serve"]

log = logging.getLogger("cmwq_exec.celery")

#: seconds a read of the children's metrics answers scrapes for (arbitrary: well below any scrape
#: interval, long enough that a burst of scrapes costs one read)
MAX_AGE = 1.0
#: seconds a read waits for one child
READ_TIMEOUT = 2.0
#: the listen backlog of the endpoint (the kernel caps it at net.core.somaxconn)
REQUEST_QUEUE = 1024


class _Child(Protocol):
    index: int
    restarts: int

    def alive(self) -> bool: ...

    def recycles(self) -> int: ...

    def metrics_port(self) -> int | None: ...


class ChildrenCollector:
    """The supervisor's metrics: the children's own, labelled ``child``, then
    ``cmwq_celery_children`` (live children), ``cmwq_celery_child_restarts_total`` (processes that
    died, replaced) and ``cmwq_celery_child_recycles_total`` (processes replaced at their request:
    :mod:`cmwq_exec.celery_process_recycle`).

    Fields: ``I:`` set in ``__init__``; ``R:`` under ``_reading``."""

    def __init__(self, children: Sequence[_Child], max_age: float = MAX_AGE,
                 timeout: float = READ_TIMEOUT) -> None:
        self.children = children  # I: the supervisor's slots (their processes change)
        self.max_age = max_age  # I
        self.timeout = timeout  # I
        self._reading = threading.Lock()  # one read of the children at a time
        self._families: list[Any] = []  # R: the merged families of the last read
        self._read_at = -math.inf  # R: time.monotonic() of the last read

    def describe(self) -> Iterator[Any]:
        return iter(())  # families depend on what the children export: collected, not described

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        alive = GaugeMetricFamily("cmwq_celery_children", "Child processes of the worker alive now")
        alive.add_metric([], sum(1 for child in self.children if child.alive()))
        yield alive
        restarts = CounterMetricFamily("cmwq_celery_child_restarts", "Times a child process was replaced",
                                       labels=["child"])
        for child in self.children:
            restarts.add_metric([str(child.index)], child.restarts)
        yield restarts
        recycles = CounterMetricFamily("cmwq_celery_child_recycles", "Times a child process was recycled "
                                       "(max tasks or memory per child, a task that would not die)",
                                       labels=["child"])
        for child in self.children:
            recycles.add_metric([str(child.index)], child.recycles())
        yield recycles
        yield from self.children_families()

    def children_families(self) -> list[Any]:
        """The children's families, read now or at most ``max_age`` seconds ago."""
        with self._reading:
            if time.monotonic() - self._read_at >= self.max_age:
                self._families = merge(self.read_children())
                self._read_at = time.monotonic()
            return self._families

    def read_children(self) -> list[tuple[int, str]]:
        """(index, exposition text) of every live child that answers within the timeout, all
        asked at once."""
        texts: dict[int, str] = {}
        threads = []
        for child in self.children:
            port = child.metrics_port() if child.alive() else None
            if port is None:
                continue
            thread = threading.Thread(target=self._read_one, args=(child.index, port, texts),
                                      name=f"cmwq-metrics-child{child.index}", daemon=True)
            thread.start()
            threads.append(thread)
        deadline = time.monotonic() + self.timeout + 0.5
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sorted(texts.items())

    def _read_one(self, index: int, port: int, into: dict[int, str]) -> None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=self.timeout) as reply:
                into[index] = reply.read().decode()
        except (OSError, ValueError) as exc:
            log.debug("cmwq_exec: child %s does not answer on port %s: %s", index, port, exc)


def merge(texts: list[tuple[int, str]]) -> list[Any]:
    """One family per name from the children's exposition texts, each sample labelled with its
    ``child``. The children's own ``cmwq_celery_child*`` families are the supervisor's to say."""
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Any] = {}
    for index, text in texts:
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as exc:
            log.warning("cmwq_exec: child %s served metrics that do not parse: %s", index, exc)
            continue
        for family in families:
            if family.name.startswith("cmwq_celery_child"):
                continue
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type,
                                                    family.unit)
            for sample in family.samples:
                into.add_sample(sample.name, {"child": str(index), **sample.labels}, sample.value,
                                sample.timestamp)
    return list(merged.values())


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Log nothing: a request line per scrape is noise."""


def serve(port: int, addr: str, registry: Any) -> Any:
    """Serve ``registry`` on ``http://addr:port/metrics`` from daemon threads (one per request) with
    a listen backlog of REQUEST_QUEUE; returns the server (``shutdown()``, ``server_close()``).
    Raises OSError if the address cannot be bound."""
    from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,),
                        {"address_family": family, "request_queue_size": REQUEST_QUEUE})
    server: Any = make_server(addr, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="cmwq-metrics-server", daemon=True).start()
    return server
