"""A workqueue's figures and its list of works not yet started (for metrics, ``top`` and the
executor's ``cancel_futures``).

This module owns reading a workqueue: :meth:`WorkQueueStats.stats` (totals over its pools),
:meth:`WorkQueueStats.counters` (the same without histograms) and
:meth:`WorkQueueStats.pending_works`. It changes nothing.
"""

from __future__ import annotations

from typing import Any

from .interfaces import WorkItem
from .wq_state import BUCKETS, WorkQueueState


class WorkQueueStats(WorkQueueState):
    """Reading a workqueue's state."""

    def stats(self) -> dict[str, Any]:
        """Totals over all pools (for metrics and ``top``)."""
        total: dict[str, Any] = {"workqueue": self.name, "started": 0, "completed": 0, "inflight": 0,
                 "cpu_seconds": 0.0, "cpu_intensive": 0, "cm_wakeups": 0, "mayday": 0, "rescued": 0}
        latency = [0] * len(BUCKETS)
        execution = [0] * len(BUCKETS)
        latency_sum = execution_sum = 0.0
        for pwq in self._pwqs:
            with pwq.pool.lock:
                total["started"] += pwq.nr_started
                total["completed"] += pwq.nr_completed
                total["inflight"] += sum(pwq.in_flight.values())
                total["cpu_seconds"] += pwq.cpu_sum
                total["cpu_intensive"] += pwq.nr_cpu_intensive
                total["cm_wakeups"] += pwq.nr_cm_wakeups
                total["mayday"] += pwq.nr_mayday
                total["rescued"] += pwq.nr_rescued
                for i in range(len(BUCKETS)):
                    latency[i] += pwq.latency[i]
                    execution[i] += pwq.execution[i]
                latency_sum += pwq.latency_sum
                execution_sum += pwq.execution_sum
        total["queue_latency"] = {"buckets": BUCKETS, "counts": latency, "sum": latency_sum}
        total["execution"] = {"buckets": BUCKETS, "counts": execution, "sum": execution_sum}
        return total

    def counters(self) -> dict[str, Any]:
        """:meth:`stats` without its two histograms: what a front-end's own stats and ``inspect``
        show of its workqueue."""
        return {k: v for k, v in self.stats().items() if k not in ("queue_latency", "execution")}

    def pending_works(self) -> list[WorkItem]:
        """Works of this workqueue not yet started (on a worklist, inactive)."""
        found: list[WorkItem] = []
        for pwq in self._pwqs:
            with pwq.pool.lock:
                found.extend(w for w in pwq.pool.worklist if w._pwq is pwq)
        with self._lock:
            found.extend(self._inactive)
        return found
