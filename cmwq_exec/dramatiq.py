"""A Dramatiq worker whose messages run as works on cmwq_exec's shared per-CPU pools.

Start it as ``dramatiq`` is started, with the same options (``python -m cmwq_exec.dramatiq
--help``)::

    python -m cmwq_exec.dramatiq app.broker app.tasks

or build it in code: ``cmwq_exec.dramatiq.Worker(broker, queues=..., worker_timeout=...)`` is a
``dramatiq.Worker``; ``start()``, ``pause()``, ``resume()``, ``join()`` and ``stop(timeout)`` are
Dramatiq's.

No number of threads to guess
    Dramatiq's worker runs messages on ``--threads`` threads (default 8). Here the consumers fill
    the same in-memory work queue, and a *chain* of works on one cmwq pool empties it (see
    :class:`_Dispatcher`): a link takes the next message, queues the next link and runs the
    message. A message that waits (in :func:`cmwq_exec.blocking`, on a cmwq future, or as the
    watchdog sees it) lets the pool start the next link, which takes the next message: waiting
    messages overlap, on as many threads as wait. CPU-bound ones run back to back on one thread
    (one process has one GIL; Dramatiq's ``--processes``, one per CPU by default, gives the other
    CPUs theirs). ``--threads N``, if given, bounds the messages *running* at once, where one
    asleep in ``blocking()`` does not count (``max_running`` of the worker's workqueue).

    What bounds the overlap is the prefetch, the messages a worker holds unacknowledged per queue:
    Dramatiq's ``dramatiq_queue_prefetch`` if set, else twice ``--threads`` as Dramatiq does if it
    is given, else ``DEFAULT_PREFETCH``. It is a bound on what one process takes out of the
    broker, not a concurrency to size: when fewer messages wait, fewer threads run.

Time limits and shutdown notifications on cmwq's threads
    Dramatiq's ``TimeLimit`` and ``ShutdownNotifications`` middleware raise ``TimeLimitExceeded``
    and ``Shutdown`` into the thread running a message with ``PyThreadState_SetAsyncExc``, from a
    checker thread that may raise just after the message ended: on a thread of its own that costs
    the worker thread at worst; on a cmwq thread it could land in the pool's code. So while this
    worker runs, their managers raise through :mod:`cmwq_exec.injection`'s window, opened by the
    middleware's own ``before_process_message`` and closed by its ``after_process_message``; a
    time limit fires at its deadline (a cmwq timer) instead of at the checker's next second.
    Threads that are not this worker's keep Dramatiq's managers.

Shutdown, as Dramatiq's
    ``stop()`` is ``dramatiq.Worker.stop``: the chain stops taking messages, the messages running
    finish (up to the timeout), then the consumers stop, the messages prefetched and not started
    are requeued, and the consumers close. Nothing started is requeued; nothing taken is lost.

Metrics: with ``CMWQ_METRICS_PORT`` set (0 to 65535; ``CMWQ_METRICS_ADDR``, default
``127.0.0.1``) each worker process serves Prometheus metrics (:mod:`cmwq_exec.metrics`; the
workqueue is ``dramatiq``), which ``cmwq-exec top`` reads; with ``--processes`` above 1 give each
its port with 0 (a free one, logged) or run one process per command.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from queue import Empty
from typing import Any

import dramatiq
import dramatiq.cli
import dramatiq.worker
from dramatiq.middleware import Interrupt, Shutdown, ShutdownNotifications, TimeLimit
from dramatiq.middleware.time_limit import TimeLimitExceeded

from . import detect
from .blocking import blocking
from .core import timer as _timer
from .core.lockdep import make_lock, must_hold
from .core.system import get_system
from .core.workqueue import WQ, Work, WorkQueue
from .injection import close_window_surely, inject, open_window
from .metrics import address_from_environment as metrics_address

__all__ = ["DEFAULT_PREFETCH", "Worker", "main"]

log = logging.getLogger("cmwq_exec.dramatiq")

#: Messages a worker holds unacknowledged per queue when neither ``dramatiq_queue_prefetch`` nor
#: ``--threads`` says (arbitrary: enough for 10 ms waits to overlap well past Dramatiq's default
#: of 16, few enough that one process does not hoard a queue that others consume).
DEFAULT_PREFETCH = 128

#: Dramatiq's default idle wake-up of a worker thread (its WORKER_TIMEOUT since 2.0; 1000 ms before).
_WORKER_TIMEOUT: int = getattr(dramatiq.worker, "WORKER_TIMEOUT", 1000)
#: Dramatiq's worker thread class, whose process_message runs a message (_WorkerThread: its name
#: in Dramatiq 1.x, an alias in 2.x).
_DRAMATIQ_THREAD: Any = dramatiq.worker._WorkerThread
# What Dramatiq's command line runs in each worker process (saved before main() replaces it).
_dramatiq_worker_process = dramatiq.cli.worker_process
# Per thread: the _Job of the message it runs for a cmwq worker (None: not one of ours).
_current = threading.local()


class _Job:
    """One message's injection window (see cmwq_exec.injection) while a link runs it.

    ``G:`` under ``gate``; ``P:`` under the dispatcher's ``_lock``; ``X:`` the job's thread only;
    ``I:`` set at creation.
    """

    __slots__ = ("pool", "gate", "thread_id", "in_target", "finished", "unwind", "revoked_early",
                 "opens", "timer", "notified")

    def __init__(self, pool: _Dispatcher) -> None:
        self.pool = pool  # I: the dispatcher (its _lock is held to inject)
        self.gate = threading.Lock()  # I
        self.thread_id = threading.get_ident()  # I
        self.in_target = False  # G
        self.finished = False  # G
        self.unwind: str | None = None  # P: "time limit" once TimeLimitExceeded was injected
        self.revoked_early = False  # I: nothing revokes a Dramatiq message before it starts
        self.opens = 0  # X: managers that opened the window (it closes when the last one leaves)
        self.timer: _timer.Timer | None = None  # X: its time limit
        self.notified = False  # P: Shutdown was injected


def _enter(job: _Job) -> None:
    if not job.opens:
        open_window(job)  # a fresh job: it always opens
    job.opens += 1


def _leave(job: _Job) -> None:
    job.opens -= 1
    if job.opens <= 0:
        job.opens = 0
        close_window_surely(job)


class _TimeLimits:
    """Replaces a ``TimeLimit`` middleware's manager: a message of a cmwq worker gets a cmwq timer
    and the injection window; any other thread is handed to Dramatiq's own manager."""

    def __init__(self, dramatiqs: Any) -> None:
        self.dramatiqs = dramatiqs

    def start(self) -> None:
        self.dramatiqs.start()  # TimeLimit's after_process_boot: Dramatiq's checker, for the others

    def add_timeout(self, thread_id: int, ttl: float) -> None:
        job: _Job | None = getattr(_current, "job", None)
        if job is None or job.thread_id != thread_id:
            return self.dramatiqs.add_timeout(thread_id, ttl)
        _enter(job)
        if ttl != float("inf"):
            job.timer = _timer.add_timer(ttl / 1000, functools.partial(job.pool._time_limit, job))
        return None

    def remove_timeout(self, thread_id: int) -> None:
        job: _Job | None = getattr(_current, "job", None)
        if job is None or job.thread_id != thread_id:
            return self.dramatiqs.remove_timeout(thread_id)
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        _leave(job)
        return None


class _ShutdownNotices:
    """Replaces a ``ShutdownNotifications`` middleware's manager, as :class:`_TimeLimits`: the
    messages of cmwq workers that asked for a notification get ``Shutdown`` through their window."""

    def __init__(self, dramatiqs: Any) -> None:
        self.dramatiqs = dramatiqs
        self._lock = threading.Lock()  # a leaf: guards ``jobs`` only
        self.jobs: set[_Job] = set()  # the messages of cmwq workers to notify at the stop

    def add_notification(self) -> None:
        job: _Job | None = getattr(_current, "job", None)
        if job is None:
            return self.dramatiqs.add_notification()
        _enter(job)
        with self._lock:
            self.jobs.add(job)
        return None

    def remove_notification(self) -> None:
        job: _Job | None = getattr(_current, "job", None)
        if job is None:
            return self.dramatiqs.remove_notification()
        with self._lock:
            self.jobs.discard(job)
        _leave(job)
        return None

    def shutdown(self) -> None:
        self.dramatiqs.shutdown()
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.pool._notify_shutdown(job)


def _take_over_managers(broker: Any) -> None:
    """Make the broker's TimeLimit and ShutdownNotifications raise through injection windows."""
    for middleware in broker.middleware:
        if isinstance(middleware, TimeLimit) and not isinstance(middleware.manager, _TimeLimits):
            middleware.manager = _TimeLimits(middleware.manager)  # type: ignore[assignment]
        elif (isinstance(middleware, ShutdownNotifications)
              and not isinstance(middleware.manager, _ShutdownNotices)):
            middleware.manager = _ShutdownNotices(middleware.manager)  # type: ignore[assignment]


def _message_of(item: Any) -> Any:
    """The message of a work queue item: a ``_WorkQueueItem`` since Dramatiq 2.0, a (priority,
    message) tuple before."""
    return item[1] if isinstance(item, tuple) else item.message


class _Acks:
    """The worker's consumers as ``process_message`` sees them: its ack or nack (a round trip to the
    broker) is a wait, said with ``blocking()``, so that the pool runs another message meanwhile
    instead of finding the wait late by its watchdog."""

    def __init__(self, consumers: dict[str, Any]) -> None:
        self.consumers = consumers

    def __getitem__(self, queue_name: str) -> _Ack:
        return _Ack(self.consumers[queue_name])


class _Ack:
    __slots__ = ("consumer",)

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer

    def post_process_message(self, message: Any) -> None:
        with blocking():
            self.consumer.post_process_message(message)


class _Dispatcher:
    """The chain of works that runs a worker's messages; in ``Worker.workers`` in place of
    Dramatiq's ``WorkerThread``s, with their interface (``stop``, ``join``, ``pause``, ``resume``,
    ``paused_event``), so that Dramatiq's ``Worker.stop``, ``pause`` and ``resume`` drive it.

    A link takes a message off the work queue (asleep in ``blocking()`` while it is empty), queues
    the next link and runs the message with Dramatiq's own ``WorkerThread.process_message`` (the
    middleware hooks, the exception handling, the ack or nack, ``task_done``). If the message
    finished before the pool started the next link (it never blocked: the pool runs one work at
    a time while one is running), the link takes the next link back (``Work.cancel``) and goes on
    itself: CPU-bound messages run back to back on one thread. If it blocked, the next link is
    already taking the next message: waiting messages overlap, one thread each. So at most one
    link waits on the work queue, and a message leaves it only when a thread is about to run it.

    Fields: ``I:`` set in ``__init__``; ``P:`` under ``_lock``; ``S:`` the starting and stopping
    thread's.

    Invariants (under ``_lock``): ``_links`` counts the links queued or running (0 only before
    ``start``, after the chain ended, or for a moment after a link failed); ``_inflight`` the
    messages being processed; ``_jobs`` holds the windows of the messages running.
    """

    def __init__(self, worker: Worker) -> None:
        self.broker = worker.broker  # I: with the next three, what process_message uses
        self.consumers = _Acks(worker.consumers)  # I
        self.work_queue = worker.work_queue  # I
        self.logger = dramatiq.worker.get_logger(dramatiq.worker.__name__, "WorkerThread")  # I
        self.timeout = worker.worker_timeout / 1000  # I
        self.max_running = worker.worker_threads  # I
        self._lock = make_lock("executor")
        self._idle = threading.Condition(self._lock)  # notified when a link or a message ends
        self._links = 0  # P
        self._inflight = 0  # P
        self._jobs: dict[int, _Job] = {}  # P: thread id -> the window of the message it runs
        self.running = False  # P (read without it by the links: a flag)
        self.paused = False  # P (likewise)
        self._holding = False  # P: the taking link is in its pause loop (takes nothing)
        self.paused_event = threading.Event()  # I: set once paused with no message running
        self._booted = threading.local()  # per thread: worker_thread_boot was emitted there
        self._wq: WorkQueue | None = None  # S
        self._cpu: int | None = None  # S

    # -- what Worker calls, as on a WorkerThread ----------------------------------------------

    def start(self) -> None:
        self._wq = WorkQueue("dramatiq", WQ.RESCUER, max_running=self.max_running)
        self._wq.flush_at_exit = False  # Worker.stop decides what to wait for
        self._cpu = get_system().local_pool().cpu
        with self._lock:
            self.running = True
            self._links = 1
        self._queue_link()

    def stop(self) -> None:
        with self._lock:
            self.running = False
            self._idle.notify_all()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the chain ended and no message runs (at most ``timeout`` seconds); then
        emit ``worker_thread_shutdown`` once and release the workqueue."""
        with self._lock:
            done = self._idle.wait_for(lambda: not self._links and not self._inflight, timeout)
        if not done or self._wq is None:
            return  # as a WorkerThread still running: Dramatiq goes on with its shutdown
        self.broker.emit_before("worker_thread_shutdown", self)
        wq, self._wq = self._wq, None
        wq.destroy()

    def is_alive(self) -> bool:
        with self._lock:
            return bool(self._links or self._inflight)

    def pause(self) -> None:
        with self._lock:
            self.paused = True
            self.paused_event.clear()

    def resume(self) -> None:
        """As a WorkerThread's: the taking link sees it at its next look (every ``worker_timeout``),
        not at once, so the consumers, which Worker.resume resumes first, have that long to fill
        the work queue before a message is taken by priority (Dramatiq's own
        test_actors_can_prioritize_work counts on it)."""
        with self._lock:
            self.paused = False
            self.paused_event.clear()

    # -- the chain ----------------------------------------------------------------------------

    def _queue_link(self) -> Work:
        """Queue a link of the chain (``_links`` already counts it)."""
        link, wq = Work(self._link), self._wq
        assert wq is not None
        if self._cpu is None:
            wq.queue_work(link)
        else:
            wq.queue_work_on(self._cpu, link)  # one pool: one GIL, as few idle threads as needed
        return link

    def _link(self) -> None:
        """One link: take messages and run them until the stop, or until the next link took over."""
        try:
            if not getattr(self._booted, "done", False):
                self._booted.done = True
                self.broker.emit_after("worker_thread_boot", self)
            while True:
                item = self._take()
                if item is None:
                    return
                with self._lock:
                    self._links += 1
                following = self._queue_link()  # started by the pool if this message blocks
                self._process(_message_of(item))
                if not following.cancel():
                    return  # it runs: it takes the messages now
                with self._lock:
                    self._links -= 1  # taken back: this thread goes on
        finally:
            with self._lock:
                self._links -= 1
                self._idle.notify_all()

    def _take(self) -> Any:
        """The next item of the work queue, or None once stopped; while paused, none."""
        while self.running:
            if self.paused:
                with blocking(), self._lock:
                    self._holding = self.paused
                    if not self._inflight:
                        self.paused_event.set()  # as a WorkerThread idle in its pause loop
                    self._idle.wait(self.timeout)
                continue
            with self._lock:
                self._holding = False
            try:
                with blocking():  # an empty queue is a wait, not work
                    return self.work_queue.get(timeout=self.timeout)
            except Empty:
                continue
        return None

    def _process(self, message: Any) -> None:
        """Run one message as a WorkerThread does, inside its job (the injection window)."""
        job = _Job(self)
        with self._lock:
            self._inflight += 1
            self._jobs[job.thread_id] = job
        _current.job = job
        try:
            _DRAMATIQ_THREAD.process_message(self, message)  # type: ignore[arg-type]
        except (Exception, Interrupt):
            # an exception out of a middleware's after-hook, or an interrupt landing there:
            # a WorkerThread would die of it; the message was acked or nacked in its finally
            log.exception("cmwq_exec.dramatiq: error after processing message %s", message)
        finally:
            _current.job = None
            if job.timer is not None:
                job.timer.cancel()
            close_window_surely(job)  # closed already unless a middleware's after-hook failed
            with self._lock:
                del self._jobs[job.thread_id]
                self._inflight -= 1
                self._idle.notify_all()

    # -- injections (timer thread, or the thread that stops the worker) -----------------------

    def _time_limit(self, job: _Job) -> None:
        with self._lock:
            self._time_limit_locked(job)

    @must_hold("_lock")
    def _time_limit_locked(self, job: _Job) -> None:
        if job.unwind is None and not job.finished:
            job.unwind = "time limit"
            log.warning("Time limit exceeded. Raising exception in worker thread %r.", job.thread_id)
            inject(job, TimeLimitExceeded)

    def _notify_shutdown(self, job: _Job) -> None:
        with self._lock:
            if not job.notified and not job.finished:
                job.notified = True
                log.info("Worker shutdown notification. Raising exception in worker thread %r.",
                         job.thread_id)
                inject(job, Shutdown)

    def stats(self) -> dict[str, Any]:
        """The chain's message counts and its workqueue's counters."""
        with self._lock:
            counts: dict[str, Any] = {"running": len(self._jobs), "links": self._links,
                                      "max-running": self.max_running, "paused": self._holding}
        wq = self._wq
        if wq is not None:
            counts["workqueue"] = wq.counters()
        return counts


class Worker(dramatiq.Worker):
    """A ``dramatiq.Worker`` whose messages run on a cmwq workqueue (see :class:`_Dispatcher`).

    ``worker_threads``: None (default) for no limit, or the most messages running at once (a
    message asleep in ``blocking()`` does not count); it also sets the prefetch as Dramatiq does
    (twice it). ``prefetch``: the messages held unacknowledged per queue (default: Dramatiq's
    ``dramatiq_queue_prefetch``, else twice ``worker_threads``, else ``DEFAULT_PREFETCH``).
    """

    def __init__(self, broker: Any, *, queues: set[str] | None = None,
                 worker_timeout: int = _WORKER_TIMEOUT,
                 worker_threads: int | None = None, prefetch: int | None = None) -> None:
        for name, value in (("worker_threads", worker_threads), ("prefetch", prefetch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"cmwq_exec.dramatiq.Worker: {name} must be None or a positive "
                                 f"integer, got {value!r}")
        if isinstance(worker_timeout, bool) or not isinstance(worker_timeout, (int, float)) \
                or not worker_timeout > 0:
            raise ValueError("cmwq_exec.dramatiq.Worker: worker_timeout must be a positive number of "
                             f"milliseconds, got {worker_timeout!r}")
        super().__init__(broker, queues=queues, worker_timeout=worker_timeout,
                         worker_threads=worker_threads or 1)
        self.worker_threads = worker_threads  # type: ignore[assignment]
        held = (prefetch or dramatiq.worker.QUEUE_PREFETCH
                or (min(worker_threads * 2, 65535) if worker_threads else DEFAULT_PREFETCH))
        self.queue_prefetch = held
        self.delay_prefetch = dramatiq.worker.DELAY_QUEUE_PREFETCH or min(held * 500, 65535)
        self._metrics_server: Any = None

    def start(self) -> None:
        """Boot as Dramatiq's worker does, with the chain in place of the worker threads, and serve
        the metrics if ``CMWQ_METRICS_PORT`` is set."""
        address = metrics_address()
        self.broker.emit_before("worker_boot", self)
        self.broker.add_middleware(dramatiq.worker._WorkerMiddleware(self))
        _take_over_managers(self.broker)
        self._add_worker()
        if address is not None and self._metrics_server is None:
            from . import metrics

            self._metrics_server, _ = metrics.start_http_server(*address)
            log.info("cmwq_exec: serving Prometheus metrics on http://%s:%s/metrics", address[1],
                     self._metrics_server.server_port)
        self.broker.emit_after("worker_boot", self)

    def _add_worker(self) -> None:
        if self.workers:
            return  # one chain per worker: it grows by itself
        dispatcher = _Dispatcher(self)
        dispatcher.start()
        self.workers.append(dispatcher)  # type: ignore[arg-type]

    def stop(self, timeout: int = 600000) -> None:
        """Dramatiq's ``Worker.stop`` (finish what runs, requeue what was prefetched), then stop
        the metrics endpoint."""
        try:
            super().stop(timeout)
        finally:
            server, self._metrics_server = self._metrics_server, None
            if server is not None:
                server.shutdown()
                server.server_close()

    def stats(self) -> dict[str, Any]:
        """The chain's counts (running messages, links, the workqueue's counters)."""
        return self.workers[0].stats() if self.workers else {}  # type: ignore[attr-defined]


def _worker_process(*args: Any, **kwargs: Any) -> Any:
    """Dramatiq's worker process, building this module's Worker (picklable by name, so that
    ``--use-spawn`` children run it too)."""
    dramatiq.cli.Worker = Worker  # type: ignore[misc]
    return _dramatiq_worker_process(*args, **kwargs)


def _positive(option: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"{option} must be a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``dramatiq``'s command line with the cmwq worker: ``python -m cmwq_exec.dramatiq``."""
    parser = dramatiq.cli.make_argument_parser()
    parser.prog = "python -m cmwq_exec.dramatiq"
    parser.description = "Run Dramatiq workers whose messages run on the cmwq pools."
    for action in parser._actions:
        if action.dest == "threads":
            action.default = None
            action.type = functools.partial(_positive, "--threads")
            action.help = ("the most messages running at once per process, where one waiting in "
                           "cmwq_exec.blocking() does not count (default: no limit)")
        elif action.dest == "processes":
            action.type = functools.partial(_positive, "--processes")
    if argv is None:
        argv = sys.argv[1:]
        # Dramatiq reloads on SIGHUP by executing sys.argv again: make that this launcher
        sys.argv = [sys.executable, "-m", "cmwq_exec.dramatiq", *argv]
    args = parser.parse_args(argv)
    try:
        metrics_address()
    except ValueError as exc:
        parser.error(str(exc))
    dramatiq.cli.Worker = Worker  # type: ignore[misc]
    dramatiq.cli.worker_process = _worker_process
    return int(dramatiq.cli.main(args) or 0)


# a task's waits are its sleeps, for blocking detection (CMWQ_DETECT_BLOCKING=1)
detect.add_user_call_site(_Dispatcher._process)


if __name__ == "__main__":
    from cmwq_exec.dramatiq import main as _main  # the importable module's classes, not __main__'s

    sys.exit(_main())
