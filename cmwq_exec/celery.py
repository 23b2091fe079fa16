"""A Celery worker pool whose tasks run as works on cmwq_exec's shared per-CPU pools.

Select it with the ``worker_pool`` setting::

    app.conf.worker_pool = "cmwq_exec.celery:TaskPool"

or, since ``-P`` only accepts Celery's own names, with ``-P custom``::

    CELERY_CUSTOM_WORKER_POOL=cmwq_exec.celery:TaskPool celery -A proj worker -P custom -c 50

What ``-c/--concurrency`` means here
    At most N tasks of this worker *running* at once, where a task asleep inside
    :func:`cmwq_exec.blocking` (or waiting on a cmwq future) does not count: it hands its slot to
    the next task and takes it back when it wakes (``max_running`` of the pool's workqueue). All
    started tasks, asleep or not, stay within the prefetch window, ``worker_prefetch_multiplier`` x N
    (4 x N when the multiplier is 0, unlimited prefetch) (``max_active``). So ``-c 8`` runs 8 tasks
    that compute, or up to 32 that mostly wait on I/O. A wait the watchdog finds without an
    annotation lets another *worker thread* run but does not free a slot: an un-annotated task
    counts as running, as in ``-P threads``. Threads are not created up front; concurrency
    management starts another only when the running one blocks. Every task is queued on one CPU's
    pool (``queue_work_on``, the CPU the consumer ran on at start; another while it is offline): one
    process has one GIL, and one pool keeps as few idle threads as the load needs. Prefetch
    follows N as for every pool; ``pool_grow`` / ``pool_shrink`` and ``--autoscale`` change N at run
    time (:meth:`TaskPool.grow`, :meth:`TaskPool.shrink`).

Everything the ``threads`` pool lacks
    * soft time limit: :class:`celery.exceptions.SoftTimeLimitExceeded` is raised inside the task's
      thread (``PyThreadState_SetAsyncExc``); the task may catch it;
    * hard time limit: the task is reported failed with ``TimeLimitExceeded`` at once (the
      ``timeout_callback``, exactly as prefork does when it kills a child), its slot is given back
      at once, and its thread is unwound by an exception the task's tracer does not record (so the
      result is not written twice). A task that swallows it (``except BaseException:``) keeps
      its thread until it returns by itself: it is *abandoned* - not counted against the
      concurrency, its eventual return value discarded, shown as ``abandoned`` in ``inspect stats``;
    * ``revoke(terminate=True)``: every task gets its own job id (passed as the ``pid`` of
      ``accept_callback``, so ``inspect active`` shows it as ``worker_pid``); ``terminate_job``
      unwinds that task's thread the same way and gives its slot back;
    * every task runs with the worker's app as ``current_app`` (as in prefork's children), even
      when the process's default app is another one;
    * ``expires`` and revocation (by id or by stamped header) are checked again when a task
      *starts*, not only when it arrives: a task may wait in the pool's prefetch window. One
      that expired or was revoked meanwhile is refused as Celery refuses it (REVOKED, the
      ``task_revoked`` signal, the ack), as prefork does by handing tasks over only when a process
      is free;
    * ``worker_process_init`` is sent once, before the first task, as ``-P solo`` sends it (this
      process runs every task);
    * ``grow``/``shrink`` (``--autoscale``, ``pool_grow``, ``pool_shrink``), ``inspect stats`` with
      the pool state, warm shutdown that finishes started tasks and leaves unstarted ones unacked
      (the broker delivers them again), cold shutdown that unwinds the running ones.

Async exceptions arrive when the thread next executes Python bytecode: a task blocked in one long
C call (``time.sleep(60)``, a socket read without timeout) sees its limit when that call returns.
They can land anywhere in that thread's Python code, including library code that is not written to
be interrupted. On CPython 3.13 one that lands while a function spins in a tight loop may skip that
function's own ``except``/``finally`` and surface in its caller (python/cpython#139622); the pool
still unwinds the thread and reports the limit.

Callbacks (accept, result, timeout) run on the consumer's event loop thread when there is one
(redis, amqp): the broker connection is only ever used from that thread, as with prefork. Without an
event loop they run, in order, as works of a callbacks workqueue made on first use.

Metrics: set ``cmwq_metrics_port`` (or the environment variable ``CMWQ_METRICS_PORT``) to serve
Prometheus metrics from the worker process; ``cmwq_metrics_addr`` / ``CMWQ_METRICS_ADDR`` (default
``127.0.0.1``) chooses the address.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from signal import SIGUSR1
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import _state as _celery_state
from celery import signals
from celery.concurrency.base import BasePool
from celery.exceptions import ImproperlyConfigured, SoftTimeLimitExceeded
from celery.utils.nodenames import default_nodename
from celery.worker import state as _worker_state

from . import celery_processes
from .core import timer as _timer
from .core.workqueue import WQ, Work, WorkQueue

__all__ = ["TaskPool"]

log = logging.getLogger("cmwq_exec.celery")

# -- async exceptions --------------------------------------------------------------------------------

# A private prototype rather than ctypes.pythonapi's shared function object, whose argtypes other
# code may set differently. ``exc`` is a class pointer (the interpreter raises ``exc()``), or NULL to
# clear a pending one. PyDLL-style: the GIL is held during the call.
_SetAsyncExc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


def _async_raise(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Make ``exc_type`` raise in thread ``thread_id`` at its next bytecode; None clears it."""
    _SetAsyncExc(thread_id, None if exc_type is None else id(exc_type))


class _Unwind(BaseException):
    """Unwinds a task thread after a hard time limit or a terminate.

    A BaseException, so Celery's tracer re-raises it instead of recording a result: the result was
    already reported by the timeout callback, or by the revoke. Never leaves this module.
    """


# -- jobs ----------------------------------------------------------------------------------------------

_QUEUED, _RUNNING, _DONE, _CANCELLED = "queued", "running", "done", "cancelled"


class _Job:
    """One task handed to the pool; also the ApplyResult Celery keeps a weak reference to.

    Fields: ``I:`` set at creation; ``P:`` under the pool's ``_lock``; ``X:`` the running thread's.

    Invariants (under the pool's lock):
      * ``in_target`` is True only while ``state == _RUNNING``, and only then may another thread
        inject an exception into ``thread_id``;
      * at most two injections per job ever: one SoftTimeLimitExceeded (soft limit, or a
        terminate with SIGUSR1 as prefork delivers it) and one ``_Unwind`` (hard limit or
        terminate, whichever comes first); ``soft_sent``/``unwind`` record them;
      * a job with ``unwind`` set while it ran is *abandoned*: it holds no concurrency slot
        (the pool raised max_active by one for it until its thread returns);
      * a job goes from ``_QUEUED`` to ``_RUNNING`` only if its request may not be revoked or
        ``cleared`` is set; otherwise it stays ``_QUEUED``, holding no workqueue slot, until
        ``_refuse`` on the callbacks' thread ends it (``_DONE``) or queues it again.
    """

    __slots__ = ("pool", "pid", "target", "args", "kwargs", "callback", "accept_callback",
                 "error_callback", "timeout_callback", "soft", "hard", "state", "in_target",
                 "thread_id", "soft_sent", "unwind", "revoked_early", "timers", "request",
                 "cleared", "__weakref__")

    def __init__(self, pool: TaskPool, pid: int, target: Callable[..., Any], args: Any, kwargs: Any,
                 callback: Any, accept_callback: Any, error_callback: Any, timeout_callback: Any,
                 soft: float | None, hard: float | None) -> None:
        self.pool = pool  # I
        self.pid = pid  # I: the job id Celery sees as worker_pid
        self.target = target  # I
        self.args = args  # I
        self.kwargs = kwargs  # I
        self.callback = callback  # I
        self.accept_callback = accept_callback  # I
        self.error_callback = error_callback  # I
        self.timeout_callback = timeout_callback  # I
        self.soft = soft  # I: seconds, or None
        self.hard = hard  # I: seconds, or None
        self.state = _QUEUED  # P
        self.in_target = False  # P
        self.thread_id = 0  # P: set when it starts
        self.soft_sent = False  # P
        self.unwind: str | None = None  # P: "hard" or "terminated" once decided
        self.revoked_early = False  # P: terminate() before it started: do not run the target
        self.timers: tuple[_timer.Timer, ...] = ()  # X: the limits' timers
        self.request = _request_of(accept_callback)  # I: Celery's Request, or None
        self.cleared = False  # P: Request.revoked() said no once: start it without asking again

    def terminate(self, signal: int | None = None) -> None:
        """Celery's ApplyResult.terminate: revoke(terminate=True) of this task."""
        self.pool._terminate(self, signal)

    def __repr__(self) -> str:
        return f"<cmwq celery job {self.pid} {self.state}>"


# -- expiry and revocation at start ----------------------------------------------------------------

# Celery checks ``expires`` and the revoked set (Request.revoked()) when a message arrives and when
# the consumer hands the request to the pool; prefork (a semaphore, ``uses_semaphore``) hands it
# over only when a process is free, so that is when the task starts. This pool takes a whole
# prefetch window at once, so a task can wait in it: it must be checked again when it starts.
#
# The hook: Celery binds the callbacks it passes to ``apply_async`` to the Request, so the
# accept callback's ``__self__`` is the Request itself (``correlation_id`` only names it, and
# ``worker_state.reserved_requests`` would need a scan). Request.revoked() is the one place that
# decides *and* reports (log, REVOKED in the backend, the task-revoked event, the ack, the
# ``task_revoked`` signal), and the report uses the broker connection and the consumer's state,
# so it must run where the other callbacks run. A worker thread therefore only asks
# :func:`_may_be_revoked`, a pure test that is true whenever revoked() would be (a set lookup,
# a clock read: cheap enough for every start), and hands the job to the consumer, which calls
# revoked(); if that says no after all (a revoked stamp name with another value), the job is
# queued again and starts without asking twice.


def _request_of(accept_callback: Any) -> Any:
    """The Celery Request that ``accept_callback`` is bound to, or None (a plain callable)."""
    request = getattr(accept_callback, "__self__", None)
    return request if callable(getattr(request, "revoked", None)) else None


def _may_be_revoked(request: Any) -> bool:
    """True whenever ``request.revoked()`` would be: revoked by id, expired, or carrying a stamp
    whose header has revoked values. No side effects; safe on any thread (a reader of sets and
    dicts that the consumer thread updates one operation at a time)."""
    if request.id in _worker_state.revoked:
        return True
    expires = request.expires
    if expires is not None and datetime.now(timezone.utc if expires.tzinfo else None) > expires:
        return True  # the same comparison as Request.maybe_expire
    revoked_stamps = _worker_state.revoked_stamps
    return bool(revoked_stamps) and any(header in revoked_stamps for header in request.stamped_headers)


@contextmanager
def _current_app(app: Any) -> Iterator[None]:
    """Make ``app`` the current app of this thread for the block, as prefork makes the worker's app
    current in its children.

    Celery resolves ``current_app`` per thread (``celery._state._tls``), falling back to the
    process's *default* app, which need not be the worker's: a second app, an embedded test
    worker. Its tracer (``trace_task_ret``) looks the task up through ``current_app``, and task
    code uses it too. Restored afterwards: cmwq's worker threads run every workqueue's works.
    """
    if app is None:
        yield
        return
    previous = getattr(_celery_state._tls, "current_app", None)
    app.set_current()
    try:
        yield
    finally:
        _celery_state._set_current_app(previous)


def _terminating() -> bool:
    """Has the worker begun a cold shutdown (Celery's own test, celery.worker.state.maybe_shutdown)?"""
    should_terminate = getattr(_worker_state, "should_terminate", None)
    return should_terminate is not None and should_terminate is not False


def _shutting_down() -> bool:
    """Has the worker been told to shut down, warm or cold? Celery's signal handlers set these on
    the main thread at once; the pool hears of it (close, stop) only when the event loop ends."""
    return any(flag is not None and flag is not False
               for flag in (getattr(_worker_state, "should_stop", None),
                            getattr(_worker_state, "should_terminate", None)))


def _check_limit(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImproperlyConfigured(
            f"cmwq_exec.celery.TaskPool: {what} must be a non-negative integer "
            f"(the number of tasks that may run at once), got {value!r}")
    return value


def _check_seconds(value: object, what: str) -> float | None:
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"cmwq_exec.celery.TaskPool: {what} must be a finite number of seconds >= 0, "
                         f"got {value!r}")
    return float(value)


class TaskPool(BasePool):
    """Celery pool running each task as a work of one cmwq workqueue (``max_active`` = concurrency).

    Fields: ``I:`` set in ``__init__``/``on_start``; ``P:`` under ``_lock``; ``O:`` under
    ``_outbox_lock``; ``M:`` the consumer's (main) thread.

    Invariants (under ``_lock``):
      * ``_jobs`` holds every queued and running job (abandoned ones included) by job id;
      * the workqueue's max_active is ``max(1, limit + abandoned)``; while ``limit`` is 0 new jobs
        wait in ``_held`` (a workqueue cannot have max_active 0);
      * after ``_closing`` no job starts its target.
    """

    body_can_be_buffer = True
    #: stopping waits for threads: not from inside a signal handler.
    signal_safe = False
    uses_semaphore = False
    task_join_will_block = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit: int = _check_limit(self.limit, "concurrency (-c/--concurrency, worker_concurrency)")
        self._default_soft = _check_seconds(self.options.get("soft_timeout"), "soft time limit")  # I
        self._default_hard = _check_seconds(self.options.get("timeout"), "time limit")  # I
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a job stops running
        self._jobs: dict[int, _Job] = {}  # P
        self._held: deque[Work] = deque()  # P: works waiting while limit == 0
        self._abandoned = 0  # P
        self._closing = False  # P
        self._job_ids = itertools.count(1)
        self._outbox_lock = threading.Lock()
        self._outbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()  # O
        self._drain_scheduled = False  # O
        self._drain_lock = threading.Lock()  # one drainer at a time: callbacks run in order
        self._hub: Any = None  # O: the consumer's event loop while it runs
        self._wake_r = self._wake_w = -1  # I: the pipe that wakes the event loop
        self._loop: Any = None  # M: the event loop our pipe is registered with
        self._wq: WorkQueue | None = None  # I
        self._control: WorkQueue | None = None  # O: made on first use, see _deliver
        self._drain_work = Work(self._drain_outbox)  # I
        self._metrics_server: Any = None  # I
        self._limits = (0, 0)  # P: the (max_active, max_running) we last gave the workqueue
        self._window = 4  # I: in-flight tasks per concurrency slot (the prefetch multiplier)
        self._cpu: int | None = None  # I: the CPU whose pool runs our tasks (queue_work_on)
        conf = self.app.conf if self.app is not None else {}
        # I: children to supervise (0: this process runs the tasks), see cmwq_exec.celery_processes
        self._processes = celery_processes.processes_wanted(conf.get("cmwq_processes"))
        self._child = celery_processes.child_index()  # I: our index if a supervisor started us

    # -- start and stop ---------------------------------------------------------------------------

    def on_start(self) -> None:
        """Create the workqueues (and the metrics server if configured); or, with
        ``cmwq_processes``, supervise the child processes until the worker stops."""
        if self._processes:
            hostname = (self.options.get("initargs") or (None, None))[1]
            supervisor = celery_processes.Supervisor(default_nodename(hostname), self._processes,
                                                     self._metrics_address(), app=self.app)
            supervisor.run()  # raises WorkerShutdown / WorkerTerminate once the children are gone
        if self._child is not None:
            celery_processes.become_child(self._child)  # pinned before the engine reads its CPUs
        # A rescuer: a worker process serving a broker must make progress even when no worker
        # thread can be created (the max_total_workers cap, the process's thread limit).
        multiplier = self.app.conf.get("worker_prefetch_multiplier") if self.app is not None else None
        if isinstance(multiplier, int) and not isinstance(multiplier, bool) and multiplier >= 1:
            self._window = multiplier
        from .core.system import get_system

        self._cpu = get_system().local_pool().cpu
        self._limits = self._wanted_limits()
        max_active, max_running = self._limits
        self._wq = WorkQueue("celery", WQ.RESCUER, max_active=max_active, max_running=max_running)
        self._wq._flush_at_exit = False  # Celery's warm or cold shutdown decides what to wait for
        self._start_metrics()
        # This process runs every task, as with solo: like solo, tell per-process setup code
        # (worker_process_init handlers: database connections, tracing) once, before any task.
        hostname = (self.options.get("initargs") or (None, None))[1]
        signals.worker_process_init.send(sender=hostname)

    def _metrics_address(self) -> tuple[int, str] | None:
        """(port, address) of the metrics endpoint the worker is configured with, or None."""
        conf = self.app.conf if self.app is not None else {}
        port = conf.get("cmwq_metrics_port") or os.environ.get("CMWQ_METRICS_PORT")
        if port in (None, ""):
            return None
        addr = conf.get("cmwq_metrics_addr") or os.environ.get("CMWQ_METRICS_ADDR") or "127.0.0.1"
        try:
            return int(port), addr
        except (TypeError, ValueError):
            raise ImproperlyConfigured(
                f"cmwq_metrics_port / CMWQ_METRICS_PORT must be a TCP port number, got {port!r}") from None

    def _start_metrics(self) -> None:
        address = self._metrics_address()
        if address is None:
            return
        port, addr = address
        if self._child is not None:
            port, addr = 0, "127.0.0.1"  # the supervisor serves the worker's endpoint and reads ours
        try:
            from . import metrics
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"cmwq_metrics_port is set but cmwq_exec.metrics cannot be imported ({exc}); "
                "install prometheus_client") from exc
        self._metrics_server, _ = metrics.start_http_server(port, addr)
        if self._child is not None:
            celery_processes.report_metrics_port(self._metrics_server.server_port)
            return
        log.info("cmwq_exec: serving Prometheus metrics on http://%s:%s/metrics", addr, port)

    def register_with_event_loop(self, loop: Any) -> None:
        """Deliver callbacks on the consumer's event loop (called again after a reconnect, whose
        hub reset dropped our reader).

        A pipe wakes the loop: kombu's ``call_soon`` only became thread-safe (and able to wake a
        sleeping loop) in recent versions.
        """
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self._wake_r, self._on_wakeup)
        self._loop = loop
        with self._outbox_lock:
            self._hub = loop
            self._drain_scheduled = True
        self._wake()  # whatever queued up while no loop ran

    def on_stop(self) -> None:
        """Warm shutdown: tasks not started are dropped unacked (the broker redelivers them when
        the connection closes); started tasks finish; then every callback is delivered.
        Abandoned tasks (past their hard limit) are not waited for.

        Celery's cold shutdown (SIGQUIT) also ends here: it cancels the requests it knows are active,
        then stops the pool. A task that started just before has its accept callback still on the
        way to the event loop, so Celery does not know it and would wait for it: once Celery has
        decided to terminate, stopping is terminating."""
        if _terminating():
            self.on_terminate()
            return
        self._stop_delivering_to_hub()
        with self._lock:
            self._close_locked()
            while any(job.state is _RUNNING and job.unwind is None for job in self._jobs.values()):
                self._lock.release()
                try:
                    self._drain_outbox()
                finally:
                    self._lock.acquire()
                self._idle.wait(0.05)
        self._drain_outbox()
        self._shutdown()

    def on_terminate(self) -> None:
        """Cold shutdown: drop unstarted tasks and unwind the running ones (no result is written
        for them; with acks_late their messages return to the broker)."""
        self._stop_delivering_to_hub()
        with self._lock:
            self._close_locked()
            for job in self._jobs.values():
                self._unwind_locked(job, "terminated")
        self._drain_outbox()
        self._shutdown()

    def on_close(self) -> None:
        """The worker's shutdown begins (Celery closes the pool before it stops the consumer and
        then the pool): from here on no task starts, as prefork hands none to a process; the ones
        not started stay unacked for the broker to deliver again."""
        with self._lock:
            self._close_locked()

    def flush(self) -> None:
        """The connection was lost: queued tasks can no longer be acked, the broker will deliver
        them again, so they must not run here."""
        with self._lock:
            self._cancel_queued_locked()

    def _close_locked(self) -> None:
        self._closing = True
        self._cancel_queued_locked()

    def _cancel_queued_locked(self) -> None:
        for job in list(self._jobs.values()):
            if job.state is _QUEUED:
                self._cancel_locked(job)
        self._held.clear()

    def _cancel_locked(self, job: _Job) -> None:
        """A job that never started never will: it is not acked (its accept callback is what acks
        it), so the broker delivers it again. P: held."""
        job.state = _CANCELLED
        self._jobs.pop(job.pid, None)
        self._idle.notify_all()

    def _stop_delivering_to_hub(self) -> None:
        """The event loop stopped for good: from now on the control workqueue (and the stopping
        thread) run the callbacks."""
        with self._outbox_lock:
            self._hub = None
            self._drain_scheduled = False

    def _shutdown(self) -> None:
        """Release what on_start made. The workqueues go only when no thread of ours is left
        (an abandoned task may still run: then they stay, idle, until the process exits).

        Celery's cold-shutdown handler stops the pool from inside a signal handler and then
        relies on its event loop noticing ``should_terminate``; a loop asleep in poll would only
        notice at its next timer (10 s on amqp). So the wakeup pipe is poked, and left to the
        loop, which unregisters it when it closes (the two fds go with the process).
        """
        if self._loop is not None and self._wake_w >= 0:
            self._wake()
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            idle = not self._jobs
        if idle:
            for wq in (self._wq, self._control):
                if wq is not None:
                    wq.destroy()

    # -- applying ---------------------------------------------------------------------------------

    def on_apply(self, target: Callable[..., Any], args: Any = None, kwargs: Any = None,
                 callback: Any = None, accept_callback: Any = None, error_callback: Any = None,
                 timeout_callback: Any = None, soft_timeout: float | None = None,
                 timeout: float | None = None, **_: Any) -> _Job:
        """Queue one task; returns its job (Celery keeps it to ``terminate()`` it)."""
        soft = _check_seconds(soft_timeout, "soft_time_limit")
        hard = _check_seconds(timeout, "time_limit")
        job = _Job(self, next(self._job_ids), target, args or (), kwargs or {}, callback,
                   accept_callback, error_callback, timeout_callback,
                   self._default_soft if soft is None else soft,
                   self._default_hard if hard is None else hard)
        work = Work(self._run, job)
        with self._lock:
            if self._closing:
                # Never started, never acked: the broker delivers it again after we disconnect.
                job.state = _CANCELLED
                return job
            self._jobs[job.pid] = job
            if self.limit == 0:
                self._held.append(work)
                return job
        self._queue(work)
        return job

    def _queue(self, work: Work) -> None:
        assert self._wq is not None and self._cpu is not None  # on_start set both
        self._wq.queue_work_on(self._cpu, work)

    def _run(self, job: _Job) -> None:
        """Run one task on a cmwq worker thread, with the worker's app as the current app."""
        with _current_app(self.app):
            self._run_job(job)

    def _run_job(self, job: _Job) -> None:
        """Start, run and report one job.

        The only code into which another thread may inject an exception is between setting
        ``in_target`` and the end of the guarded ``_leave`` calls below; _leave clears whatever
        is still pending, so nothing escapes into the worker once this returns.
        """
        with self._lock:
            if job.state is not _QUEUED:
                return  # cancelled by shutdown or a lost connection
            if self._closing or _shutting_down():
                self._cancel_locked(job)  # a shutdown starts nothing: unacked, the broker redelivers it
                return
            refuse = job.request is not None and not job.cleared and _may_be_revoked(job.request)
            if not refuse:
                job.state = _RUNNING
                job.thread_id = threading.get_ident()
        if refuse:
            self._deliver(self._refuse, job)  # it stays queued until the consumer decides
            return
        self._deliver(job.accept_callback, job.pid, time.monotonic())
        self._arm_limits(job)
        outcome: tuple[Any, Any] | None = None
        try:
            try:
                with self._lock:
                    if job.unwind is not None or job.revoked_early:
                        raise _Unwind()
                    job.in_target = True
                outcome = (job.callback, job.target(*job.args, **job.kwargs))
            finally:
                # An exception may be injected (at most three times) until _leave has run; each
                # firing is caught by the next level and _leave runs again (it is idempotent).
                try:
                    self._leave(job)
                except BaseException:
                    try:
                        self._leave(job)
                    except BaseException:
                        try:
                            self._leave(job)
                        except BaseException:
                            self._leave(job)
        except _Unwind:
            outcome = None
        except Exception:
            outcome = (job.error_callback, ExceptionInfo())
        except BaseException as exc:  # SystemExit, KeyboardInterrupt... from the task itself
            try:
                raise WorkerLostError(f"task raised {exc!r}") from exc
            except WorkerLostError:
                outcome = (job.error_callback, ExceptionInfo())
        # From here on nothing can be injected: the job is DONE.
        for timer in job.timers:
            timer.cancel()
        with self._lock:
            unwound = job.unwind is not None
            self._jobs.pop(job.pid, None)
            self._idle.notify_all()
        if unwound:
            self._release_abandoned(job)
            return  # already reported (timeout_callback, or revoked by Celery)
        if outcome is not None and outcome[0] is not None:
            self._deliver(outcome[0], outcome[1])

    def _refuse(self, job: _Job) -> None:
        """On the consumer's thread: let Celery refuse a revoked or expired job, as it refuses one
        when handing it to the pool (see "expiry and revocation at start"); start it if Celery
        does not."""
        with self._lock:
            if job.state is not _QUEUED:
                return  # cancelled meanwhile (shutdown, lost connection): the broker redelivers it
        if job.request.revoked():  # logs, marks REVOKED, sends task-revoked, acks, signals
            with self._lock:
                if job.state is _QUEUED:
                    job.state = _DONE
                    self._jobs.pop(job.pid, None)
                    self._idle.notify_all()
            return
        work = Work(self._run, job)
        with self._lock:
            if job.state is not _QUEUED or self._closing:
                return  # closing: never started, never acked, as in on_apply
            job.cleared = True
            if self.limit == 0:
                self._held.append(work)
                return
        self._queue(work)

    def _leave(self, job: _Job) -> None:
        """Close the injection window (idempotent; see _run)."""
        with self._lock:
            job.in_target = False
            job.state = _DONE
        _async_raise(job.thread_id, None)

    def _arm_limits(self, job: _Job) -> None:
        """Limits fire on cmwq's timer thread: short callbacks that take our lock, inject, and
        hand the timeout callback to _deliver, so they never wait for a worker thread."""
        timers = []
        if job.soft is not None:
            timers.append(_timer.add_timer(job.soft, functools.partial(self._soft_limit, job)))
        if job.hard is not None:
            timers.append(_timer.add_timer(job.hard, functools.partial(self._hard_limit, job)))
        job.timers = tuple(timers)

    # -- limits and terminate -------------------------------------------------------------------

    def _soft_limit(self, job: _Job) -> None:
        with self._lock:
            if job.state is not _RUNNING or job.soft_sent or job.unwind is not None:
                return
            job.soft_sent = True
            if job.in_target:
                _async_raise(job.thread_id, SoftTimeLimitExceeded)
        self._deliver(job.timeout_callback, True, job.soft)

    def _hard_limit(self, job: _Job) -> None:
        with self._lock:
            if job.state is not _RUNNING or job.unwind is not None:
                return
            self._unwind_locked(job, "hard")
        self._deliver(job.timeout_callback, False, job.hard)

    def _terminate(self, job: _Job, signum: int | None) -> None:
        with self._lock:
            if signum == SIGUSR1:
                # prefork's soft-limit signal: the task gets SoftTimeLimitExceeded and goes on
                if job.state is _RUNNING and job.in_target and not job.soft_sent:
                    job.soft_sent = True
                    _async_raise(job.thread_id, SoftTimeLimitExceeded)
            elif job.state is _QUEUED:
                job.revoked_early = True  # it will report accepted (so Celery revokes) and not run
            elif job.state is _RUNNING:
                self._unwind_locked(job, "terminated")

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        """revoke(terminate=True) and cancel: unwind the thread running job ``pid`` (whatever the
        signal, except SIGUSR1 which raises SoftTimeLimitExceeded in it, as in prefork)."""
        with self._lock:
            job = self._jobs.get(pid)
        if job is not None:
            self._terminate(job, signal)

    def _unwind_locked(self, job: _Job, why: str) -> None:
        """Decide that ``job`` ends now; give its slot back. P: held."""
        if job.state is not _RUNNING or job.unwind is not None:
            return
        job.unwind = why
        if job.in_target:
            _async_raise(job.thread_id, _Unwind)
            self._disarm_request(job)
        self._abandoned += 1
        self._update_max_active_locked()

    def _disarm_request(self, job: _Job) -> None:
        """Make the tracer of an unwound task record nothing if the task survives the unwind.

        Its outcome is already reported (TimeLimitExceeded, or REVOKED). A task that swallows the
        unwind and returns would otherwise have its tracer store SUCCESS over it, run its
        callbacks and count a chord part twice. The tracer reads those from the request
        Context it pushed on the task's request stack (a per-thread stack keyed by thread id),
        so flag that Context: ``ignore_result``, no chord, chain, callbacks or errbacks. Best
        effort: it relies on Celery internals and logs, never raises, if they change.
        """
        try:
            name, task_id = job.args[0], job.args[1]
            task = self.app.tasks[name] if self.app is not None else None
            storage = task.request_stack._local.__storage__ if task is not None else {}
            for context in storage.get(job.thread_id, {}).get("stack", ()):
                if getattr(context, "id", None) == task_id:
                    context.ignore_result = True
                    context.chord = context.chain = context.callbacks = context.errbacks = None
        except Exception:  # noqa: BLE001
            log.debug("cmwq_exec.celery: could not disarm the request of job %s", job.pid, exc_info=True)

    def _release_abandoned(self, job: _Job) -> None:
        with self._lock:
            self._abandoned -= 1
            self._update_max_active_locked()

    # -- concurrency --------------------------------------------------------------------------------

    def _wanted_limits(self) -> tuple[int, int]:
        """(max_active, max_running) for the current limit. An abandoned task keeps running: it
        takes one more of each until its thread returns."""
        running = max(1, self.limit + self._abandoned)
        return max(running, self._window * self.limit + self._abandoned), running

    def _update_max_active_locked(self) -> None:
        """P: held. Lock order: ours, then the workqueue's."""
        wanted = self._wanted_limits()
        if wanted != self._limits and self._wq is not None:
            self._limits = wanted
            self._wq.set_max_active(*wanted)

    def grow(self, n: int = 1) -> None:
        """Allow ``n`` more tasks to run at once (pool_grow, autoscale)."""
        n = _check_limit(n, "pool_grow n")
        with self._lock:
            self.limit += n
            self._update_max_active_locked()
            held = list(self._held) if self.limit else []
            if held:
                self._held.clear()
        for work in held:
            self._queue(work)

    def shrink(self, n: int = 1) -> None:
        """Allow ``n`` fewer tasks to run at once. Running tasks finish; no new one starts until
        fewer than the new limit run."""
        n = _check_limit(n, "pool_shrink n")
        with self._lock:
            if n > self.limit:
                raise ValueError(f"cannot shrink the pool by {n}: its limit is {self.limit}")
            self.limit -= n
            self._update_max_active_locked()

    @property
    def num_processes(self) -> int:
        """The concurrency limit (Celery sizes prefetch and autoscaling by it)."""
        return self.limit

    # -- callbacks ----------------------------------------------------------------------------------

    def _deliver(self, fn: Callable[..., Any] | None, *args: Any) -> None:
        """Run ``fn(*args)`` on the consumer's thread (or the control workqueue), after every
        callback delivered before it."""
        if fn is None:
            return
        with self._outbox_lock:
            self._outbox.append((fn, args))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
            hub = self._hub
        if hub is not None:
            self._wake()
        else:
            self._control_queue().queue_work(self._drain_work)

    def _control_queue(self) -> WorkQueue:
        """The workqueue that runs callbacks when no event loop does (a transport without one,
        or shutdown), made on first use: unbound so it never waits behind a CPU hog, with a
        rescuer so it progresses even when no worker thread can be created."""
        with self._outbox_lock:
            if self._control is None:
                self._control = WorkQueue(f"celery-callbacks.{os.getpid()}.{id(self):x}",
                                          WQ.UNBOUND | WQ.RESCUER)
                self._control._flush_at_exit = False  # as the task workqueue's
            return self._control

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full: the loop has plenty of wakeups pending
        except OSError:
            log.debug("cmwq_exec.celery: wakeup pipe closed", exc_info=True)

    def _on_wakeup(self, *_: Any) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._drain_outbox()

    def _drain_outbox(self) -> None:
        with self._drain_lock, _current_app(self.app):
            while True:
                with self._outbox_lock:
                    if not self._outbox:
                        self._drain_scheduled = False
                        return
                    batch, self._outbox = self._outbox, deque()
                for fn, args in batch:
                    try:
                        fn(*args)
                    except Exception:
                        log.exception("cmwq_exec.celery: callback %r failed", fn)

    # -- inspect stats ------------------------------------------------------------------------------

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        with self._lock:
            jobs = list(self._jobs.values())
            held = len(self._held)
            limit = self.limit
            max_active, max_running = self._limits
        running = sum(1 for job in jobs if job.state is _RUNNING and job.unwind is None)
        abandoned = sum(1 for job in jobs if job.unwind is not None)
        info.update({
            "max-concurrency": limit,
            # the workqueue's limits: running tasks (-c plus abandoned ones), and all in flight
            # (the prefetch window), see "What -c means"
            "max-running": max_running,
            "max-in-flight": max_active,
            "running": running,
            "queued": sum(1 for job in jobs if job.state is _QUEUED),
            "held": held,
            "abandoned": abandoned,
            "timeouts": [self._default_soft, self._default_hard],
        })
        try:
            from .core.system import get_system

            pools = [pool.stats() for pool in get_system().pools]
        except Exception as exc:  # stats must never break inspect
            pools = [{"error": repr(exc)}]
        if self._child is not None:
            cpu = int(os.environ.get(celery_processes.CHILD_CPU) or -1)
            info["cmwq-child"] = {"index": self._child, "cpu": cpu, "parent-pid": os.getppid()}
        info["workers"] = sum(p.get("nr_workers", 0) for p in pools)
        info["pools"] = pools
        if self._wq is not None:
            info["workqueue"] = {k: v for k, v in self._wq.stats().items()
                                 if k not in ("queue_latency", "execution")}
        return info
