"""The typed seams of the core: every Protocol the core names, one per seam, here.

A module that uses another from below (a worker runs works of workqueues that import the worker; a
pool serves a system that imports the pool) names the interface here, and mypy checks the
implementation against it. Each Protocol is named for what it is, from the side that uses it:

* :class:`Placed`, :class:`PoolCounters`: what binding a thread, and a policy function, read of a pool;
* :class:`PoolForWorkers`: a pool as its workers and rescuers see it
  (:class:`cmwq_exec.core.pool.WorkerPool`);
* :class:`SystemForWorkers`, :class:`SystemForPools`, :class:`SystemForWatchdog`,
  :class:`SystemForHotplug`: the set of pools (:class:`cmwq_exec.core.system.System`) as a worker,
  a pool, the watchdog and the hotplug code see it; :class:`WatchdogForPools`: the watchdog as a
  pool sees it;
* :class:`WorkQueueOps`, :class:`QueueState`, :class:`SlotHolder`: a workqueue, its state on one
  pool (:class:`cmwq_exec.core.workqueue.PoolWorkqueue`) and a worker, as the code below the
  workqueue sees them;
* :class:`WorkItem`, :class:`ReusableWork`, :class:`RunningWorker`, :class:`PendingBit`: a work
  (:class:`cmwq_exec.Work`, or :class:`cmwq_exec.CMWQFuture`: a submitted call is its own one-shot
  work) as a pool's worklist and its worker see it.

The ones that name a pool or a worker take its type as a parameter (``PoolForWorkers[Worker]``,
``SystemForPools[WorkerPool, Worker]``): the classes live above this module.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from .config import Config
    from .pending import Where

_P = TypeVar("_P")  # a pool (cmwq_exec.core.pool.WorkerPool)
_P_co = TypeVar("_P_co", covariant=True)
_P_contra = TypeVar("_P_contra", contravariant=True)
_W_co = TypeVar("_W_co", covariant=True)  # a worker (cmwq_exec.core.worker.Worker)
_W_contra = TypeVar("_W_contra", contravariant=True)


# -- pools, as the policy and thread binding read them ----------------------------------------------

class Placed(Protocol):
    """Where a pool's threads may run: its CPU (None: unbound) while that CPU is online."""

    @property
    def cpu(self) -> int | None: ...
    @property
    def online(self) -> bool: ...


class PoolCounters(Protocol):
    """What a policy function reads of a pool (``P`` fields, read under its lock)."""

    @property
    def worklist(self) -> Sized: ...
    @property
    def nr_running(self) -> int: ...
    @property
    def nr_idle(self) -> int: ...
    @property
    def nr_workers(self) -> int: ...
    @property
    def managing(self) -> bool: ...
    @property
    def manage_requested(self) -> bool: ...


# -- the set of pools, from below it ------------------------------------------------------------------

class SystemForWorkers(Protocol[_P_co]):
    """What a worker (and a rescuer) needs of the set of pools."""

    config: Config
    timing: bool

    @property
    def unbound_pool(self) -> _P_co: ...
    def bind_thread(self, pool: Placed) -> None: ...


class WatchdogForPools(Protocol[_P_contra]):
    """The watchdog as a pool sees it: a pool with pending works asks to be looked at."""

    def arm(self, pool: _P_contra) -> None: ...


class SystemForPools(Protocol[_P, _W_co]):
    """What a pool needs of the set of pools it belongs to."""

    config: Config
    threads_lock: Any  # a lock (cmwq_exec.core.lockdep.make_lock)
    nr_threads: int
    timing: bool
    usable: set[int]

    @property
    def watchdog(self) -> WatchdogForPools[_P]: ...
    @property
    def unbound_pool(self) -> _P: ...
    def bind_thread(self, pool: Placed) -> None: ...
    def adopt_idle_worker(self, pool: _P) -> _W_co | None: ...


class SystemForWatchdog(Protocol):
    """What the watchdog needs of the set of pools it watches."""

    config: Config
    usable: set[int]


class SystemForHotplug(Protocol[_P]):
    """What hotplug (the monitor, cpu_down/cpu_up, the trustee) needs of the set of pools."""

    config: Config
    lock: Any  # a lock (cmwq_exec.core.lockdep.make_lock)
    usable: set[int]
    cpu_pools: dict[int, _P]
    online_pools: list[_P]


# -- a pool, as its workers see it --------------------------------------------------------------------

class PoolForWorkers(PoolCounters, Protocol[_W_contra]):
    """What a worker (and a rescuer) needs of its pool (the worker sits below the pool)."""

    cpu: int | None
    name: str
    online: bool
    lock: Any  # a lock (cmwq_exec.core.lockdep.make_lock)
    worklist: deque[WorkItem]
    manage_requested: bool
    cm_wakeups: int
    nr_started: int
    nr_completed: int
    sleep_avg: float
    woke_at: float
    need_more_worker: Callable[[PoolCounters], bool]
    may_start_working: Callable[[PoolCounters], bool]
    keep_working: Callable[[PoolCounters], bool]
    need_to_create_worker: Callable[[PoolCounters], bool]
    need_to_manage_workers: Callable[[PoolCounters], bool]
    kernel_policy: bool  # the policy functions above are the kernel's (inlined on per-work paths)

    @property
    def system(self) -> SystemForWorkers[PoolForWorkers[_W_contra]]: ...
    @property
    def unlocked(self) -> AbstractContextManager[None]: ...
    def manage_workers(self, worker: _W_contra | None) -> bool: ...
    def wake_up_worker(self) -> bool: ...
    def pace_create_worker(self, delay: float = 0.0) -> None: ...
    def worker_set_flags(self, worker: _W_contra, flags: int, wakeup: bool) -> None: ...
    def worker_clr_flags(self, worker: _W_contra, flags: int) -> None: ...
    def worker_enter_idle(self, worker: _W_contra) -> None: ...
    def worker_leave_idle(self, worker: _W_contra) -> None: ...
    def worker_crashed(self, worker: _W_contra, exc: BaseException) -> None: ...


# -- workqueues and works, as the core below the workqueue sees them ----------------------------------

class SlotHolder(Protocol):
    """A worker as its work's workqueue sees it: whose running and active slots its work gave up."""

    sleeping_wq: WorkQueueOps | None
    waiting_wq: WorkQueueOps | None


class WorkQueueOps(Protocol):
    """What the core below a workqueue calls on it (``cmwq_exec.core.workqueue.WorkQueue``)."""

    name: str
    _max_active: int | None
    _max_running: int | None

    _lock: Any  # the workqueue's lock, which a work's own cancel takes

    def summon_rescuer(self, pool: Any) -> bool: ...  # noqa: ANN401  (a pool: P held)
    def _cancel_locked(self, work: Any) -> bool | None: ...  # noqa: ANN401  (a Work: W held)
    def _fire_delayed(self, work: Any, now: bool = ...) -> None: ...  # noqa: ANN401  (a DelayedWork)
    def _work_done(self) -> None: ...
    def _drop_in_flight(self, pwq: QueueState, color: int) -> None: ...
    def _work_sleeps(self, worker: SlotHolder) -> None: ...
    def _work_wakes(self, worker: SlotHolder) -> None: ...
    def _work_waits(self, worker: SlotHolder) -> None: ...
    def _work_stops_waiting(self, worker: SlotHolder) -> None: ...
    def _in_flight_counts(self) -> list[int]: ...


class QueueState(Protocol):
    """A workqueue's state on one pool (the kernel's ``cpu_workqueue_struct``): its counters."""

    in_flight: dict[int, int]  # flush color -> works queued here and not finished
    nr_started: int
    nr_completed: int
    nr_cm_wakeups: int
    nr_cpu_intensive: int
    nr_mayday: int
    nr_rescued: int

    @property
    def wq(self) -> WorkQueueOps: ...
    def observe(self, latency: float, execution: float, cpu: float) -> None: ...


class WorkItem(Protocol):
    """Anything a pool's worklist holds: a reusable :class:`~cmwq_exec.Work` or a submitted call.

    ``_pwq`` names its workqueue's state on the pool it was queued on; ``_color`` its flush color;
    ``_counted`` whether it holds one of its workqueue's max_active slots; ``_where`` where it sits
    while pending. ``_execute`` runs it and returns what it raised (already handled)."""

    _reusable: ClassVar[bool]
    _pwq: QueueState | None
    _color: int
    _queued_at: float
    _counted: bool
    _where: Where

    def _execute(self) -> BaseException | None: ...


class RunningWorker(Protocol):
    """The worker running a reusable work, as the work's queueing sees it."""

    scheduled: deque[WorkItem]

    @property
    def pool(self) -> object: ...


class ReusableWork(WorkItem, Protocol):
    """A :class:`~cmwq_exec.Work`: it has a pending bit and remembers the worker running it."""

    _worker: RunningWorker | None

    @property
    def _pending(self) -> PendingBit: ...


class PendingBit(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...
