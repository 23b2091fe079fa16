"""The ``concurrent.futures`` face: :class:`CMWQExecutor`, a workqueue that returns futures.

Every executor is a workqueue on the shared pools; ``max_workers`` is its ``max_active``. Each
submitted call is a one-shot work that is also its own future (:class:`CMWQFuture`), so a submit
allocates one object.

Waiting on a CMWQ future from inside a worker tells the pool the worker sleeps (another worker takes
over), and first *helps*: a future whose work has not started yet is claimed and run inline on the
waiting thread (Java ForkJoinPool's join helping), so nested submit-and-wait cannot deadlock on a
worker limit; the helped call runs in a context of its own, not the caller's (see
:mod:`cmwq_exec.inline_context`). ``concurrent.futures.wait`` and ``as_completed`` get the sleep
notification (their waiter's event is swapped for one that reports) but do not help.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError  # not the builtin before 3.11
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from concurrent.futures.thread import BrokenThreadPool
from typing import Any, ClassVar, ParamSpec, TypeVar

from . import detect, inline_context
from .core import workqueue as _workqueue
from .core.interfaces import QueueState
from .core.lockdep import ENABLED as _CHECKED
from .core.lockdep import assert_held, make_lock
from .core.pending import NOWHERE
from .core.worker import current
from .core.workqueue import WQ, WorkQueue, waiting
from .future_waits import _FINISHED_CONDITION, _Waiters

#: Helping runs works inline on the waiting thread; past this depth it just waits.
MAX_HELP_DEPTH = 64

_shutting_down = False
_AFTER_SHUTDOWN = "cannot schedule new futures after shutdown"
_executors: weakref.WeakSet[CMWQExecutor] = weakref.WeakSet()
_help = threading.local()
_LOGGER = logging.getLogger("concurrent.futures")


#: A future makes its Condition only when someone waits on it or adds a callback: a private
#: Condition costs eight garbage-collected objects, and the collector's passes over them dominated the
#: submit path. Until then it is claimed and finished under one of these small locks (never held
#: while taking another lock, so no lock order can be violated). A future takes the next stripe in
#: turn and keeps its index: cheaper than hashing its identity (a large int) on every use.
_STRIPES = tuple(make_lock("stripe") for _ in range(64))
_next_stripe = itertools.cycle(range(len(_STRIPES))).__next__
_NO_CALLBACKS: tuple[Any, ...] = ()




_T = TypeVar("_T")
_P = ParamSpec("_P")


class CMWQFuture(Future[_T]):
    """A submitted call: the future users hold and the one-shot work the pools run.

    A ``concurrent.futures.Future`` in every way that ``wait``, ``as_completed`` and asyncio use; it
    allocates its waiter and callback lists only when someone installs one.
    """

    _reusable: ClassVar[bool] = False
    __slots__ = ("_cond", "_state", "_result", "_exception", "_waiter_list", "_done_callbacks",
                 "_fn", "_args", "_kwargs", "_pwq", "_color", "_queued_at", "_counted", "_where",
                 "_stripe")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Future.__init__, inlined (the submit path is hot)
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result = None
        self._exception: BaseException | None = None
        self._waiter_list: _Waiters | None = None
        self._done_callbacks: Any = _NO_CALLBACKS
        self._fn: Callable[..., Any] | None = fn
        self._args = args
        self._kwargs = kwargs
        self._pwq: QueueState | None = None
        self._color = 0
        self._queued_at = 0.0
        self._counted = False  # holds a max_active slot of its workqueue (set under its _lock)
        self._where = NOWHERE  # for the rescuer and for reading (see cmwq_exec.core.pending)
        self._stripe = _next_stripe()  # index of its lock in _STRIPES

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        """The future's Condition, made on first use (what Future's own methods take); none for
        a future that finished without one (see _FinishedCondition). Read under the stripe lock
        that ``_run`` writes FINISHED under while there is no Condition."""
        cond = self._cond
        if cond is None:
            with _STRIPES[self._stripe]:
                cond = self._cond
                if cond is None:
                    if self._state == FINISHED:
                        return _FINISHED_CONDITION
                    cond = self._cond = threading.Condition()
        return cond

    @property
    def _waiters(self) -> _Waiters:  # type: ignore[override]  # used by concurrent.futures.wait/as_completed, under _condition
        waiters = self._waiter_list
        if waiters is None:
            # under the stripe lock: two waiters of a finished future hold no common Condition
            with _STRIPES[self._stripe]:
                waiters = self._waiter_list
                if waiters is None:
                    waiters = self._waiter_list = _Waiters()
        return waiters

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        with self._condition:
            if self._state not in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                if self._done_callbacks is _NO_CALLBACKS:
                    self._done_callbacks = []
                self._done_callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:
            _LOGGER.exception("exception calling callback for %r", self)

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception)

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        """Future.set_result/set_exception, by someone who may not have claimed the future (a
        broken executor failing its calls, or code using the Future API): refused once it is done.
        A run's own outcome is stored by :meth:`_run`."""
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._finish_locked(result, exception)
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def _finish_locked(self, result: Any, exception: BaseException | None) -> None:
        """Store the outcome, then FINISHED; tell ``concurrent.futures.wait``'s waiters and wake
        ``result()``. _condition held."""
        if _CHECKED:  # once per work: not even the no-op's call
            assert_held(self._condition)
        self._result = result
        self._exception = exception
        self._state = FINISHED
        for waiter in self._waiter_list or ():
            if exception is None:
                waiter.add_result(self)
            else:
                waiter.add_exception(self)
        self._condition.notify_all()

    def _wait_done(self, timeout: float | None) -> None:
        """Wait (on the shared condition, so in a loop) until finished or cancelled; raise
        CancelledError or TimeoutError like Future.result. Called with _condition held."""
        if _CHECKED:  # once per waited result: not even the no-op's call
            assert_held(self._condition)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._state not in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
            if deadline is None:
                self._condition.wait()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise FuturesTimeoutError()
            self._condition.wait(left)
        if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            raise CancelledError()

    def _get(self, timeout: float | None, want_result: bool) -> Any:
        if self._state != FINISHED:
            cond = self._condition
            # the lock's own with, not the Condition's: Condition.__enter__ is a Python function,
            # and an exception injected as it returns (a Celery time limit) would keep the lock
            # for good, hanging the worker that finishes this call (core/interrupts.py)
            with getattr(cond, "_lock", cond):
                self._wait_done(timeout)
        # FINISHED is final and its fields were written before it
        if not want_result:
            return self._exception
        if self._exception is not None:
            try:
                raise self._exception
            finally:
                self = None  # type: ignore[assignment]  # break the reference cycle
        return self._result

    def _claim(self) -> bool:
        """PENDING -> RUNNING for whoever runs it (a worker, or a helper). False if cancelled or
        already claimed."""
        if self._cond is None:  # nobody waits: a stripe lock is enough against a racing cancel()
            with _STRIPES[self._stripe]:
                if self._cond is None:
                    if self._state != PENDING:
                        return False  # nobody waited, so a cancelled one needs no notification
                    self._state = RUNNING
                    return True
        with self._condition:
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state == CANCELLED:
                # in the same hold (the Condition's lock is reentrant): of two claimers (a worker
                # and a helper), only the first tells the waiters; the second sees it told
                return self.set_running_or_notify_cancel()  # notifies waiters, returns False
        return False

    def _run(self) -> BaseException | None:
        """Run the claimed call and finish the future with its outcome: RUNNING -> FINISHED by
        whoever claimed it.

        Once the future has a Condition, FINISHED is written under it and its waiters are told in
        the same hold: ``concurrent.futures.wait`` and ``as_completed`` read the state and install
        their waiter under it, and a waiter that read FINISHED counted the future done, so it must
        not hear of it again (``wait`` would return with calls still running). Until then the
        state is written under the stripe lock that makes the Condition, so no waiter can come
        between reading ``_cond`` and writing the state. The outcome is stored before the state.
        Done callbacks are read after the lock is released: ``add_done_callback`` appends under
        the Condition only while the state is not FINISHED.

        A future that ``set_result``/``set_exception`` finished while its call ran keeps that
        outcome; the call's is dropped with a warning (its waiters and callbacks heard once)."""
        fn, args, kwargs = self._fn, self._args, self._kwargs
        self._fn = self._args = self._kwargs = None  # type: ignore[assignment]
        exception: BaseException | None = None
        try:
            result = fn(*args, **kwargs)  # type: ignore[misc]
        except BaseException as exc:
            result = None
            exception = exc
        cond = self._cond
        if cond is None:
            # a worker's or a helper's thread (see _execute: no with-block needed)
            stripe = _STRIPES[self._stripe]
            stripe.acquire()
            cond = self._cond
            if cond is None:  # nobody waits, and no set_result came (it makes the Condition)
                self._result = result
                self._exception = exception
                self._state = FINISHED
                stripe.release()
                return exception
            stripe.release()
        with cond:
            if self._state == FINISHED:
                _LOGGER.warning("%r was finished by set_result/set_exception while its call ran; "
                                "the call's own outcome is dropped", self)
                return exception
            self._finish_locked(result, exception)
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]
        return exception

    def _execute(self) -> BaseException | None:
        claimed = False
        if self._cond is None:  # _claim(), its common case inlined (the hot path of every call)
            # Called on a worker's thread: no KeyboardInterrupt reaches it, and a Celery time limit
            # is raised only inside the call, so the stripe is taken with plain calls, not a
            # with-block (whose __enter__/__exit__ cost twice as much as acquire/release here).
            stripe = _STRIPES[self._stripe]
            stripe.acquire()
            try:
                if self._cond is None:
                    if self._state != PENDING:
                        return None
                    self._state = RUNNING
                    claimed = True
            finally:
                stripe.release()
        if not claimed and not self._claim():
            return None
        return self._run()

    def _help(self, worker: Any) -> None:
        """Run this future's work inline if nobody started it yet (called on a worker's thread).

        A call of an executor with ``max_workers`` is helped only by a worker running a call of the
        same executor: inline it takes the waiting caller's place, so the limit still holds."""
        pwq = self._pwq
        if pwq is not None and pwq.wq._max_active is not None:
            mine = worker.current_pwq
            if mine is None or mine.wq is not pwq.wq:
                return
        depth = getattr(_help, "depth", 0)
        if depth >= MAX_HELP_DEPTH or not self._claim():
            return
        _help.depth = depth + 1
        try:
            self._run_helped()
        finally:
            _help.depth = depth

    def _run_helped(self) -> BaseException | None:
        """Run the claimed call for the worker waiting on it, in a context of its own, as if a
        worker thread of its own ran it: nothing of the caller's context reaches it or changes
        (see cmwq_exec.inline_context)."""
        return inline_context.run_fresh(self._run)

    def result(self, timeout: float | None = None) -> _T:
        if self._state == FINISHED and self._exception is None:
            # FINISHED is final and its fields were written before it (no cast(): hot path)
            return self._result  # type: ignore[return-value]
        worker = current.worker
        if self._state != FINISHED and worker is not None:
            if self._state == PENDING:
                self._help(worker)
            with waiting(worker):
                return self._get(timeout, True)
        return self._get(timeout, True)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        worker = current.worker
        if self._state != FINISHED and worker is not None:
            if self._state == PENDING:
                self._help(worker)
            with waiting(worker):
                return self._get(timeout, False)  # type: ignore[no-any-return]
        return self._get(timeout, False)  # type: ignore[no-any-return]


class _InitFuture(CMWQFuture[_T]):
    """A future of an executor with an initializer or a thread name prefix."""

    __slots__ = ()

    _executor: CMWQExecutor

    def _execute(self) -> BaseException | None:
        if not self._claim():
            return None
        return self._run_claimed()

    def _run_claimed(self) -> BaseException | None:
        if not self._executor._prepare_thread(self):
            return None
        return self._run_named()

    def _run_helped(self) -> BaseException | None:
        executor = self._executor
        if not executor._prepare_thread(self):  # in the thread's own context, as on a worker
            return None
        base = getattr(executor._initialized, "context", None)
        if base is None:
            return inline_context.run_fresh(self._run_named)
        return inline_context.run_in_copy(base, self._run_named)

    def _run_named(self) -> BaseException | None:
        prefix = self._executor._thread_name_prefix
        if not prefix:
            return self._run()
        thread = threading.current_thread()
        name = thread.name
        thread.name = f"{prefix}_{name}"
        try:
            return self._run()
        finally:
            thread.name = name


_counter = itertools.count()


class CMWQExecutor(ThreadPoolExecutor):
    """A ``concurrent.futures.Executor`` running calls on the shared concurrency-managed pools.

    Drop-in for ``ThreadPoolExecutor``, down to being an instance of it (asyncio's
    ``set_default_executor`` accepts only those; none of its machinery is used). ``max_workers``
    still means at most that many of this executor's calls run at once, but ``None`` (the default)
    needs no guess: concurrency management starts a thread only when the running ones block.
    ``rescuer`` reserves one thread that keeps this executor's calls moving when no worker thread
    can be created.
    """

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "",
                 initializer: Callable[..., object] | None = None, initargs: tuple[Any, ...] = (), *,
                 name: str | None = None, rescuer: bool = True, unbound: bool = False) -> None:
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an int or None, got {type(max_workers).__name__}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if not isinstance(thread_name_prefix, str):
            raise TypeError(f"thread_name_prefix must be a str, got {type(thread_name_prefix).__name__}")
        flags = WQ(0)
        if rescuer:
            flags |= WQ.RESCUER
        if unbound:
            flags |= WQ.UNBOUND
        self._wq = wq = WorkQueue(name or f"executor-{next(_counter)}", flags, max_active=max_workers)
        # ThreadPoolExecutor.__init__'s attributes, with their meaning (code written for it reads them)
        self._max_workers = max_workers if max_workers is not None else wq.system.config.max_total_workers
        self._thread_name_prefix = thread_name_prefix
        self._initializer = initializer  # type: ignore[assignment]  # TPE types it as returning None
        self._initargs = initargs
        self._shutdown = False
        self._broken: str | bool = False  # type: ignore[assignment]  # False, or why it broke (as TPE)
        self._shutdown_lock = make_lock("executor")
        self._initialized = threading.local()
        self._future_class: type[CMWQFuture] = CMWQFuture
        if initializer is not None or thread_name_prefix:
            self._future_class = type("_Future", (_InitFuture,), {"_executor": self})
        # dropped without shutdown(): its rescuer goes once its calls are done (thread.py's weakref
        # callback does the same for its threads)
        weakref.finalize(self, wq.close)
        _executors.add(self)

    @property
    def _work_queue(self) -> _PendingCalls:  # type: ignore[override]
        """ThreadPoolExecutor's queue of calls not yet started: here a read-only view of them."""
        return _PendingCalls(self._wq)

    @property
    def _threads(self) -> set[threading.Thread]:  # type: ignore[override]
        """The threads that may run this executor's calls: the workers of the pools it uses."""
        pools = self._wq.pools
        threads: set[threading.Thread] = set()
        for pool in pools:
            with pool.lock:
                threads.update(w.thread for w in pool.workers if w.thread is not None)
        return threads

    @property
    def _idle_semaphore(self) -> threading.Semaphore:  # type: ignore[override]
        """ThreadPoolExecutor counts its idle threads in a semaphore: a snapshot of the idle workers."""
        system = self._wq.system
        return threading.Semaphore(sum(pool.nr_idle for pool in system.pools))

    @property
    def workqueue(self) -> WorkQueue:
        """The workqueue behind this executor."""
        return self._wq

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> CMWQFuture[_T]:
        # No lock here: shutdown() closes the workqueue to calls (refuse_calls) before it waits, so
        # a submit racing with it either is queued before the wait or raises.
        if self._broken:
            raise BrokenThreadPool(self._broken)
        if self._shutdown:
            raise RuntimeError(_AFTER_SHUTDOWN)
        if _shutting_down:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        future = self._future_class(fn, args, kwargs)
        self._wq.queue_call(future)
        return future

    submit.__doc__ = Executor.submit.__doc__

    def map(self, fn: Callable[..., _T], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[_T]:
        """Like ``Executor.map``; an int ``chunksize`` > 1 sends that many calls per work.

        Any other ``chunksize`` runs one call per work, as ``ThreadPoolExecutor.map``, which takes
        the argument and ignores it, does for every value.
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize <= 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = _chunks(zip(*iterables, strict=False), chunksize)
        results = super().map(_run_chunk, itertools.repeat(fn), chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            self._shutdown = True
        self._wq.refuse_calls(_AFTER_SHUTDOWN)
        if cancel_futures:
            for work in self._wq.pending_works():
                if isinstance(work, CMWQFuture):
                    work.cancel()
        if wait:
            worker = current.worker
            pwq = worker.current_pwq if worker is not None else None
            if pwq is not None and pwq.wq is self._wq:
                raise RuntimeError("shutdown(wait=True) from one of the executor's own calls would "
                                   "wait for itself; use shutdown(wait=False)")
            self._wq.flush()
            self._wq.stop_rescuer()
        else:
            self._wq.close()  # the rescuer goes once the calls in flight are done

    shutdown.__doc__ = Executor.shutdown.__doc__

    # -- initializer ------------------------------------------------------------------------------

    def _prepare_thread(self, future: CMWQFuture) -> bool:
        """Run the initializer once per worker thread; a failure breaks the executor."""
        if self._initializer is None or getattr(self._initialized, "done", False):
            return True
        if self._broken:
            future.set_exception(BrokenThreadPool(self._broken))
            return False
        try:
            self._initializer(*self._initargs)
        except BaseException as exc:
            _LOGGER.critical("Exception in initializer:", exc_info=True)  # as ThreadPoolExecutor's
            self._break("A thread initializer failed, the thread pool is not usable anymore")
            future.set_exception(BrokenThreadPool(self._broken))
            future.exception().__cause__ = exc  # type: ignore[union-attr]
            return False
        self._initialized.done = True
        self._initialized.context = inline_context.snapshot()  # for the calls it helps inline
        return True

    def _break(self, reason: str) -> None:
        with self._shutdown_lock:
            if self._broken:
                return
            self._broken = reason
        for work in self._wq.pending_works():
            if isinstance(work, CMWQFuture) and work._claim():
                work.set_exception(BrokenThreadPool(reason))

    def __repr__(self) -> str:
        return f"<CMWQExecutor {self._wq.name!r} max_workers={self._wq.max_active}>"


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[tuple[Any, ...]]:
    it = iter(iterable)
    while chunk := tuple(itertools.islice(it, size)):
        yield chunk


def _run_chunk(fn: Callable[..., _T], chunk: tuple[tuple[Any, ...], ...]) -> list[_T]:
    return [fn(*args) for args in chunk]


class _PendingCalls:
    """``executor._work_queue``: ``qsize()`` and ``empty()`` of the calls not yet started."""

    __slots__ = ("_wq",)

    def __init__(self, wq: WorkQueue) -> None:
        self._wq = wq

    def qsize(self) -> int:
        return sum(1 for work in self._wq.pending_works()
                   if isinstance(work, CMWQFuture) and not work.done())

    def empty(self) -> bool:
        return self.qsize() == 0


def _python_exit() -> None:
    """Interpreter shutdown: refuse new calls, let every queued one finish, whether or not its
    executor is still referenced (like ThreadPoolExecutor), and the works of every workqueue."""
    global _shutting_down
    _shutting_down = True
    try:
        _workqueue.flush_all()
    except Exception:  # pragma: no cover - best effort at exit
        _LOGGER.exception("cmwq_exec: waiting for queued works at exit failed")


def _after_fork_in_child() -> None:
    """In a forked child: locks held by the parent's threads at fork time are fresh again."""
    global _STRIPES
    _STRIPES = tuple(make_lock("stripe") for _ in range(64))
    _help.depth = 0
    for executor in list(_executors):
        executor._shutdown_lock = make_lock("executor")


os.register_at_fork(after_in_child=_after_fork_in_child)
detect.add_user_call_site(CMWQFuture._run)
detect.add_user_call_site(_run_chunk)
# Runs before threading joins non-daemon threads, like ThreadPoolExecutor's own exit hook.
threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
