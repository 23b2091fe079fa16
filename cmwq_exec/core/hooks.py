"""What the core calls out to: the policy functions in force, the event callers, start callbacks.

The core never imports pluggy. The plugin layer (:mod:`cmwq_exec.plugin`) fills these objects from
the registered plugins; until then they hold the kernel's formulas (:mod:`cmwq_exec.core.policy`)
and no event callers, so the hot path pays nothing for plugins nobody registered.

* :data:`current_policy`: one attribute per policy function, each ``f(pool) -> bool``, plus
  ``select_pool`` (None while no plugin chooses pools). Pools bind them (``read_policy``) and are
  told to bind again through :func:`on_policy_change`.
* :data:`events`: one attribute per event, ``None`` while nobody listens, else ``f(**kwargs)``;
  call sites test the attribute first.
* :func:`on_system_start`: callbacks run when the process's pools start (the plugin layer loads
  the entry-point plugins, blocking detection turns itself on when configured).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Optional

from . import policy

POLICY_NAMES = (
    "need_more_worker",
    "may_start_working",
    "keep_working",
    "need_to_create_worker",
    "need_to_manage_workers",
    "too_many_workers",
)
EVENT_NAMES = (
    "worker_created",
    "worker_destroyed",
    "worker_adopted",
    "worker_create_failed",
    "manager_ran",
    "mayday",
    "work_rescued",
    "trustee_state",
    "cpu_intensive",
    "worker_blocked",
    "stall",
    "work_started",
    "work_finished",
)

PolicyFunction = Callable[[policy.PoolCounters], bool]
EventCaller = Optional[Callable[..., None]]  # noqa: UP045 (a runtime alias on 3.10)


class Policy:
    """The policy functions in force: the kernel's formulas until a plugin answers one."""

    def __init__(self) -> None:
        self.need_more_worker: PolicyFunction = policy.need_more_worker
        self.may_start_working: PolicyFunction = policy.may_start_working
        self.keep_working: PolicyFunction = policy.keep_working
        self.need_to_create_worker: PolicyFunction = policy.need_to_create_worker
        self.need_to_manage_workers: PolicyFunction = policy.need_to_manage_workers
        self.too_many_workers: PolicyFunction = policy.too_many_workers
        self.select_pool: Callable[..., Any] | None = None


class Events:
    """One attribute per event: ``None`` while unimplemented, else ``f(**kwargs)``."""

    def __init__(self) -> None:
        self.worker_created: EventCaller = None
        self.worker_destroyed: EventCaller = None
        self.worker_adopted: EventCaller = None
        self.worker_create_failed: EventCaller = None
        self.manager_ran: EventCaller = None
        self.mayday: EventCaller = None
        self.work_rescued: EventCaller = None
        self.trustee_state: EventCaller = None
        self.cpu_intensive: EventCaller = None
        self.worker_blocked: EventCaller = None
        self.stall: EventCaller = None
        self.work_started: EventCaller = None
        self.work_finished: EventCaller = None


current_policy = Policy()
events = Events()
_policy_listeners: list[weakref.WeakMethod[Callable[[], None]]] = []
_start_callbacks: list[Callable[[Any], object]] = []


def on_policy_change(listener: Callable[[], None]) -> None:
    """Call the bound method ``listener`` whenever the policy in force changes (held weakly: a
    replaced System stops listening when it is gone)."""
    _policy_listeners.append(weakref.WeakMethod(listener))


def policy_changed() -> None:
    """The plugin layer changed :data:`current_policy`: every live listener rebinds."""
    alive = []
    for ref in list(_policy_listeners):
        listener = ref()
        if listener is not None:
            alive.append(ref)
            listener()
    _policy_listeners[:] = alive


def on_system_start(callback: Callable[[Any], object]) -> None:
    """Run ``callback(config)`` each time the process's pools start."""
    _start_callbacks.append(callback)


def system_starting(config: Any) -> None:
    for callback in list(_start_callbacks):
        callback(config)
