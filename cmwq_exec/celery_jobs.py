"""A task handed to the Celery pool, and its limits: what :class:`cmwq_exec.celery.TaskPool` runs.

This module owns a job's life from the pool's side: its fields and states, the test for a revoked
or expired request at its start, the asynchronous exceptions that carry its limits into its thread
(soft and hard time limits, ``revoke(terminate=True)``), and what becomes of a job whose thread
survives the unwind (*abandoned*: not counted, logged with where its thread is, shown in
``inspect active``). The pool itself (cmwq_exec.celery) queues, runs and reports jobs.

Asynchronous exceptions. The limits raise into the task's thread inside the job's injection
window, with the one implementation every task-queue front-end shares (:mod:`cmwq_exec.injection`:
the window, its gate, the numbered race the gate prevents, and ``INJECTIONS``).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from signal import SIGUSR1
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import _state as _celery_state
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils import log as _celery_log
from celery.worker import state as _worker_state

from . import detect
from .core import timer as _timer
from .core.lockdep import must_hold
from .injection import async_raise, close_window_surely, inject, open_window

log = logging.getLogger("cmwq_exec.celery")

#: Seconds a job's thread has to return after its unwind before it is logged as abandoned: long
#: enough for any thread that is not swallowing the unwind (an arbitrary figure).
ABANDON_GRACE = 1.0


class Unwind(BaseException):
    """Unwinds a task thread after a hard time limit or a terminate.

    A BaseException, so Celery's tracer re-raises it instead of recording a result: the result was
    already reported by the timeout callback, or by the revoke. Never leaves the pool.
    """


QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


#: Seconds between two looks for the window of a job whose soft limit passed before its code ran.
SOFT_RETRY = 0.01


class Job:
    """One task handed to the pool; also the ApplyResult Celery keeps a weak reference to.

    Fields: ``I:`` set at creation; ``P:`` under the pool's ``_lock``; ``G:`` under the job's
    ``gate`` (written also under ``_lock`` where said); ``X:`` the running thread's.

    Invariants:
      * ``in_target`` is True only while ``state == RUNNING``, and only then may another thread
        inject an exception into ``thread_id``, holding ``gate`` (see the module's docstring);
      * at most ``INJECTIONS`` injections per job: ``soft_sent``/``unwind`` record them;
      * a job with ``unwind`` set while it ran is *abandoned*: it holds no concurrency slot
        (the pool raised max_active by one for it until its thread returns);
      * a job goes from ``QUEUED`` to ``RUNNING`` only if its request may not be revoked or
        ``cleared`` is set, and never once the worker shuts down; otherwise it stays ``QUEUED``,
        holding no workqueue slot, until ``_refuse`` on the callbacks' thread ends it (``DONE``)
        or queues it again.
    """

    __slots__ = ("pool", "pid", "target", "args", "kwargs", "callback", "accept_callback",
                 "error_callback", "timeout_callback", "soft", "hard", "state", "in_target",
                 "thread_id", "soft_sent", "unwind", "revoked_early", "timers", "request",
                 "cleared", "gate", "finished", "grace", "__weakref__")

    def __init__(self, pool: Any, pid: int, target: Callable[..., Any], args: Any, kwargs: Any,
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
        self.state = QUEUED  # P
        self.in_target = False  # G
        self.thread_id = 0  # P: set when it starts
        self.soft_sent = False  # P
        self.unwind: str | None = None  # P: "hard" or "terminated" once decided
        self.revoked_early = False  # P: terminate() before it started: do not run the target
        self.timers: tuple[_timer.Timer, ...] = ()  # X: the limits' timers
        self.request = request_of(accept_callback)  # I: Celery's Request, or None
        self.cleared = False  # P: Request.revoked() said no once: start it without asking again
        self.gate = threading.Lock()  # the injection window's guard (see the module's docstring)
        self.finished = False  # G: its target returned (or never ran): the window is closed for good
        self.grace: _timer.Timer | None = None  # P: logs the job abandoned unless it ends first

    def terminate(self, signal: int | None = None) -> None:
        """Celery's ApplyResult.terminate: revoke(terminate=True) of this task."""
        self.pool.terminate_job(self.pid, signal)

    def where(self) -> str:
        """``file:line in function`` of the frame its thread runs now ('' if it runs none)."""
        frame = sys._current_frames().get(self.thread_id)
        if frame is None:
            return ""
        code = frame.f_code
        return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"

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
# :func:`may_be_revoked`, a pure test that is true whenever revoked() would be (a set lookup,
# a clock read: cheap enough for every start), and hands the job to the consumer, which calls
# revoked(); if that says no after all (a revoked stamp name with another value), the job is
# queued again and starts without asking twice.


def request_of(accept_callback: Any) -> Any:
    """The Celery Request that ``accept_callback`` is bound to, or None (a plain callable)."""
    request = getattr(accept_callback, "__self__", None)
    return request if callable(getattr(request, "revoked", None)) else None


def may_be_revoked(request: Any) -> bool:
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
def current_app(app: Any) -> Iterator[None]:
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


def terminating() -> bool:
    """Has the worker begun a cold shutdown (Celery's own test, celery.worker.state.maybe_shutdown)?"""
    should_terminate = getattr(_worker_state, "should_terminate", None)
    return should_terminate is not None and should_terminate is not False


def in_signal_handler() -> bool:
    """Does Celery call us from its cold-shutdown signal handler (``on_cold_shutdown`` stops the
    pool there)? The handler runs on the event loop's thread wherever the signal caught it: maybe
    inside one of the pool's critical sections (``on_apply`` under the pool's lock, a callback
    delivery), so it must take no lock of ours. Celery's own flag (celery.utils.log.in_sighandler)."""
    return bool(getattr(_celery_log, "_in_sighandler", False))


def shutting_down() -> bool:
    """Has the worker been told to shut down, warm or cold? Celery's signal handlers set these on
    the main thread at once; the pool hears of it (close, stop) only when the event loop ends."""
    should_stop = getattr(_worker_state, "should_stop", None)
    return terminating() or (should_stop is not None and should_stop is not False)


def check_seconds(value: object, what: str) -> float | None:
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"cmwq_exec.celery.TaskPool: {what} must be a finite number of seconds >= 0, "
                         f"got {value!r}")
    return float(value)


def workqueue_limits(limit: int, window: int, abandoned: int) -> tuple[int, int]:
    """(max_active, max_running) of the pool's workqueue for concurrency ``limit``, ``window``
    tasks in flight per slot, and ``abandoned`` jobs: an abandoned task keeps running, so it takes
    one more of each until its thread returns."""
    running = max(1, limit + abandoned)
    return max(running, window * limit + abandoned), running


# -- the window ------------------------------------------------------------------------------------


def call_target(job: Job) -> tuple[Callable[..., Any], Any] | None:
    """Call the job's target inside its injection window; (callback, argument) to report,
    or None if it was unwound."""
    outcome: tuple[Callable[..., Any], Any] | None = None
    try:
        try:
            if not open_window(job):
                raise Unwind()
            outcome = (job.callback, job.target(*job.args, **job.kwargs))
        finally:
            close_window_surely(job)
    except Unwind:
        return None
    except Exception:
        return (job.error_callback, ExceptionInfo())
    except BaseException as exc:  # SystemExit, KeyboardInterrupt... from the task itself
        try:
            raise WorkerLostError(f"task raised {exc!r}") from exc
        except WorkerLostError:
            return (job.error_callback, ExceptionInfo())
    return outcome if outcome is not None and outcome[0] is not None else None


# -- limits, terminate, abandon ----------------------------------------------------------------------


class JobLimits:
    """The limits of one pool's running jobs: the soft and hard timers, terminate, and the jobs
    abandoned because their thread outlived the unwind.

    Fields: ``P:`` under the pool's ``_lock``. The timers fire on cmwq's timer thread: short
    callbacks that take the pool's lock, inject, and hand the timeout callback to the pool's
    outbox, so they never wait for a worker thread.
    """

    def __init__(self, pool: Any) -> None:
        self.pool = pool  # the TaskPool: its _lock, _jobs, _deliver and concurrency limits
        self.abandoned = 0  # P: jobs unwound whose thread has not returned yet

    def arm(self, job: Job) -> None:
        """Start the job's timers. X: on the job's thread, before its target."""
        timers = []
        if job.soft is not None:
            timers.append(_timer.add_timer(job.soft, functools.partial(self.soft_limit, job)))
        if job.hard is not None:
            timers.append(_timer.add_timer(job.hard, functools.partial(self.hard_limit, job)))
        job.timers = tuple(timers)

    def disarm(self, job: Job) -> None:
        """The job is done: its timers need not fire. X: on the job's thread, window closed."""
        for timer in job.timers:
            timer.cancel()
        job.timers = ()

    def soft_limit(self, job: Job) -> None:
        """The soft limit passed (timer thread). If the task's code has not started yet (a busy
        machine: its window still closed), it is raised once the code runs, looked for every
        ``SOFT_RETRY`` s, not dropped: prefork's signal would land there too."""
        pool = self.pool
        with pool._lock:
            if job.state is not RUNNING or job.soft_sent or job.unwind is not None or job.finished:
                return
            with job.gate:
                opened = job.in_target
            if not opened:
                _timer.add_timer(SOFT_RETRY, functools.partial(self.soft_limit, job))
                return
            job.soft_sent = True
            inject(job, SoftTimeLimitExceeded)
        pool._deliver(job.timeout_callback, True, job.soft)

    def hard_limit(self, job: Job) -> None:
        pool = self.pool
        with pool._lock:
            if not self.unwind_locked(job, "hard"):
                return
        pool._deliver(job.timeout_callback, False, job.hard)

    def terminate(self, pid: int, signum: int | None) -> None:
        """revoke(terminate=True) and cancel: unwind the thread running job ``pid`` (whatever the
        signal, except SIGUSR1 which raises SoftTimeLimitExceeded in it, as in prefork)."""
        with self.pool._lock:
            job = self.pool._jobs.get(pid)
            if job is None:
                return
            if signum == SIGUSR1:
                # prefork's soft-limit signal: the task gets SoftTimeLimitExceeded and goes on
                if job.state is RUNNING and not job.soft_sent and job.in_target:
                    job.soft_sent = True
                    inject(job, SoftTimeLimitExceeded)
            elif job.state is QUEUED:
                job.revoked_early = True  # it will report accepted (so Celery revokes) and not run
            elif job.state is RUNNING:
                self.unwind_locked(job, "terminated")

    @must_hold("pool._lock")
    def unwind_locked(self, job: Job, why: str) -> bool:
        """Decide that ``job`` ends now and give its slot back; False if it ended already. P: held."""
        if job.state is not RUNNING or job.unwind is not None:
            return False
        with job.gate:
            if job.finished:
                return False  # its target returned: it reports its own outcome
            job.unwind = why
            in_target = job.in_target
            if in_target:
                async_raise(job.thread_id, Unwind)
        if in_target:
            self.disarm_request(job)
            job.grace = _timer.add_timer(ABANDON_GRACE, functools.partial(self.check_abandoned, job))
        self.abandoned += 1
        self.pool._update_max_active_locked()
        return True

    def disarm_request(self, job: Job) -> None:
        """Make the tracer of an unwound task record nothing if the task survives the unwind.

        Its outcome is already reported (TimeLimitExceeded, or REVOKED). A task that swallows the
        unwind and returns would otherwise have its tracer store SUCCESS over it, run its
        callbacks and count a chord part twice. The tracer reads those from the request
        Context it pushed on the task's request stack (a per-thread stack keyed by thread id),
        so flag that Context: ``ignore_result``, no chord, chain, callbacks or errbacks. Best
        effort: it relies on Celery internals and logs, never raises, if they change.
        """
        app = self.pool.app
        try:
            name, task_id = job.args[0], job.args[1]
            task = app.tasks[name] if app is not None else None
            storage = task.request_stack._local.__storage__ if task is not None else {}
            for context in storage.get(job.thread_id, {}).get("stack", ()):
                if getattr(context, "id", None) == task_id:
                    context.ignore_result = True
                    context.chord = context.chain = context.callbacks = context.errbacks = None
        except Exception:  # noqa: BLE001
            log.debug("cmwq_exec.celery: could not disarm the request of job %s", job.pid, exc_info=True)

    def check_abandoned(self, job: Job) -> None:
        """The grace after an unwind is over (timer thread): a job still running swallowed it."""
        with self.pool._lock:
            if job.state is not RUNNING:
                return
        request = job.request
        log.warning("cmwq_exec.celery: task %s[%s] survived its unwind (%s) and is abandoned: not "
                    "counted against the concurrency, its result discarded; its thread is at %s",
                    getattr(request, "name", "?"), getattr(request, "id", job.pid), job.unwind,
                    job.where() or "(no Python frame)")

    @must_hold("pool._lock")
    def job_ended(self, job: Job, unwound: bool) -> None:
        """The job's thread returned. P: held."""
        grace, job.grace = job.grace, None
        if grace is not None:
            grace.cancel()
        if unwound:
            self.abandoned -= 1
            self.pool._update_max_active_locked()

    def abandoned_active(self, safe: bool = False) -> list[dict[str, Any]]:
        """``inspect active`` entries of the abandoned jobs: what Celery lists for a running task,
        marked ``abandoned`` with why and where its thread is (see celery_pool_info)."""
        with self.pool._lock:
            jobs = list(self.pool._jobs.values())
        listed = []
        for job in jobs:
            if job.unwind is None or job.state is not RUNNING or job.request is None:
                continue
            try:
                info = dict(job.request.info(safe=safe))
            except Exception:  # noqa: BLE001 - a Request that no longer answers: list what we know
                info = {"id": getattr(job.request, "id", None)}
            info.update({"worker_pid": job.pid, "abandoned": job.unwind, "abandoned_at": job.where()})
            listed.append(info)
        return listed


# a task's waits are its sleeps, for blocking detection (CMWQ_DETECT_BLOCKING=1)
detect.add_user_call_site(call_target)
