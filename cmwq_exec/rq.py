"""An RQ worker whose jobs run as works on cmwq_exec's shared per-CPU pools.

Select it with RQ's own option::

    rq worker -w cmwq_exec.rq.Worker high default low

No number of workers to guess
    ``rq worker`` runs one job at a time (in a forked work horse by default): one worker process per
    job you want running. This worker dequeues a job, hands it to a cmwq workqueue, and dequeues the
    next one as soon as that job has *started*: a pool starts another thread only when its running
    one blocks (in :func:`cmwq_exec.blocking`, waiting on a cmwq future, or as the watchdog sees
    it), so jobs that wait overlap while CPU-bound ones run one at a time (one process has one GIL),
    and at most one dequeued job waits for a thread.

Timeouts and stop commands on threads
    A job's timeout raises :class:`rq.timeouts.JobTimeoutException` inside the job's thread
    (``death_penalty_class`` is this module's, on the injection window of :mod:`cmwq_exec.injection`,
    instead of ``SIGALRM``, which only the main thread can receive); success, failure and stopped
    callbacks get their timeouts the same way. ``send_stop_job_command`` raises :class:`JobStopped`
    in the job's thread; the job is then handled as RQ handles a stopped work horse: its stopped
    callback runs, it is marked ``STOPPED`` and moved to the FailedJobRegistry ("Job stopped by
    user, work-horse terminated.").

Shutdown, as RQ's
    A warm shutdown (SIGINT or SIGTERM) dequeues nothing more and waits for every job handed over
    to finish, then the worker registers its death. A cold shutdown (the signal again) raises
    :class:`Killed` in each running job's thread and exits, as RQ's worker kills its horse: the jobs
    end with nothing recorded, stay in the StartedJobRegistry, and are handled by RQ's registry
    cleanup as abandoned jobs.

Metrics: with ``CMWQ_METRICS_PORT`` set (0 to 65535; ``CMWQ_METRICS_ADDR``, default ``127.0.0.1``)
the worker serves Prometheus metrics (:mod:`cmwq_exec.metrics`, the workqueue is ``rq``), which
``cmwq-exec top`` reads.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from rq.callbacks import execute_stopped_callback
from rq.exceptions import StopRequested
from rq.timeouts import BaseDeathPenalty, JobTimeoutException
from rq.worker import BaseWorker, WorkerStatus

from . import detect
from .core import timer as _timer
from .core.lockdep import make_lock, must_hold
from .core.system import get_system
from .core.workqueue import WQ, DelayedWork, Work, WorkQueue
from .injection import close_window_surely, inject, open_window
from .metrics import address_from_environment as metrics_address

__all__ = ["DeathPenalty", "JobStopped", "Killed", "Worker"]

STOPPED_MESSAGE = "Job stopped by user, work-horse terminated."
#: Seconds between two wakes of the thread that reads the worker's command channel (see subscribe).
PUBSUB_WAKE = 1.0


class JobStopped(BaseException):
    """Raised in a job's thread by ``send_stop_job_command``; RQ then records the job STOPPED.
    A BaseException, so that ``except Exception`` in the job does not swallow it."""


class Killed(BaseException):
    """Raised in a job's thread by a cold shutdown, as RQ's worker kills its work horse: the job
    ends with nothing recorded."""


class _Windows:
    """The injection windows open in this process, by thread: what timeouts and stop commands
    raise into. ``P:`` under ``_lock``."""

    def __init__(self) -> None:
        self._lock = make_lock("executor")
        self.by_thread: dict[int, _Window] = {}  # P
        self.stopped: set[str] = set()  # P: ids of jobs told to stop
        self.early: dict[str, type[BaseException]] = {}  # P: jobs told while in no window: what
        # the next window they open raises

    def stop(self, job_id: str, exc_type: type[BaseException] = JobStopped) -> bool:
        """Raise ``exc_type`` (JobStopped, or Killed) in the window running ``job_id``, or in the next
        one it opens; True if it was running in one."""
        with self._lock:
            if exc_type is JobStopped:
                self.stopped.add(job_id)
            found = False
            for window in self.by_thread.values():
                if window.job_id == job_id and window.unwind is None:
                    window.unwind = exc_type.__name__
                    inject(window, exc_type)
                    found = True
            if not found:
                self.early[job_id] = exc_type
            return found

    def expire(self, window: _Window, exc_type: type[BaseException]) -> None:
        """A window's timeout passed (timer thread)."""
        with self._lock:
            self._expire_locked(window, exc_type)

    @must_hold("_lock")
    def _expire_locked(self, window: _Window, exc_type: type[BaseException]) -> None:
        if window.unwind is None:
            window.unwind = "timeout"
            inject(window, exc_type)


_windows = _Windows()


class _Window:
    """One ``with death_penalty_class(...)`` block's injection window (see cmwq_exec.injection)."""

    __slots__ = ("pool", "gate", "thread_id", "in_target", "finished", "unwind", "revoked_early",
                 "job_id")

    def __init__(self, job_id: str | None) -> None:
        self.pool = _windows  # its _lock is held to inject
        self.gate = threading.Lock()
        self.thread_id = threading.get_ident()
        self.in_target = False  # G: under gate
        self.finished = False  # G
        self.unwind: str | None = None  # P: "timeout" or "stopped" once injected (one per window)
        self.revoked_early = False  # P: stopped before it opened
        self.job_id = job_id


@functools.lru_cache(maxsize=64)
def _timeout_class(exception: type[BaseException], seconds: float) -> type[BaseException]:
    """``exception`` raised with RQ's message; the interpreter makes it with no arguments."""

    def __init__(self: BaseException, *args: Any) -> None:
        exception.__init__(self, *(args or (f"Task exceeded maximum timeout value ({seconds} seconds)",)))

    return type(exception.__name__, (exception,), {"__init__": __init__, "__module__": exception.__module__})


class DeathPenalty(BaseDeathPenalty):
    """RQ's death penalty on any thread: the block's timeout raises its exception in the thread
    that runs the block (an asynchronous exception inside the block's window), and a stop command
    for its job raises :class:`JobStopped` there."""

    def __init__(self, timeout: Any, exception: type[BaseException] = JobTimeoutException,
                 **kwargs: Any) -> None:
        super().__init__(timeout, exception, **kwargs)
        self._job_id: str | None = kwargs.get("job_id")
        self._window: _Window | None = None
        self._timer: _timer.Timer | None = None

    def setup_death_penalty(self) -> None:
        window = self._window = _Window(self._job_id)
        with _windows._lock:
            early = _windows.early.pop(window.job_id, None) if window.job_id is not None else None
            window.revoked_early = early is not None
            _windows.by_thread[window.thread_id] = window
        if not open_window(window):
            self._forget(window)
            raise (early or JobStopped)(f"job {self._job_id} was ended before it ran")
        if self._timeout is not None and self._timeout > 0:
            exc_type = _timeout_class(self._exception, self._timeout)
            expire = functools.partial(_windows.expire, window, exc_type)
            self._timer = _timer.add_timer(self._timeout, expire)

    def cancel_death_penalty(self) -> None:
        window = self._window
        if window is None:
            return
        close_window_surely(window)
        if self._timer is not None:
            self._timer.cancel()
        self._forget(window)

    @staticmethod
    def _forget(window: _Window) -> None:
        with _windows._lock:
            if _windows.by_thread.get(window.thread_id) is window:
                del _windows.by_thread[window.thread_id]


class Worker(BaseWorker):
    """``rq worker -w cmwq_exec.rq.Worker``: jobs run as works of one cmwq workqueue.

    The main thread runs RQ's work loop: it dequeues a job, registers its execution, hands it to
    the workqueue and waits until the pool has room for another (the job finished or blocked)
    before dequeuing the next one. ``P:`` under ``_lock``; ``M:`` the main thread's.

    Invariants (under ``_lock``): ``_unstarted <= 1``; ``_running`` holds the job and execution of
    every job handed over and not ended (started or not), by execution id.
    """

    death_penalty_class = DeathPenalty

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = make_lock("executor")
        self._changed = threading.Condition(self._lock)  # notified when a job starts or ends
        self._unstarted = 0  # P
        self._running: dict[str, tuple[Any, Any]] = {}  # P: execution id -> (job, execution)
        self._ended = 0  # P: how many jobs handed over have ended
        self._handing_over = False  # M: inside execute_job (a stop signal then only asks)
        self._wq: WorkQueue | None = None  # M
        self._cpu: int | None = None  # M
        self._beat: DelayedWork | None = None  # M: the running jobs' heartbeats
        self._metrics_server: Any = None  # M
        self._named_job: str | None = None  # the job a command being handled names (pubsub thread)

    # -- RQ's hooks -------------------------------------------------------------------------------

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        address = metrics_address()
        if address is not None and self._metrics_server is None:
            from . import metrics

            self._metrics_server, _ = metrics.start_http_server(*address)
            self.log.info("cmwq_exec: serving Prometheus metrics on http://%s:%s/metrics", address[1],
                          self._metrics_server.server_port)

    def subscribe(self) -> None:
        """The worker's command channel, read by a thread that wakes every second (RQ's wakes
        every 60 s, and a worker stopping waited that long for it: see unsubscribe)."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_WAKE, daemon=True,
            exception_handler=self._pubsub_exception_handler)  # type: ignore[assignment]

    def unsubscribe(self) -> None:
        """RQ's, but the channel is closed only once its thread has ended (the thread closes it too,
        and a redis-py PubSub closed by two threads at once fails: redis-py before 8.2 does not wait
        in ``stop()``, and RQ waits 1 s, about the thread's wake)."""
        thread = self.pubsub_thread
        if thread:
            self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
            self.pubsub.unsubscribe()
            thread.stop()
            thread.join(timeout=PUBSUB_WAKE * 30)
            if not thread.is_alive():  # else left to the exit: a daemon thread
                self.pubsub.close()

    def execute_job(self, job: Any, queue: Any) -> None:
        """Hand ``job`` to the workqueue and return once the pool has room for another (main
        thread): a *probe*, an empty work queued behind the job on the same pool, runs when the
        job has finished or blocked, as the pool's concurrency management decides."""
        wq = self._workqueue()
        execution = self.prepare_execution(job)
        with self._lock:
            self._unstarted += 1
            self._running[execution.id] = (job, execution)
        room = threading.Event()
        self._handing_over = True
        try:
            for work in (Work(self._perform, job, queue, execution), Work(room.set)):
                if self._cpu is None:
                    wq.queue_work(work)
                else:
                    wq.queue_work_on(self._cpu, work)  # one pool: one GIL, as few idle threads as needed
            room.wait()
        finally:
            self._handing_over = False

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """RQ's dequeue; in burst mode (no timeout) an empty queue ends the burst only once no job
        handed over is running and none ended since the dequeue began: a job may enqueue its
        dependents as it ends, which RQ's worker, one job at a time, finds on its next dequeue."""
        while True:
            with self._lock:
                ended = self._ended
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            if result is not None or timeout is not None:
                return result
            with self._lock:
                while self._running and self._ended == ended:
                    self._changed.wait()
                if self._ended == ended:
                    return None  # no job ended since the queue was found empty: none can enqueue

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """IDLE while jobs still run is BUSY: RQ sets IDLE before each dequeue."""
        if state == WorkerStatus.IDLE and self._running:
            state = WorkerStatus.BUSY
        super().set_state(state, pipeline=pipeline)

    def _shutdown(self) -> None:
        """Warm shutdown (the signal handler, main thread): as RQ's worker, a busy worker (jobs
        handed over) records the request and stops its scheduler, an idle one raises StopRequested;
        this one also raises it while its main thread dequeues, so the dequeue ends at once. The
        jobs handed over finish (see teardown)."""
        if self._handing_over or self._running:
            self._stop_requested = True
            self.set_shutdown_requested_date()
            if self.scheduler:
                self.stop_scheduler()
            if self._handing_over:
                return  # the work loop stops once the hand-over returns
        raise StopRequested()

    def request_force_stop(self, signum: int, frame: Any) -> None:
        """Cold shutdown: as RQ's worker kills its horse, end every running job at once (Killed in
        its thread), recording nothing: each stays in the StartedJobRegistry for RQ's cleanup."""
        try:
            super().request_force_stop(signum, frame)
        except SystemExit:
            with self._lock:
                running = [job.id for job, _ in self._running.values()]
            for job_id in running:
                _windows.stop(job_id, Killed)
            raise

    def teardown(self) -> None:
        """Wait for the jobs handed over, then RQ's teardown. A cold shutdown cuts the wait short:
        its SystemExit ends the process, and the jobs with it (the workqueue is not drained)."""
        drained = False
        try:
            with self._lock:
                while self._running:
                    self._changed.wait()
            drained = True
        finally:
            try:
                super().teardown()
            finally:
                self._stop_workqueue(drain=drained)

    def request_stop_execution(self, execution_id: str) -> None:
        """``send_stop_job_command`` (pubsub thread): raise JobStopped in the job's thread."""
        with self._lock:
            entry = self._running.get(execution_id)
        if entry is None:
            self.log.warning("Not running execution %s, command ignored.", execution_id)
            return
        self._stop_job(entry[0].id)

    def kill_horse(self, sig: Any = None) -> None:
        """RQ's stop-job command (``send_stop_job_command``) calls this once it has recorded the job
        in ``_stopped_job_id``: stop each running job so recorded."""
        with self._lock:
            running = [job.id for job, _ in self._running.values()]
        with _windows._lock:
            stopped = [job_id for job_id in running if job_id in _windows.stopped]
        for job_id in stopped:
            self._stop_job(job_id)

    def get_current_job_id(self) -> str | None:
        """The job the stop-job command names, if this worker runs it (RQ compares the two to decide
        whether the command is this worker's; this worker runs several jobs)."""
        return self._named_job if self._named_job is not None else super().get_current_job_id()

    def handle_payload(self, message: Any) -> None:
        """Commands from the worker's channel (pubsub thread); a stop-job command names any of the
        jobs running here."""
        from rq.command import parse_payload

        payload = parse_payload(message)
        job_id = payload.get("job_id")
        with self._lock:
            ours = job_id is not None and any(job.id == job_id for job, _ in self._running.values())
        self._named_job = job_id if ours else None
        try:
            super().handle_payload(message)
        finally:
            self._named_job = None

    def _stop_job(self, job_id: str) -> None:
        if not _windows.stop(job_id):
            self.log.info("Worker %s: job %s is stopped when it reaches its code", self.name, job_id)

    @property  # type: ignore[override]
    def _stopped_job_id(self) -> str | None:
        """The job this thread is failing or running, if it was told to stop (RQ compares it with
        the job it marks: STOPPED rather than FAILED). Per thread: this worker runs several jobs."""
        job_id = getattr(_current, "failing", None) or getattr(_current, "job_id", None)
        return job_id if job_id is not None and job_id in _windows.stopped else None

    @_stopped_job_id.setter
    def _stopped_job_id(self, value: str | None) -> None:
        with _windows._lock:
            if value is not None:
                _windows.stopped.add(value)  # a stop-job command, or a caller marking the job
            else:  # RQ marked this thread's job
                _windows.stopped.discard(getattr(_current, "failing", None) or "")

    def handle_job_failure(self, job: Any, queue: Any, started_job_registry: Any = None, exc_string: str = "",
                           execution: Any = None) -> None:
        _current.failing = job.id  # the job _stopped_job_id answers for, on this thread
        try:
            super().handle_job_failure(job, queue, started_job_registry=started_job_registry,
                                       exc_string=exc_string, execution=execution)
        finally:
            _current.failing = None

    def _finalize_failure(self, job: Any, queue: Any, execution: Any, exc_info: Any) -> None:
        """A job stopped by command ends as RQ ends a stopped work horse."""
        if isinstance(exc_info[1], Killed):
            return  # a cold shutdown: nothing recorded, as for a killed work horse
        if isinstance(exc_info[1], JobStopped):
            job.ended_at = job.ended_at or _now()
            self._handle_stopped_job(job, queue, execution)
        else:
            super()._finalize_failure(job, queue, execution, exc_info)

    def _handle_stopped_job(self, job: Any, queue: Any, execution: Any) -> None:
        """As RQ's Worker for a horse killed by a stop command: the stopped callback (one that
        raises is logged), then STOPPED and the FailedJobRegistry."""
        self.log.warning("Worker %s: job %s stopped by user, moving job to FailedJobRegistry",
                         self.name, job.id)
        try:
            execute_stopped_callback(job, self.death_penalty_class)
        except Exception:
            self.log.exception("Worker %s: stopped callback for job %s raised", self.name, job.id)
        self.handle_job_failure(job, queue=queue, exc_string=STOPPED_MESSAGE, execution=execution)

    # -- the jobs' threads ------------------------------------------------------------------------

    def _perform(self, job: Any, queue: Any, execution: Any) -> None:
        with self._lock:
            self._unstarted -= 1
            self._changed.notify_all()
        _current.job_id = job.id
        try:
            self.perform_job(job, queue, execution)
        except BaseException as exc:  # noqa: BLE001 - RQ's perform_job catches all; what escapes it
            _lost(self, job, queue, execution, exc)  # is a dead work horse
        finally:
            _current.job_id = None
            self.executions.pop(execution.id, None)
            with _windows._lock:
                _windows.stopped.discard(job.id)
                _windows.early.pop(job.id, None)
            with self._lock:
                self._running.pop(execution.id, None)
                self._ended += 1
                self._changed.notify_all()

    def _heartbeats(self) -> None:
        """Every job_monitoring_interval while jobs run: their heartbeats, as RQ's monitor sends."""
        with self._lock:
            running = list(self._running.values())
        for job, execution in running:
            try:
                if job.started_at is not None:
                    self.maintain_heartbeats(job, execution)
            except Exception:  # noqa: BLE001 - the next beat tries again
                self.log.exception("Worker %s: heartbeat of job %s failed", self.name, job.id)
        wq, beat = self._wq, self._beat
        if wq is not None and beat is not None:
            wq.queue_delayed_work(beat, self.job_monitoring_interval)

    def _workqueue(self) -> WorkQueue:
        if self._wq is None:
            self._wq = WorkQueue("rq", WQ.RESCUER)
            self._wq.flush_at_exit = False  # RQ's warm or cold shutdown decides what to wait for
            self._cpu = get_system().local_pool().cpu
            self._beat = DelayedWork(self._heartbeats)
            self._wq.queue_delayed_work(self._beat, self.job_monitoring_interval)
        return self._wq

    def _stop_workqueue(self, drain: bool) -> None:
        wq, self._wq = self._wq, None
        beat, self._beat = self._beat, None
        if beat is not None:
            beat.cancel()
        if wq is not None and drain:
            wq.destroy()
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            server.shutdown()
            server.server_close()


_current = threading.local()  # job_id: the job this thread performs; failing: the one it fails


def _lost(worker: Worker, job: Any, queue: Any, execution: Any, exc: BaseException) -> None:
    """The job's thread left perform_job by an exception: as RQ's Worker for a work horse that
    died, the job fails unless it has ended already."""
    from rq.job import JobStatus

    try:
        if job.get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED):
            return
        job.ended_at = _now()
        exc_string = f"Work-horse terminated unexpectedly: {exc!r}"
        worker.log.warning("Worker %s: job %s failed (%s)", worker.name, job.id, exc_string)
        worker.handle_job_failure(job, queue=queue, exc_string=exc_string, execution=execution)
    except Exception:  # noqa: BLE001 - logged: the job is left in the StartedJobRegistry for RQ's cleanup
        worker.log.exception("Worker %s: could not record the failure of job %s", worker.name, job.id)


def _now() -> Any:
    from rq.utils import now

    return now()


# a task's waits are its sleeps, for blocking detection (CMWQ_DETECT_BLOCKING=1)
detect.add_user_call_site(Worker._perform)
