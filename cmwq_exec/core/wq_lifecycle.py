"""A workqueue's life: its rescuer, destruction, the pools' shutdown, interpreter exit and fork.

This module owns the rescuer's creation and stopping (the rescuer itself is
:class:`cmwq_exec.core.worker.Rescuer`), ``destroy``, ``close`` (the rescuer goes once the works
in flight are done), the pools' shutdown of a workqueue, the registry of every workqueue
(:data:`all_workqueues`), the flush of all of them at interpreter exit, and their fresh start in a
forked child.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from typing import TYPE_CHECKING

from . import pool as _pool
from . import system as _system
from .lockdep import assert_held, make_lock
from .worker import Rescuer
from .wq_cancel import DelayedAndCancel
from .wq_state import WQ, PoolWorkqueue

if TYPE_CHECKING:
    from .pool import WorkerPool


class Lifecycle(DelayedAndCancel):
    """A workqueue's rescuer, destruction and fresh start after fork."""

    def _make_rescuer(self) -> None:
        """The rescuer, if the flags ask for one: reserved up front, as in the kernel (a workqueue
        whose rescuer cannot start is not made, RuntimeError)."""
        self._rescuer = Rescuer(self, self._system) if self.flags & WQ.RESCUER else None
        if self._rescuer is not None:
            weakref.finalize(self, self._rescuer.stop)  # nobody can queue on it any more

    def destroy(self) -> None:
        """Drain, stop the rescuer, and refuse works from now on."""
        self.drain()
        self._destroyed = True
        if self._rescuer is not None:
            self._rescuer.stop()
        self._system.remove_workqueue(self)

    def close(self) -> None:
        """Refuse nothing, but let the rescuer go once the works in flight are done (an executor
        shut down without waiting, or dropped)."""
        rescuer = self._rescuer
        if rescuer is not None:
            rescuer.close()

    def stop_rescuer(self) -> None:
        """Stop the rescuer now, if there is one (an executor shut down after its calls were done)."""
        if self._rescuer is not None:
            self._rescuer.stop()

    def summon_rescuer(self, pool: WorkerPool) -> bool:
        """Mayday from ``pool`` (P: held): summon this workqueue's rescuer there. False if the
        workqueue has no rescuer."""
        assert_held(pool.lock)
        rescuer = self._rescuer
        if rescuer is None:
            return False
        rescuer.summon(pool)
        return True

    def shutdown(self, wait: bool) -> threading.Thread | None:
        """The pools shut down (System.shutdown): with ``wait``, flush first unless destroyed; then
        refuse works and stop the rescuer. Returns the rescuer's thread (to join), or None."""
        if wait and not self._destroyed:
            self.flush()
        self._destroyed = True
        rescuer = self._rescuer
        if rescuer is None:
            return None
        rescuer.stop()
        return rescuer.thread

    def _reset_after_fork(self) -> None:
        """In a forked child: the parent's threads are gone; start afresh on the child's pools."""
        self._lock = make_lock("workqueue")
        self._flush_lock = make_lock("flush")
        self._flush_cond = threading.Condition(self._flush_lock)
        self._nr_active = 0
        self._nr_sleeping = 0
        self._nr_waiting = 0
        self._inactive = deque()
        self._nr_flushers = 0
        self._draining = 0
        self._system = system = _system.get_system()
        self._pwqs = [PoolWorkqueue(self, pool) for pool in system.pools]
        self._make_rescuer()
        system.add_workqueue(self)


#: Every workqueue ever created, so a forked child can start them afresh.
all_workqueues: weakref.WeakSet[Lifecycle] = weakref.WeakSet()


def flush_all() -> None:
    """Interpreter exit: wait for every work queued on any workqueue so far, on the workers there
    are (no new thread can be started now)."""
    _pool.interpreter_exiting()
    for wq in list(all_workqueues):
        if not wq._destroyed and wq.flush_at_exit:
            wq.flush()


def _after_fork_in_child() -> None:
    # Registered after system.py's own hook (this module imports it), so the child's fresh
    # system is there to start on.
    for wq in list(all_workqueues):
        wq._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
