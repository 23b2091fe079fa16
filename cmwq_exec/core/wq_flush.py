"""Flush colors and drain: waiting until the works queued so far have finished.

Each work is counted in flight, on its pool, under the flush color it was queued with; a flush
takes the current color, starts a new one for the works queued after it, and waits until no work
of its color or an older one is in flight (the kernel's flush colors, without their fixed number:
a color is a counter, and the in-flight counts are a dict per pool). ``drain`` flushes until the
workqueue is empty, letting only its own works queue meanwhile.

This module owns the in-flight counts' decrement (``_drop_in_flight``, called by workers as works
finish), the flushers' count and sequence, ``flush`` and ``drain``.
"""

from __future__ import annotations

from typing import cast

from .interfaces import QueueState, WorkQueueOps
from .lockdep import ENABLED as _CHECKED
from .lockdep import assert_held
from .work import waiting
from .worker import current
from .wq_active import ActiveLimits


class Flushing(ActiveLimits):
    """A workqueue's flush colors, flush and drain."""

    def _in_flight_counts(self) -> list[int]:
        counts = []
        for pwq in self._pwqs:
            with pwq.pool.lock:
                counts.append(sum(pwq.in_flight.values()))
        return counts

    def _drop_in_flight(self, pwq: QueueState, color: int) -> None:
        """A work left (finished or cancelled). P: held (``pwq.pool.lock``)."""
        if _CHECKED:
            assert_held(pwq.pool.lock)  # type: ignore[attr-defined]  # a PoolWorkqueue (no cast: a call)
        left = pwq.in_flight[color] - 1
        if left:
            pwq.in_flight[color] = left
        else:
            del pwq.in_flight[color]
            if self._nr_flushers:  # a color drained: wake the flushers (lock order: pool, then flush)
                with self._flush_lock:
                    self._flush_seq += 1
                    self._flush_cond.notify_all()
            rescuer = self._rescuer
            if rescuer is not None and rescuer.closing:
                rescuer.kick()  # it stops once nothing is in flight

    def _colors_done(self, color: int) -> bool:
        for pwq in self._pwqs:
            with pwq.pool.lock:
                if any(c <= color for c in pwq.in_flight):
                    return False
        return True

    def flush(self) -> None:
        """Wait until every work queued before this call has finished (flush_workqueue).

        A work of this workqueue may not flush it: it would wait for itself (RuntimeError).

        No wakeup is lost: a flusher counts itself (``_nr_flushers``) before it looks at the
        counts, and reads ``_flush_seq`` before each look; a work that empties a color after
        the count was made sees the flusher and bumps the sequence, so the wait below returns."""
        worker = current.worker
        mine = worker.current_pwq if worker is not None else None
        if mine is not None and mine.wq is cast(WorkQueueOps, self):
            raise RuntimeError(f"a work of workqueue {self.name!r} cannot flush or drain it: it would "
                               "wait for its own end")

        counted = False
        try:
            with self._flush_lock:
                color = self._work_color
                self._work_color += 1
                self._nr_flushers += 1
                counted = True  # no call since the count: an interruption finds it taken back below
            with waiting(worker):
                while True:
                    with self._flush_lock:
                        seq = self._flush_seq
                    if self._colors_done(color):
                        return
                    with self._flush_lock:
                        while self._flush_seq == seq:
                            self._flush_cond.wait()
        finally:
            if counted:
                with self._flush_lock:
                    self._nr_flushers -= 1

    def drain(self) -> None:
        """Flush until the workqueue is empty. Meanwhile only its own works may queue on it (chains
        finish); anyone else gets RuntimeError."""
        counted = False
        try:
            with self._flush_lock:
                self._draining += 1
                counted = True  # as flush()'s count of its flushers
            while True:
                self.flush()
                if not any(self._in_flight_counts()):
                    return
        finally:
            if counted:
                with self._flush_lock:
                    self._draining -= 1
