"""joblib on cmwq: ``parallel_config(backend="cmwq")`` runs ``Parallel`` calls on the shared pools.

Importing this module registers the backend under the name ``"cmwq"`` in the importing process
(joblib has no plugin entry points: a backend exists where ``register_parallel_backend`` ran).
Code that names the backend imports this module at its top level. That reaches joblib's process
workers too: loky and multiprocessing's spawn run a worker's main module again (as
``__mp_main__``) and import the module of every function they unpickle, so a module that imports
``cmwq_exec.joblib`` at the top has the name registered in each worker that runs its functions.
A :class:`CMWQBackend` *instance* (``parallel_config(backend=CMWQBackend())``) needs no name at
all: unpickled in another process it imports this module itself. And every loky worker started by
a process that imported this module knows the name too, whatever module its functions come from:
joblib's loky backend here starts its workers with an initializer (:class:`RegisterFirst`, around
the ``initializer`` asked for, if any) that registers it in each worker.

``n_jobs`` under concurrency management (what a ``Parallel`` call asks of the pools):

* ``-1`` or ``None``: no bound of its own: the pools run as many of its calls at once as keeps
  the CPUs busy, and more while some of them block. joblib dispatches ahead ``pre_dispatch``
  (``"2*n_jobs"``) calls: here ``n_jobs`` counts as ``IN_FLIGHT_PER_CPU`` (4) per CPU.
* ``k > 1``: at most ``k`` of its calls run at once (an executor with ``max_workers=k``); a call
  waiting for a nested ``Parallel`` does not count while it waits.
* ``-k`` (``k > 1``): joblib's "all CPUs but ``k - 1``": at most ``CPUs + 1 - k`` at once.
* ``1``: run in the calling thread, one after another, as joblib's ``threading`` backend does.

A call's exception comes back with joblib's traceback capture (the remote traceback attached, as
with its ``loky`` backend). ``return_as="generator"`` and ``"generator_unordered"`` work.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from joblib import parallel as _parallel
from joblib._parallel_backends import FallbackToBackend, LokyBackend, ParallelBackendBase, SequentialBackend
from joblib._utils import _retrieve_traceback_capturing_wrapped_call, _TracebackCapturingWrapper

from .core.worker import current
from .core.workqueue import waiting
from .executor import CMWQExecutor

__all__ = ["IN_FLIGHT_PER_CPU", "CMWQBackend", "RegisterFirst", "register"]

#: ``n_jobs=-1``'s worth of calls dispatched ahead, per CPU: enough to keep the CPUs busy while
#: some calls block, few enough that joblib's ordered dispatch still bounds memory.
IN_FLIGHT_PER_CPU = 4


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class CMWQBackend(ParallelBackendBase):  # type: ignore[misc]
    """A joblib backend whose calls run on the shared cmwq pools (see the module for ``n_jobs``)."""

    supports_retrieve_callback = True
    uses_threads = True
    supports_sharedmem = True
    default_n_jobs = -1

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None,
                 **backend_kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads,
                         **backend_kwargs)
        self._executor: CMWQExecutor | None = None
        self._bound: int | None = None

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many calls joblib keeps in flight (its batching and ``pre_dispatch`` read it)."""
        bound = self._running_bound(n_jobs)
        return bound if bound is not None else IN_FLIGHT_PER_CPU * _cpu_count()

    @staticmethod
    def _running_bound(n_jobs: int | None) -> int | None:
        """The most calls of one ``Parallel`` that run at once, None for as many as the pools run."""
        if n_jobs is None or n_jobs == -1:
            return None
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")  # joblib's words, as its backends
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int):
            raise ValueError(f"n_jobs must be a non-zero int or None (-1 or None: as many as the pools "
                             f"run, k > 0: at most k at once), got {n_jobs!r}")
        if n_jobs < 0:
            return max(_cpu_count() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int | None = -1, parallel: Any = None, prefer: str | None = None,
                  require: str | None = None, **backend_kwargs: Any) -> int:
        effective = self.effective_n_jobs(n_jobs)
        bound = self._running_bound(n_jobs)
        if bound == 1:
            # as joblib's threading backend: one call at a time runs best in the caller's thread
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._bound = bound
        self._executor = CMWQExecutor(max_workers=bound, name="joblib")
        return effective

    def submit(self, func: Callable[[], Any], callback: Callable[[Future[Any]], object] | None = None,
               ) -> Future[Any]:
        if self._executor is None:
            raise RuntimeError("CMWQBackend.submit() before configure(): use it through joblib.Parallel")
        future = self._executor.submit(_TracebackCapturingWrapper(func))
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        return _retrieve_traceback_capturing_wrapped_call(out.result())

    @contextmanager
    def retrieval_context(self) -> Iterator[None]:
        """The caller waits for its calls here (joblib polls them): when it is itself a call on the
        pools (a nested ``Parallel``), it gives up its running slot, and its executor's
        ``max_workers`` slot, while it waits, so the calls it waits for can run."""
        with waiting(current.worker):
            yield

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        """A ``Parallel`` inside one of our calls runs on the pools too, with no bound of its own
        (the outer call waits meanwhile and gives its slot up)."""
        level = (self.nesting_level or 0) + 1
        return CMWQBackend(nesting_level=level), None

    def terminate(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the calls not started yet (their futures say so); the running ones finish."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if ensure_ready and self.parallel is not None:
            self._executor = CMWQExecutor(max_workers=self._bound, name="joblib")

    def __getstate__(self) -> dict[str, Any]:
        """A backend sent to another process (as a nested backend) leaves its executor behind."""
        state = self.__dict__.copy()
        state["_executor"] = None
        state["parallel"] = None
        return state


def register() -> None:
    """Register the ``"cmwq"`` backend in this process (importing this module already did; calling
    it again changes nothing)."""
    if _parallel.BACKENDS.get("cmwq") is not CMWQBackend:
        _parallel.register_parallel_backend("cmwq", CMWQBackend)


class RegisterFirst:
    """A loky worker's initializer: register ``"cmwq"`` in the worker (unpickling this object
    imports this module there), then run the user's own initializer, if any, with its initargs.
    Equal to another one with the same user initializer, so loky still reuses its executor."""

    __slots__ = ("then",)

    def __init__(self, then: Callable[..., Any] | None) -> None:
        self.then = then

    def __call__(self, *initargs: Any) -> None:
        register()
        if self.then is not None:
            self.then(*initargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegisterFirst) and other.then == self.then

    def __hash__(self) -> int:
        return hash((RegisterFirst, self.then))

    def __reduce__(self) -> tuple[Any, ...]:
        return (RegisterFirst, (self.then,))


def _follow_into_loky_workers() -> None:
    """Give every loky worker this process starts the ``"cmwq"`` name: joblib's ``LokyBackend``
    (and its subclasses) start their executors with a :class:`RegisterFirst` initializer wrapped
    around the one asked for. joblib has no other hook in its workers (no plugin entry points: a
    backend exists where ``register_parallel_backend`` ran), and code running in a loky worker may
    name ``"cmwq"`` without importing this module. Done once per process, on import."""
    configure = LokyBackend.configure
    if getattr(configure, "cmwq_follows", False):
        return

    @functools.wraps(configure)
    def configure_with_cmwq(self: LokyBackend, *args: Any, **kwargs: Any) -> Any:
        asked = kwargs.get("initializer", self.backend_kwargs.get("initializer"))
        if not isinstance(asked, RegisterFirst):
            kwargs["initializer"] = RegisterFirst(asked)
        return configure(self, *args, **kwargs)

    configure_with_cmwq.cmwq_follows = True  # type: ignore[attr-defined]
    LokyBackend.configure = configure_with_cmwq


register()
_follow_into_loky_workers()
