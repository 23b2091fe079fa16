"""Works: what users queue (the kernel's ``work_struct``, ``delayed_work``), and ``waiting``.

This module owns a reusable work's own operations (its pending bit, cancel, flush) and
:class:`waiting`, the bracket a worker puts around a wait for other works. A work asks the
workqueue that owns it (``work._pwq.wq``) to take it off a list or to fire its timer; those
operations live with the workqueue (:mod:`cmwq_exec.core.wq_cancel`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, ParamSpec, cast

from . import timer
from .interfaces import QueueState, RunningWorker, WorkQueueOps
from .interrupts import deferred_interrupts
from .pending import NOWHERE, TIMER, work_flush
from .worker import current_worker

log = logging.getLogger("cmwq_exec.workqueue")


def _owner(work: Work) -> WorkQueueOps:
    """The workqueue a queued work belongs to (``_pwq`` is set: the caller checked)."""
    return cast(QueueState, work._pwq).wq


_P = ParamSpec("_P")


class Work:
    """A reusable work item (the kernel's ``work_struct``): ``fn(*args, **kwargs)`` runs on a worker.

    A work is *pending* from the moment it is queued until a worker starts it; queueing a pending
    work does nothing and returns False. A work never runs concurrently with itself: queued again
    while it runs, it runs again after, on the same pool. Exceptions are logged (a work has no
    caller to return to); use :class:`cmwq_exec.CMWQExecutor` for results. Its pending state is
    described in :mod:`cmwq_exec.core.pending`.
    """

    _reusable: ClassVar[bool] = True
    __slots__ = ("fn", "args", "kwargs", "_pending", "_pwq", "_color", "_queued_at", "_counted", "_worker",
                 "_where", "_timer", "__weakref__")

    def __init__(self, fn: Callable[_P, object], /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        if not callable(fn):
            raise TypeError(f"Work(fn): fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self._pending = threading.Lock()  # locked while pending: test-and-set is acquire(False)
        self._pwq: QueueState | None = None  # the owning workqueue's state on the chosen pool
        self._color = 0
        self._queued_at = 0.0
        self._counted = False  # W: holds a max_active slot of its workqueue
        self._worker: RunningWorker | None = None  # P: the worker running it
        self._where = NOWHERE  # W (W+P for a pool's lists): where it sits while pending
        self._timer: timer.Timer | None = None

    def _execute(self) -> BaseException | None:
        try:
            self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            log.exception("work %r raised", self)
            return exc
        return None

    @property
    def pending(self) -> bool:
        """Queued and not yet started."""
        return self._pending.locked()

    @property
    def running(self) -> bool:
        return self._worker is not None

    def cancel(self) -> bool:
        """Take the work off its queue if pending. Returns True if it was pending (and now is not).
        A run already started is not interrupted."""
        while True:
            if self._pwq is None:
                return False  # never queued
            wq = _owner(self)
            with deferred_interrupts(), wq._lock:
                if self._pwq is None or self._pwq.wq is not wq:
                    continue  # queued on another workqueue meanwhile: ask that one
                answer = wq._cancel_locked(self)
            if answer is not None:
                return answer
            # Pending, but placed by no workqueue: another workqueue is queueing it at this very
            # moment (the same work queued on two workqueues at once) and has not yet recorded
            # itself as the owner. The only wait of this kind; it lasts a few bytecodes.
            time.sleep(0)

    def flush(self) -> bool:
        """Wait until the work is neither pending nor running. Returns True if it had to wait."""
        worker = current_worker()
        if worker is not None and worker.current_work is self:
            raise RuntimeError("a work cannot flush itself: it would wait for its own end")
        if self._pwq is None:
            return False
        waited = False
        cond = work_flush.cond
        with waiting(worker):
            with work_flush.lock:  # not the Condition (see WorkFlush)
                work_flush.waiters += 1
                try:
                    while self._pending.locked() or self._worker is not None:
                        cond.wait()
                        waited = True
                finally:
                    work_flush.waiters -= 1
        return waited

    def cancel_sync(self) -> bool:
        """Cancel, then wait for a run in progress to end. On return the work is neither pending nor
        running (unless it queued itself again meanwhile). Returns True if it was pending."""
        grabbed = self.cancel()
        self.flush()
        return grabbed

    def __repr__(self) -> str:
        return f"<Work {getattr(self.fn, '__qualname__', self.fn)!s} pending={self.pending}>"


class DelayedWork(Work):
    """A work queued after a delay (``WorkQueue.queue_delayed_work``)."""

    __slots__ = ()

    def flush(self) -> bool:
        """Queue it now if its timer is still pending, then wait for it (flush_delayed_work).

        If its workqueue was destroyed meanwhile, the work is cancelled (with a warning) instead."""
        if self._pwq is not None and self._where is TIMER:
            _owner(self)._fire_delayed(self, now=True)
        return super().flush()


class waiting:
    """``with waiting(worker):`` around a wait for other works: the worker sleeps (another worker
    takes over) and gives its max_active slot up meanwhile (the awaited work can start). A no-op
    outside a worker."""

    __slots__ = ("worker", "began")

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.began = False

    def __enter__(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.sleep_begin()
            self.began = worker.wait_begin()

    def __exit__(self, *exc_info: Any) -> None:
        worker = self.worker
        if worker is not None:
            worker.wait_end(self.began)
            worker.sleep_end()
