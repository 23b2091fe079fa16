"""The typed seams of the core: what pools, workers and rescuers need of the works they run and of
the workqueues those works belong to.

The modules that implement these sit above the ones that use them (a worker runs works of
workqueues that import the worker), so the users name the interface here and mypy checks the
implementations against it: :class:`WorkItem` is implemented by :class:`cmwq_exec.Work` and by
:class:`cmwq_exec.CMWQFuture` (a submitted call is its own one-shot work), :class:`QueueState` by
:class:`cmwq_exec.core.workqueue.PoolWorkqueue`, :class:`WorkQueueOps` by
:class:`cmwq_exec.WorkQueue`.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from .pending import Where


class SlotHolder(Protocol):
    """A worker as its work's workqueue sees it: whose running and active slots its work gave up."""

    sleeping_wq: WorkQueueOps | None
    waiting_wq: WorkQueueOps | None


class RescuerOps(Protocol):
    """A workqueue's rescuer as a pool that lacks workers sees it."""

    closing: bool

    # the pool's own interface lives above this module (cmwq_exec.core.worker.WorkerPool)
    def summon(self, pool: Any) -> None: ...  # noqa: ANN401
    def kick(self) -> None: ...


class WorkQueueOps(Protocol):
    """What the core below a workqueue calls on it (``cmwq_exec.core.workqueue.WorkQueue``)."""

    name: str
    _max_active: int | None
    _max_running: int | None

    @property
    def _rescuer(self) -> RescuerOps | None: ...
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
