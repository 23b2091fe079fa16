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
      concurrency, its eventual return value discarded, counted as ``abandoned`` in ``inspect
      stats`` and the ``cmwq_celery_tasks_abandoned`` gauge, listed (marked ``abandoned``, with
      where its thread is) in ``inspect active``, and logged with that place once it has had a
      second to return;
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

Metrics: set ``cmwq_metrics_port`` (or the environment variable ``CMWQ_METRICS_PORT``; 0 to 65535, 0
picks a free port) to serve Prometheus metrics from the worker process; ``cmwq_metrics_addr`` /
``CMWQ_METRICS_ADDR`` (default ``127.0.0.1``) chooses the address.

Parts, one job each: :mod:`cmwq_exec.celery_jobs` (a job and its limits: asynchronous exceptions,
timers, terminate, abandon), :mod:`cmwq_exec.celery_outbox` (callbacks to the event loop),
:mod:`cmwq_exec.celery_pool_info` (inspect and metrics), :mod:`cmwq_exec.celery_processes` (the
supervisor of processes mode). This module is the pool: it queues, runs and reports jobs, and
keeps the concurrency limits.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.concurrency.base import BasePool
from celery.exceptions import ImproperlyConfigured
from celery.utils.nodenames import default_nodename

from . import celery_pool_info, celery_processes
from .celery_jobs import (
    CANCELLED,
    DONE,
    QUEUED,
    RUNNING,
    Job,
    JobLimits,
    call_target,
    check_seconds,
    current_app,
    in_signal_handler,
    may_be_revoked,
    shutting_down,
    terminating,
    workqueue_limits,
)
from .celery_outbox import Outbox
from .celery_process_ledger import Ledger
from .core.lockdep import make_lock, must_hold
from .core.system import get_system
from .core.workqueue import WQ, Work, WorkQueue

__all__ = ["TaskPool"]


def _check_limit(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImproperlyConfigured(
            f"cmwq_exec.celery.TaskPool: {what} must be a non-negative integer "
            f"(the number of tasks that may run at once), got {value!r}")
    return value


class TaskPool(BasePool):
    """Celery pool running each task as a work of one cmwq workqueue (``max_active`` = concurrency).

    Fields: ``I:`` set in ``__init__``/``on_start``; ``P:`` under ``_lock`` (lockdep ``celery``).

    Invariants (under ``_lock``):
      * ``_jobs`` holds every queued and running job (abandoned ones included) by job id;
      * the workqueue's max_active is ``max(1, limit + abandoned)``; while ``limit`` is 0 new jobs
        wait in ``_held`` (a workqueue cannot have max_active 0);
      * after ``_closing``, or once Celery's shutdown flags are set, no job starts its target.
    """

    body_can_be_buffer = True
    #: stopping waits for threads: not from inside a signal handler.
    signal_safe = False
    uses_semaphore = False
    task_join_will_block = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit: int = _check_limit(self.limit, "concurrency (-c/--concurrency, worker_concurrency)")
        self._default_soft = check_seconds(self.options.get("soft_timeout"), "soft time limit")  # I
        self._default_hard = check_seconds(self.options.get("timeout"), "time limit")  # I
        self._lock = make_lock("celery")
        self._idle = threading.Condition(self._lock)  # notified when a job stops running
        self._jobs: dict[int, Job] = {}  # P
        self._held: deque[Work] = deque()  # P: works waiting while limit == 0
        self._closing = False  # P
        self._job_ids = itertools.count(1)
        self._job_limits = JobLimits(self)  # I: soft/hard timers, terminate, abandoned jobs
        self._outbox = Outbox(self.app, f"{id(self):x}")  # I: callbacks to the event loop
        self._deliver = self._outbox.deliver  # I
        self.abandoned_active = self._job_limits.abandoned_active  # I: added to inspect active
        self._metrics = celery_pool_info.MetricsServer()  # I
        self._wq: WorkQueue | None = None  # I
        self._limits = (0, 0)  # P: the (max_active, max_running) we last gave the workqueue
        self._window = 4  # I: in-flight tasks per concurrency slot (prefetch_window)
        self._cpu: int | None = None  # I: the CPU whose pool runs our tasks (queue_work_on)
        self._child = celery_processes.child_index()  # I: our index if a supervisor started us
        self._ledger: Ledger | None = None  # I: set by on_start (a child's started tasks)

    def __new__(cls, *args: Any, app: Any = None, **kwargs: Any) -> Any:
        """A :class:`SupervisorPool` if the worker runs its tasks in child processes (``cmwq_processes``)."""
        processes = celery_processes.processes_wanted((app.conf if app else {}).get("cmwq_processes"))
        if cls is TaskPool and processes:
            return SupervisorPool(*args, processes=processes, app=app, **kwargs)
        return super().__new__(cls)

    # -- start and stop ---------------------------------------------------------------------------

    def on_start(self) -> None:
        """Create the workqueue (and the metrics server if configured)."""
        conf = self.app.conf if self.app is not None else {}
        address = celery_pool_info.metrics_address(conf)
        if self._child is not None:
            self._ledger = celery_processes.become_child(self._child)  # pinned before the engine looks
        self._window = celery_pool_info.prefetch_window(conf)
        self._cpu = get_system().local_pool().cpu
        self._limits = workqueue_limits(self.limit, self._window, 0)
        max_active, max_running = self._limits
        # A rescuer: a worker process serving a broker must make progress even when no worker
        # thread can be created (the max_total_workers cap, the process's thread limit).
        self._wq = WorkQueue("celery", WQ.RESCUER, max_active=max_active, max_running=max_running)
        self._wq.flush_at_exit = False  # Celery's warm or cold shutdown decides what to wait for
        if address is not None:
            self._metrics.start(address, self._child, self._task_counts)
        celery_pool_info.show_abandoned_in_inspect_active()
        self._outbox.wake_at_shutdown_signals(True)  # an idle loop sees a SIGTERM at once
        # This process runs every task, as with solo: like solo, tell per-process setup code
        # (worker_process_init handlers: database connections, tracing) once, before any task.
        hostname = (self.options.get("initargs") or (None, None))[1]
        signals.worker_process_init.send(sender=hostname)

    def register_with_event_loop(self, loop: Any) -> None:
        """Deliver callbacks on the consumer's event loop (see celery_outbox)."""
        self._outbox.register_with_event_loop(loop)

    def on_stop(self) -> None:
        """Warm shutdown: started tasks finish (abandoned ones are not waited for), then every
        callback is delivered. Once Celery has decided to terminate (its cold shutdown calls this
        after cancelling the tasks it knows, not those whose accept is still on the way to the
        event loop), stopping is terminating."""
        if terminating():
            self.on_terminate()
            return
        self._outbox.stop_delivering_to_hub()
        with self._lock:
            self._cancel_queued_locked(closing=True)
            while any(job.state is RUNNING and job.unwind is None for job in self._jobs.values()):
                self._lock.release()
                try:
                    self._outbox.drain()
                finally:
                    self._lock.acquire()
                self._idle.wait(0.05)
        self._outbox.drain()
        self._shutdown()

    def on_terminate(self) -> None:
        """Cold shutdown: drop unstarted tasks and unwind the running ones (no result is written
        for them; with acks_late their messages return to the broker). From the signal handler it
        only wakes the loop, which ends and terminates the pool again (see in_signal_handler)."""
        if in_signal_handler():
            return self._outbox.poke_loop()
        self._outbox.stop_delivering_to_hub()
        with self._lock:
            self._cancel_queued_locked(closing=True)
            for job in self._jobs.values():
                self._job_limits.unwind_locked(job, "terminated")
        self._outbox.drain()
        self._shutdown()

    def on_close(self) -> None:
        """The worker's shutdown begins (Celery closes the pool, then stops the consumer and the
        pool): no task starts from here on, as with prefork; unstarted ones stay unacked."""
        with self._lock:
            self._cancel_queued_locked(closing=True)

    def flush(self) -> None:
        """The connection was lost: queued tasks can no longer be acked, the broker will deliver
        them again, so they must not run here."""
        with self._lock:
            self._cancel_queued_locked()

    @must_hold("_lock")
    def _cancel_queued_locked(self, closing: bool = False) -> None:
        """Forget every job not started (never acked: the broker delivers it again); ``closing``:
        and start none from here on. P: held."""
        self._closing = self._closing or closing
        for job in list(self._jobs.values()):
            if job.state is QUEUED:
                self._forget_locked(job, CANCELLED)
        self._held.clear()

    @must_hold("_lock")
    def _forget_locked(self, job: Job, state: str) -> None:
        """The job leaves the pool in ``state``: DONE, or CANCELLED for a job that never started
        and never will (not acked: its accept callback is what acks it, so the broker delivers it
        again). P: held."""
        job.state = state
        self._jobs.pop(job.pid, None)
        self._idle.notify_all()

    def _shutdown(self) -> None:
        """Release what on_start made. The workqueues go only when no thread of ours is left
        (an abandoned task may still run: then they stay, idle, until the process exits).

        Celery's cold-shutdown handler stops the pool from inside a signal handler and then
        relies on its event loop noticing ``should_terminate``; a loop asleep in poll would only
        notice at its next timer (10 s on amqp). So the wakeup pipe is poked."""
        self._outbox.poke_loop()
        self._outbox.wake_at_shutdown_signals(False)
        self._metrics.stop()
        with self._lock:
            idle = not self._jobs
        if idle:
            if self._wq is not None:
                self._wq.destroy()
            self._outbox.destroy()

    # -- applying and running -----------------------------------------------------------------------

    def on_apply(self, target: Callable[..., Any], args: Any = None, kwargs: Any = None,
                 callback: Any = None, accept_callback: Any = None, error_callback: Any = None,
                 timeout_callback: Any = None, soft_timeout: float | None = None,
                 timeout: float | None = None, **_: Any) -> Job:
        """Queue one task; returns its job (Celery keeps it to ``terminate()`` it)."""
        soft = check_seconds(soft_timeout, "soft_time_limit")
        hard = check_seconds(timeout, "time_limit")
        job = Job(self, next(self._job_ids), target, args or (), kwargs or {}, callback,
                  accept_callback, error_callback, timeout_callback,
                  self._default_soft if soft is None else soft,
                  self._default_hard if hard is None else hard)
        work = Work(self._run, job)
        with self._lock:
            if self._closing:
                # Never started, never acked: the broker delivers it again after we disconnect.
                job.state = CANCELLED
                return job
            self._jobs[job.pid] = job
            held = self._hold_locked(work)
        if not held:
            self._queue(work)
        return job

    @must_hold("_lock")
    def _hold_locked(self, work: Work) -> bool:
        """Keep ``work`` back while the limit is 0 (a workqueue cannot have max_active 0); True
        if it was kept. P: held."""
        if self.limit:
            return False
        self._held.append(work)
        return True

    def _queue(self, work: Work) -> None:
        assert self._wq is not None and self._cpu is not None  # on_start set both
        self._wq.queue_work_on(self._cpu, work)

    def _run(self, job: Job) -> None:
        """Start, run and report one job on a cmwq worker thread, with the worker's app as the
        current app (the injection window: see celery_jobs)."""
        with current_app(self.app):
            with self._lock:
                if job.state is not QUEUED:
                    return  # cancelled by shutdown or a lost connection
                if self._closing or shutting_down():
                    # a shutdown starts nothing: unacked, the broker delivers it again
                    self._forget_locked(job, CANCELLED)
                    return
                refuse = job.request is not None and not job.cleared and may_be_revoked(job.request)
                if not refuse:
                    job.state = RUNNING
                    job.thread_id = threading.get_ident()
            if refuse:
                self._deliver(self._refuse, job)  # it stays queued until the consumer decides
                return
            ledger = self._ledger  # in it before the accept acks the message (celery_process_ledger)
            kept = ledger.start(job.request) if ledger is not None and job.request is not None else None
            self._deliver(job.accept_callback, job.pid, time.monotonic())
            self._job_limits.arm(job)
            outcome = call_target(job)
            # From here on nothing can be injected: the window is closed.
            self._job_limits.disarm(job)
            if ledger is not None and kept is not None:
                ledger.finished(kept)  # its outcome is stored: the tracer stored it
            with self._lock:
                unwound = job.unwind is not None
                self._job_limits.job_ended(job, unwound)
                self._forget_locked(job, DONE)
            if not unwound and outcome is not None:
                self._deliver(*outcome)  # an unwound job was reported already (timeout, or revoked)

    def _refuse(self, job: Job) -> None:
        """On the consumer's thread: let Celery refuse a revoked or expired job, as it refuses one
        when handing it to the pool (see celery_jobs, "expiry and revocation at start"); start it
        if Celery does not."""
        with self._lock:
            if job.state is not QUEUED:
                return  # cancelled meanwhile (shutdown, lost connection): the broker redelivers it
        if job.request.revoked():  # logs, marks REVOKED, sends task-revoked, acks, signals
            with self._lock:
                if job.state is QUEUED:
                    self._forget_locked(job, DONE)
            return
        work = Work(self._run, job)
        with self._lock:
            if job.state is not QUEUED or self._closing:
                return  # closing: never started, never acked, as in on_apply
            job.cleared = True
            held = self._hold_locked(work)
        if not held:
            self._queue(work)

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        """revoke(terminate=True) and cancel (see celery_jobs.JobLimits.terminate)."""
        self._job_limits.terminate(pid, signal)

    # -- concurrency --------------------------------------------------------------------------------

    @must_hold("_lock")
    def _update_max_active_locked(self) -> None:
        """P: held. Lock order: ours, then the workqueue's."""
        wanted = workqueue_limits(self.limit, self._window, self._job_limits.abandoned)
        if wanted != self._limits and self._wq is not None:
            self._limits = wanted
            self._wq.set_max_active(*wanted)

    def grow(self, n: int = 1) -> None:
        """Allow ``n`` more tasks to run at once (pool_grow, autoscale)."""
        n = _check_limit(n, "pool_grow n")
        with self._lock:
            self.limit += n
            self._update_max_active_locked()
            held, self._held = (self._held, deque()) if self.limit else (deque(), self._held)
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

    # -- what it shows ------------------------------------------------------------------------------

    def _task_counts(self) -> dict[str, Any]:
        """The pool's limits and task counts (``inspect stats``, the metrics)."""
        with self._lock:
            jobs, held, limit, limits = list(self._jobs.values()), len(self._held), self.limit, self._limits
        timeouts = (self._default_soft, self._default_hard)
        return celery_pool_info.task_counts(jobs, held, limit, limits, timeouts)

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        celery_pool_info.pool_stats(info, self._task_counts(), self._child, self._wq)
        return info


class SupervisorPool(BasePool):
    """The pool of a worker in processes mode: this process runs no task; it starts a child worker
    per CPU, each running :class:`TaskPool`, and watches them until the worker stops (see
    :mod:`cmwq_exec.celery_processes`). ``TaskPool(...)`` makes one when the setting asks for it."""

    uses_semaphore = False
    #: stopping waits for the children: not from inside a signal handler.
    signal_safe = False

    def __init__(self, *args: Any, processes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processes = processes  # I: how many children

    def on_start(self) -> None:
        """Supervise the children; raises WorkerShutdown / WorkerTerminate once they are gone."""
        address = celery_pool_info.metrics_address(self.app.conf if self.app is not None else {})
        hostname = (self.options.get("initargs") or (None, None))[1]
        celery_processes.Supervisor(default_nodename(hostname), self.processes, address, app=self.app).run()

    def on_apply(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("cmwq_exec.celery.SupervisorPool runs no task: its children do")

    @property
    def num_processes(self) -> int:
        return self.limit or 0
