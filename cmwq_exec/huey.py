"""A Huey consumer whose tasks run as works on cmwq_exec's shared per-CPU pools.

Start it as ``huey_consumer`` is started, with the same options (``python -m cmwq_exec.huey
--help``)::

    python -m cmwq_exec.huey app.huey -l consumer.log

or build it in code: ``cmwq_exec.huey.Consumer(huey, **options).run()`` takes the options of
``huey.consumer.Consumer``.

No number of workers to guess
    The stock consumer runs tasks on ``-w`` threads (default 1). Here tasks are dequeued and run
    by a chain of works on one cmwq pool (see :class:`Consumer`): a task that blocks (in
    :func:`cmwq_exec.blocking`, waiting on a cmwq future, or as the watchdog sees it) lets the pool
    start the next link, which dequeues the next task, so tasks that wait overlap; CPU-bound ones
    run back to back on one thread (one process has one GIL), as on Huey's single worker, and only
    the task being run is out of the queue. ``-w N``, if given, bounds the tasks *running* at once,
    where a task asleep in ``blocking()`` does not count (``max_running`` of the consumer's
    workqueue, as the Celery pool's ``-c``). Only the thread worker type exists here: ``-k
    process`` and ``-k greenlet`` are refused.

Timeouts on threads
    A task's ``timeout`` raises :class:`huey.exceptions.TaskTimeout` inside the task's thread when it
    expires (an asynchronous exception, :mod:`cmwq_exec.injection`), as the process worker type does
    with ``SIGALRM``; Huey records it as it records any timeout (``SIGNAL_TIMEOUT``, the error
    stored). The stock thread worker has only ``task.check_timeout()``, which still works.

Shutdown, as Huey's
    The graceful signal (SIGINT, or SIGTERM with ``-g TERM``) stops dequeuing and waits for every
    dequeued task to finish, up to ``-t/--shutdown-timeout``; the other signal, or the timeout,
    interrupts the running tasks: ``KeyboardInterrupt`` is raised in each (as in the process worker
    type), and Huey reports them ``SIGNAL_INTERRUPTED``. Nothing is put back in the queue (Huey's
    queues have no acknowledgement): what was not dequeued stays there.

Per-thread hooks
    ``@huey.on_startup`` hooks run on each thread before the first task it runs for the consumer
    (a cmwq thread runs works of every workqueue, and is reaped after 10 s idle; a new one runs
    them again); ``@huey.on_shutdown`` hooks run once, on the consumer's worker thread, after the
    last task.

Metrics: with ``CMWQ_METRICS_PORT`` set (0 to 65535; ``CMWQ_METRICS_ADDR``, default ``127.0.0.1``)
the consumer serves Prometheus metrics (:mod:`cmwq_exec.metrics`, the workqueue is ``huey``), which
``cmwq-exec top`` reads.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from typing import Any

from huey.constants import WORKER_THREAD
from huey.consumer import Consumer as HueyConsumer
from huey.consumer import Worker as HueyWorker
from huey.exceptions import ConfigurationError, TaskTimeout

from . import detect
from .blocking import blocking
from .core import timer as _timer
from .core.lockdep import make_lock, must_hold
from .core.system import get_system
from .core.workqueue import WQ, Work, WorkQueue
from .injection import close_window_surely, inject, open_window
from .metrics import address_from_environment as metrics_address

__all__ = ["Consumer", "Worker", "main"]

log = logging.getLogger("cmwq_exec.huey")

#: Seconds the interrupting shutdown waits for interrupted tasks to end before Huey reports what is
#: still in flight (the process worker type waits the same second for its children).
INTERRUPT_GRACE = 1.0


class _Job:
    """One task's injection window (see cmwq_exec.injection) while its thread runs it.

    ``G:`` under ``gate``; ``P:`` under the consumer's ``_lock``; ``I:`` set at creation.
    """

    __slots__ = ("pool", "gate", "thread_id", "in_target", "finished", "unwind", "revoked_early",
                 "timer")

    def __init__(self, pool: Consumer) -> None:
        self.pool = pool  # I: the consumer (its _lock is held to inject)
        self.gate = threading.Lock()  # I
        self.thread_id = threading.get_ident()  # I
        self.in_target = False  # G
        self.finished = False  # G
        self.unwind: str | None = None  # P: "timeout" or "interrupted" once injected (one per job)
        self.revoked_early = False  # I: Huey checks revocation before a task runs
        self.timer: _timer.Timer | None = None  # X: its timeout


class _Timeout(TaskTimeout):
    """TaskTimeout raised into a task's thread; the interpreter makes it with no arguments."""

    seconds: float = 0.0

    def __init__(self, *args: Any) -> None:
        super().__init__(*(args or (f"timeout {self.seconds}s",)))  # as check_timeout() says it


@functools.lru_cache(maxsize=64)
def _timeout_class(seconds: float) -> type[TaskTimeout]:
    return type("TaskTimeout", (_Timeout,), {"seconds": seconds, "__module__": __name__})


class _Window:
    """The context Huey runs ``task.execute()`` in (its ``_timeout_context``): the injection window,
    and the task's timeout timer if it has one."""

    __slots__ = ("consumer", "seconds", "job")

    def __init__(self, consumer: Consumer, seconds: float | None) -> None:
        self.consumer = consumer
        self.seconds = seconds
        self.job: _Job | None = None

    def __enter__(self) -> None:
        job = self.job = _Job(self.consumer)
        self.consumer._enter(job)
        if not open_window(job):
            self.consumer._leave(job)
            raise KeyboardInterrupt  # interrupted before it could start: Huey reports it so
        if self.seconds:
            job.timer = _timer.add_timer(self.seconds, functools.partial(
                self.consumer._expire, job, _timeout_class(self.seconds)))

    def __exit__(self, *exc_info: Any) -> None:
        job = self.job
        assert job is not None
        close_window_surely(job)
        if job.timer is not None:
            job.timer.cancel()
        self.consumer._leave(job)


class Worker(HueyWorker):
    """Dequeues a task and runs it, as Huey's worker does (``loop()``); the consumer runs it as a
    chain of works instead of a thread of its own (see :class:`Consumer`)."""

    process_name = "Worker"

    def __init__(self, huey: Any, stop_flag: Any, default_delay: float, max_delay: float,
                 backoff: float, max_tasks: int | None = None, consumer: Consumer | None = None) -> None:
        if consumer is None:
            raise TypeError("cmwq_exec.huey.Worker: consumer is required (the cmwq_exec.huey.Consumer "
                            "whose workqueue runs the tasks)")
        self.consumer = consumer
        super().__init__(huey, stop_flag, default_delay, max_delay, backoff, max_tasks)

    def initialize(self) -> None:
        """Nothing here: the startup hooks run on the threads that run the tasks."""

    def loop(self, now: Any = None) -> bool:
        """Dequeue one task and run it on this thread; False if, meanwhile, another work took over
        the dispatching (the chain's next link started while this task waited)."""
        try:
            with blocking():
                task = self.huey.dequeue()
        except Exception:
            self._logger.exception("Error reading from queue")
            self.sleep()
            return True
        if task is None:
            if not self.huey.storage.blocking:
                self.sleep()
            return True
        self.delay = self.default_delay
        self.task_count += 1
        return self.consumer._run_task(self, task, now)

    def sleep(self) -> None:
        with blocking():  # an empty queue's backoff is a wait, not work
            super().sleep()


class Consumer(HueyConsumer):
    """A Huey consumer running tasks on a cmwq workqueue; options as ``huey.consumer.Consumer``,
    except ``workers``: None (default) for no limit, or the most tasks running at once; and
    ``max_tasks``, which has nothing to recycle (cmwq's threads serve every workqueue).

    How tasks are dispatched: a *chain* of works of the consumer's workqueue. A link dequeues a
    task (asleep in ``blocking()`` while the queue is empty), queues the next link, and runs the
    task. If the task finishes before the pool started the next link (it never blocked: the pool
    runs one work at a time while one is running), the link takes the next link back off the queue
    (``Work.cancel``) and dequeues again itself: CPU-bound tasks run back to back on one thread, as
    on Huey's single worker. If the task blocked, the pool started the next link meanwhile, which
    dequeues the next task: waiting tasks overlap, on as many threads as wait. The consumer's
    worker thread only starts the chain, restarts it if it ever ends while the consumer runs, and
    waits for it at shutdown (Huey joins that thread).

    Fields: ``I:`` set in ``__init__``; ``P:`` under ``_lock``; ``D:`` the worker thread's.

    Invariants (under ``_lock``): ``_links`` counts the links queued or running (0 only before the
    start, after the stop, or for a moment after a link failed); ``_inflight`` the tasks running
    in links; ``_jobs`` holds the windows of the tasks inside ``task.execute()``; after
    ``_interrupting`` no task starts its code.
    """

    worker_class = Worker

    def __init__(self, huey: Any, workers: int | None = None, *args: Any, **kwargs: Any) -> None:
        worker_type = kwargs.get("worker_type", WORKER_THREAD)
        if worker_type != WORKER_THREAD:
            raise ConfigurationError(
                f"cmwq_exec.huey.Consumer: worker_type must be {WORKER_THREAD!r} (tasks run on cmwq's "
                f"threads), got {worker_type!r}; use huey_consumer for the process or greenlet types")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                    or workers < 1):
            raise ConfigurationError(
                "cmwq_exec.huey.Consumer: workers must be None (no limit: concurrency management "
                f"decides) or a positive integer (the most tasks running at once), got {workers!r}")
        self._lock = make_lock("executor")
        self._idle = threading.Condition(self._lock)  # notified when a link or a task ends
        self._links = 0  # P
        self._inflight = 0  # P
        self._jobs: dict[int, _Job] = {}  # P: thread id -> the window of the task it runs
        self._interrupting = False  # P
        self._wq: WorkQueue | None = None  # D: made when the chain starts, destroyed at the stop
        self._cpu: int | None = None  # D: the CPU whose pool runs the chain (None: any)
        self._local = threading.local()  # per thread: in a link; the startup hooks ran
        self._metrics_server: Any = None
        super().__init__(huey, 1, *args, **kwargs)
        self.workers = workers  # I: max_running of the workqueue (None: no limit)
        huey._timeout_context = self._window  # every task runs in a window, with or without timeout

    def _create_worker(self) -> Worker:
        return self.worker_class(huey=self.huey, stop_flag=self.stop_flag,
                                 default_delay=self.default_delay, max_delay=self.max_delay,
                                 backoff=self.backoff, max_tasks=self.max_tasks, consumer=self)

    def _create_process(self, process: Any, name: str) -> Any:
        if not isinstance(process, Worker):
            return super()._create_process(process, name)  # the scheduler
        return self.environment.create_process(functools.partial(self._supervise, process), name)

    def _window(self, task: Any) -> _Window:
        return _Window(self, task.timeout or None)

    # -- start and stop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler and the chain, and the metrics endpoint if one is configured."""
        address = metrics_address()
        if address is not None and self._metrics_server is None:
            from . import metrics

            self._metrics_server, _ = metrics.start_http_server(*address)
            log.info("cmwq_exec: serving Prometheus metrics on http://%s:%s/metrics", address[1],
                     self._metrics_server.server_port)
        super().start()

    def stop(self, graceful: bool = False) -> None:
        super().stop(graceful)
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def _interrupt_workers(self) -> None:
        """Interrupt what runs (KeyboardInterrupt in each task, as the process worker type's
        SIGTERM) and give the interrupted tasks INTERRUPT_GRACE seconds to end (Huey reports one
        as it unwinds, and the process may exit right after this), so that Huey reports each once."""
        with self._lock:
            self._interrupting = True
            for job in self._jobs.values():
                if job.unwind is None:
                    job.unwind = "interrupted"
                    inject(job, KeyboardInterrupt)
            self._idle.wait_for(lambda: not self._inflight, INTERRUPT_GRACE)
        super()._interrupt_workers()

    def _supervise(self, worker: Worker) -> None:
        """The consumer's worker thread: start the chain, restart it if it ends while the consumer
        runs, and at the stop wait for its links and tasks to end, then run the shutdown hooks."""
        self._wq = WorkQueue("huey", WQ.RESCUER, max_running=self.workers)
        self._wq.flush_at_exit = False  # Huey's own shutdown decides what to wait for
        self._cpu = get_system().local_pool().cpu
        try:
            while True:
                with self._lock:
                    lost = not self._links and not self.stop_flag.is_set()
                    if lost:
                        self._links += 1
                if lost:
                    self._queue_link(worker)
                if self.stop_flag.wait(self._stop_flag_timeout):
                    break
            with self._lock:
                self._idle.wait_for(lambda: not self._links and not self._inflight)
        finally:
            try:
                HueyWorker.shutdown(worker)
            finally:
                wq, self._wq = self._wq, None
                wq.destroy()

    # -- the chain --------------------------------------------------------------------------------

    def _queue_link(self, worker: Worker) -> Work:
        """Queue a link of the chain (``_links`` already counts it)."""
        link, wq, cpu = Work(self._link, worker), self._wq, self._cpu
        assert wq is not None
        if cpu is None:
            wq.queue_work(link)
        else:
            wq.queue_work_on(cpu, link)  # one pool: one GIL, as few idle threads as the load needs
        return link

    def _link(self, worker: Worker) -> None:
        """One link: dequeue and run tasks until the stop, or until the next link took over."""
        self._local.link = True
        try:
            while not self.stop_flag.is_set():
                if worker.loop() is False:
                    return
        finally:
            self._local.link = False
            with self._lock:
                self._links -= 1
                self._idle.notify_all()

    def _run_task(self, worker: Worker, task: Any, now: Any) -> bool:
        """Run a dequeued task on this thread; in a link, with the next link queued meanwhile.
        True if this thread goes on dispatching (no link, or the next one had not started)."""
        following = None
        if getattr(self._local, "link", False):
            with self._lock:
                self._links += 1
            following = self._queue_link(worker)  # started by the pool if this task blocks
        with self._lock:
            self._inflight += 1
        try:
            if getattr(self._local, "consumer", None) is not self:
                self._local.consumer = self
                HueyWorker.initialize(worker)
            try:
                self.huey.execute(task, now)
            except Exception:
                worker._logger.exception("Unhandled error during execution of task %s.", task.id)
        finally:
            with self._lock:
                self._inflight -= 1
                self._idle.notify_all()
        return following is None

    # -- a task's window --------------------------------------------------------------------------

    def _enter(self, job: _Job) -> None:
        with self._lock:
            if self._interrupting:
                job.unwind = "interrupted"
            self._jobs[job.thread_id] = job

    def _leave(self, job: _Job) -> None:
        with self._lock:
            if self._jobs.get(job.thread_id) is job:
                del self._jobs[job.thread_id]

    def _expire(self, job: _Job, exc_type: type[TaskTimeout]) -> None:
        """The task's timeout passed (timer thread): raise it in the task's thread."""
        with self._lock:
            self._expire_locked(job, exc_type)

    @must_hold("_lock")
    def _expire_locked(self, job: _Job, exc_type: type[TaskTimeout]) -> None:
        if job.unwind is None:
            job.unwind = "timeout"
            inject(job, exc_type)

    def stats(self) -> dict[str, Any]:
        """The consumer's task counts and its workqueue's counters."""
        with self._lock:
            counts: dict[str, Any] = {"running": len(self._jobs), "in-flight": self._inflight,
                                      "links": self._links, "max-running": self.workers}
        wq = self._wq
        if wq is not None:
            counts["workqueue"] = wq.counters()
        return counts


def main(argv: list[str] | None = None) -> int:
    """``huey_consumer``'s command line, with the cmwq consumer: ``python -m cmwq_exec.huey``."""
    from huey.bin.huey_consumer import load_huey
    from huey.consumer_options import ConsumerConfig, OptionParserHandler

    parser = OptionParserHandler().get_option_parser()
    parser.prog = "python -m cmwq_exec.huey"
    options, args = parser.parse_args(argv)
    if len(args) != 1:
        parser.error("expected one argument, the import path of the Huey instance "
                     "(e.g. python -m cmwq_exec.huey app.queue.huey)")
    given = {k: v for k, v in vars(options).items() if v is not None}
    if given.get("worker_type", WORKER_THREAD) != WORKER_THREAD:
        parser.error(f"-k/--worker-type: only {WORKER_THREAD!r} runs on cmwq, got "
                     f"{given['worker_type']!r} (use huey_consumer for it)")
    if "workers" in given and given["workers"] < 1:
        parser.error(f"-w/--workers: the most tasks running at once must be at least 1, got "
                     f"{given['workers']} (leave it out for no limit)")
    config = ConsumerConfig(**given)
    try:
        config.validate()
        metrics_address()
    except ValueError as exc:
        parser.error(str(exc))
    huey = load_huey(args[0])
    config.setup_logger(logging.getLogger("huey"))
    values = config.values
    values["workers"] = given.get("workers")  # not given: no limit (Huey's default would be 1)
    Consumer(huey, **values).run()
    return 0


# a task's waits are its sleeps, for blocking detection (CMWQ_DETECT_BLOCKING=1)
detect.add_user_call_site(Consumer._run_task)


if __name__ == "__main__":
    from cmwq_exec.huey import main as _main  # the importable module's classes, not __main__'s

    sys.exit(_main())
