"""A pool's trustee state: who governs a pool whose CPU went down (the kernel's ``trustee_state``).

The trustee itself is a thread (:class:`cmwq_exec.core.hotplug.Trustee`) that takes the pool's manager
role, drains its worklist with unbound workers and hands the pool back if the CPU returns. What the
pool keeps is the state it is in and the condition it waits on (``trustee_wait``): the pool's manager
path notifies it when the manager role comes free, its idle path when a rogue worker goes idle.

States, in order: START (the CPU went down, the thread is starting), IN_CHARGE (draining), BUTCHER
(drained: destroying workers as they go idle), RELEASE (the CPU came back: hand the pool back), DONE
(no trustee).
"""

from __future__ import annotations

import threading
from typing import Any

from .lockdep import assert_held

TRUSTEE_START = "START"
TRUSTEE_IN_CHARGE = "IN_CHARGE"
TRUSTEE_BUTCHER = "BUTCHER"
TRUSTEE_RELEASE = "RELEASE"
TRUSTEE_DONE = "DONE"


class TrusteeState:
    """The trustee's state of one pool (``pool.trustee``), with the condition its thread waits on."""

    __slots__ = ("cond", "state")

    def __init__(self, pool_lock: Any) -> None:
        self.state = TRUSTEE_DONE  # P
        self.cond = threading.Condition(pool_lock)  # I: trustee_wait, over the pool lock

    def manager_released(self) -> None:
        """The pool's manager role came free: a trustee waiting to claim it may go on. P: held."""
        assert_held(self.cond)
        if self.state != TRUSTEE_DONE:
            self.cond.notify_all()
