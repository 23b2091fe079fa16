"""The Celery pool's outbox: callbacks carried from task threads to the consumer's event loop.

This module owns the path of every callback the pool makes (accept, result, timeout, refusal): a
queue of them, the pipe that wakes the event loop, and the workqueue that runs them when no event
loop does (a transport without one, or shutdown). The broker connection is only ever used from the
consumer's thread, as with prefork; callbacks run in the order they were delivered.

Locks (rank order, see cmwq_exec/core/lockdep.py): ``celery-callbacks`` (one drainer at a time,
held while callbacks run) before ``celery-outbox`` (the queue and the hub); a callback may take the
pool's lock (``celery``), never the other way round.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import signals

from .celery_jobs import current_app
from .core.lockdep import make_lock
from .core.workqueue import WQ, Work, WorkQueue

log = logging.getLogger("cmwq_exec.celery")


class Outbox:
    """Runs ``fn(*args)`` on the consumer's thread (or the callbacks workqueue), in order.

    Fields: ``I:`` set at creation; ``O:`` under ``lock``; ``M:`` the consumer's (main) thread.
    """

    def __init__(self, app: Any, name: str) -> None:
        self.app = app  # I: the current app while callbacks run
        self.name = name  # I: names the callbacks workqueue
        self.lock = make_lock("celery-outbox")
        self.queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()  # O
        self.drain_scheduled = False  # O
        self.drain_lock = make_lock("celery-callbacks")  # one drainer at a time: callbacks run in order
        self.hub: Any = None  # O: the consumer's event loop while it runs
        self.wake_r = self.wake_w = -1  # M: the pipe that wakes the event loop
        self.loop: Any = None  # M: the event loop our pipe is registered with
        self.control: WorkQueue | None = None  # O: made on first use, see deliver
        self.drain_work = Work(self.drain)  # I

    def deliver(self, fn: Callable[..., Any] | None, *args: Any) -> None:
        """Run ``fn(*args)`` on the consumer's thread (or the control workqueue), after every
        callback delivered before it."""
        if fn is None:
            return
        with self.lock:
            self.queue.append((fn, args))
            if self.drain_scheduled:
                return
            self.drain_scheduled = True
            hub = self.hub
        if hub is not None:
            self.wake()
        else:
            self.control_queue().queue_work(self.drain_work)

    def control_queue(self) -> WorkQueue:
        """The workqueue that runs callbacks when no event loop does, made on first use: unbound
        so it never waits behind a CPU hog, with a rescuer so it progresses even when no worker
        thread can be created."""
        with self.lock:
            if self.control is None:
                self.control = WorkQueue(f"celery-callbacks.{os.getpid()}.{self.name}",
                                         WQ.UNBOUND | WQ.RESCUER)
                self.control.flush_at_exit = False  # as the task workqueue's
            return self.control

    def register_with_event_loop(self, loop: Any) -> None:
        """Deliver on ``loop`` from now on (called again after a reconnect, whose hub reset
        dropped our reader). A pipe wakes the loop: kombu's ``call_soon`` only became thread-safe
        (and able to wake a sleeping loop) in recent versions."""
        if self.wake_r < 0:
            self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self.wake_r, self.on_wakeup)
        self.loop = loop
        with self.lock:
            self.hub = loop
            self.drain_scheduled = True
        self.wake()  # whatever queued up while no loop ran

    def stop_delivering_to_hub(self) -> None:
        """The event loop stopped for good: from now on the control workqueue (and the stopping
        thread) run the callbacks."""
        with self.lock:
            self.hub = None
            self.drain_scheduled = False

    def poke_loop(self) -> None:
        """Wake the event loop if one was registered (it then notices a shutdown). The pipe is
        left to the loop, which unregisters it when it closes (the two fds go with the process)."""
        if self.loop is not None and self.wake_w >= 0:
            self.wake()

    def wake_at_shutdown_signals(self, wanted: bool) -> None:
        """Poke the loop from Celery's shutdown signal handlers (``worker_shutting_down``), or stop.

        A warm shutdown's handler only sets Celery's ``should_stop``; an idle event loop sleeps in
        poll until its next timer (seconds on amqp without heartbeats) before it sees the flag: an
        idle worker's SIGTERM took 0.4-8.4 s against prefork's ~2.5 s. ``worker_shutting_down``
        is sent from that handler before the flag is set, and the poll the signal interrupted is
        retried after the handler returns: a poke makes it return at once (0.15-0.34 s)."""
        if wanted:
            signals.worker_shutting_down.connect(self._on_shutting_down)
        else:
            signals.worker_shutting_down.disconnect(self._on_shutting_down)

    def _on_shutting_down(self, **_: Any) -> None:
        self.poke_loop()  # lock-free: it runs in a signal handler

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full: the loop has plenty of wakeups pending
        except OSError:
            log.debug("cmwq_exec.celery: wakeup pipe closed", exc_info=True)

    def on_wakeup(self, *_: Any) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self.drain()

    def drain(self) -> None:
        """Run every callback queued so far, in order."""
        with self.drain_lock, current_app(self.app):
            while True:
                with self.lock:
                    if not self.queue:
                        self.drain_scheduled = False
                        return
                    batch, self.queue = self.queue, deque()
                for fn, args in batch:
                    try:
                        fn(*args)
                    except Exception:
                        log.exception("cmwq_exec.celery: callback %r failed", fn)

    def destroy(self) -> None:
        """Release the callbacks workqueue, if one was made (no callback may come after)."""
        if self.control is not None:
            self.control.destroy()
