"""The plugin manager: pluggy for the project ``cmwq_exec``.

Policy hooks are resolved into one plain callable per hook (:class:`Policy`) that every pool calls on
its hot path: while only the kernel's formulas are registered that callable *is* the formula, so
plugins cost nothing until one is registered. Event hooks are exposed as :data:`events`, whose
attribute of the same name is ``None`` while no plugin implements the hook; call sites test it first.

A hook implementation that raises (any ``BaseException``: ``KeyboardInterrupt`` and ``SystemExit``
too, which would otherwise end the worker thread that called it) is logged once (with its plugin's
name) and skipped: for a policy hook the next answer, in the end the kernel's, is used.

Entry-point plugins are loaded one by one: one that fails to import or to register is logged, named
by distribution and entry point, and skipped; the others load. One that finds its own setting
invalid raises :class:`SettingError` (the core's, re-exported here for plugins), which stops the
program as a bad core setting does.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Callable
from typing import Any

import pluggy

from . import hookspecs
from .core import hooks, policy
from .core.config import SettingError
from .core.lockdep import make_lock
from .core.policy import PoolCounters
from .hookspecs import hookimpl

log = logging.getLogger("cmwq_exec.plugin")

POLICY_HOOKS = hooks.POLICY_NAMES
EVENT_HOOKS = hooks.EVENT_NAMES

_lock = make_lock("plugin")
_reported: set[tuple[str, str]] = set()
_pm: pluggy.PluginManager | None = None
DEFAULT_POLICY = "cmwq_exec.default_policy"

#: The objects this layer fills (the core reads them).
current_policy = hooks.current_policy
events = hooks.events


class DefaultPolicy:
    """The kernel's formulas (:mod:`cmwq_exec.core.policy`) as the pluggy plugin that answers every
    policy hook last. While it is the only one answering a hook, pools call the formula directly:
    the same answer, without a plugin call on the hot path."""

    @hookimpl(trylast=True)
    def cmwq_need_more_worker(self, pool: PoolCounters) -> bool:
        return policy.need_more_worker(pool)

    @hookimpl(trylast=True)
    def cmwq_may_start_working(self, pool: PoolCounters) -> bool:
        return policy.may_start_working(pool)

    @hookimpl(trylast=True)
    def cmwq_keep_working(self, pool: PoolCounters) -> bool:
        return policy.keep_working(pool)

    @hookimpl(trylast=True)
    def cmwq_need_to_create_worker(self, pool: PoolCounters) -> bool:
        return policy.need_to_create_worker(pool)

    @hookimpl(trylast=True)
    def cmwq_need_to_manage_workers(self, pool: PoolCounters) -> bool:
        return policy.need_to_manage_workers(pool)

    @hookimpl(trylast=True)
    def cmwq_too_many_workers(self, pool: PoolCounters) -> bool:
        return policy.too_many_workers(pool)


def _report(plugin_name: str, hook: str, exc: BaseException) -> None:
    key = (plugin_name, hook)
    if key in _reported:
        return
    _reported.add(key)
    log.error("cmwq_exec plugin %r raised in %s; using the next answer", plugin_name, hook,
              exc_info=exc)


def _impls(pm: pluggy.PluginManager, hook: str) -> list[tuple[str, Callable[..., Any]]]:
    caller = getattr(pm.hook, hook)
    # pluggy calls the last registered first; tryfirst/trylast already ordered in this list.
    return [(impl.plugin_name, impl.function) for impl in reversed(caller.get_hookimpls())]


def _policy_caller(name: str, impls: list[tuple[str, Callable[..., Any]]],
                   default: Callable[[Any], bool]) -> Callable[[Any], bool]:
    hook = "cmwq_" + name

    def call(pool: Any) -> bool:
        for plugin_name, fn in impls:
            try:
                answer = fn(pool=pool)
            except BaseException as exc:  # a plugin never wedges a pool
                _report(plugin_name, hook, exc)
                continue
            if answer is not None:
                return bool(answer)
        return default(pool)

    call.__name__ = name
    return call


def _event_caller(hook: str, impls: list[tuple[str, Callable[..., Any]]]) -> Callable[..., None]:
    def call(**kwargs: Any) -> None:
        for plugin_name, fn in impls:
            try:
                fn(**kwargs)
            except BaseException as exc:  # nor kills the worker thread that reports the event
                _report(plugin_name, hook, exc)

    call.__name__ = hook
    return call


def _select_caller(impls: list[tuple[str, Callable[..., Any]]]) -> Callable[..., Any]:
    def call(workqueue: Any, pools: list[Any], current_pool: Any) -> Any:
        for plugin_name, fn in impls:
            try:
                answer = fn(workqueue=workqueue, pools=pools, current_pool=current_pool)
            except BaseException as exc:
                _report(plugin_name, "cmwq_select_pool", exc)
                continue
            if answer is not None:
                if answer in pools:
                    return answer
                _report(plugin_name, "cmwq_select_pool",
                        ValueError(f"returned {answer!r}, which is not one of the online pools"))
        return current_pool

    return call


def _rebuild() -> None:
    """Recompute :data:`current_policy` and :data:`events` from what is registered."""
    pm = get_plugin_manager()
    for name in POLICY_HOOKS:
        formula = getattr(policy, name)
        impls = _impls(pm, "cmwq_" + name)
        only_default = all(plugin_name == DEFAULT_POLICY for plugin_name, _ in impls)
        setattr(current_policy, name, formula if only_default else _policy_caller(name, impls, formula))
    select = _impls(pm, "cmwq_select_pool")
    current_policy.select_pool = _select_caller(select) if select else None
    for name in EVENT_HOOKS:
        impls = _impls(pm, "cmwq_" + name)
        setattr(events, name, _event_caller("cmwq_" + name, impls) if impls else None)
    hooks.policy_changed()


def _after_fork_in_child() -> None:
    global _lock
    _lock = make_lock("plugin")  # a parent thread may have held it at fork time


os.register_at_fork(after_in_child=_after_fork_in_child)


def get_plugin_manager() -> pluggy.PluginManager:
    """The project's plugin manager, created on first use with the default policy registered and
    the ``cmwq_exec`` entry points loaded (unless ``CMWQ_EXEC_DISABLE_PLUGIN_AUTOLOAD`` is set)."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager("cmwq_exec")
            pm.add_hookspecs(hookspecs)
            pm.register(DefaultPolicy(), name=DEFAULT_POLICY)
            if not os.environ.get("CMWQ_EXEC_DISABLE_PLUGIN_AUTOLOAD"):
                _load_entry_points(pm)  # a SettingError leaves _pm unset: the next use fails alike
            _pm = pm
            created = True
        else:
            created = False
    if created:
        _rebuild()
    return _pm


ENTRY_POINT_GROUP = "cmwq_exec"


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register the plugin of each ``cmwq_exec`` entry point, one by one (pluggy's
    ``load_setuptools_entrypoints`` stops at the first that fails, and says neither which nor that
    the others were skipped). A plugin that raises :class:`SettingError` while it loads stops the
    program: its operator asked for something it cannot do."""
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(entry_point.name) or pm.is_blocked(entry_point.name):
            continue
        try:
            pm.register(entry_point.load(), name=entry_point.name)
        except SettingError:
            raise
        except Exception as exc:
            dist = entry_point.dist
            where = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
            log.error("cmwq_exec plugin %r (entry point %s = %s, distribution %s) failed to load and "
                      "is skipped: %s: %s", entry_point.name, entry_point.name, entry_point.value, where,
                      type(exc).__name__, exc, exc_info=exc)


def register(plugin: object, name: str | None = None) -> str:
    """Register ``plugin`` (an object or module with ``@hookimpl`` functions); returns its name."""
    pm = get_plugin_manager()
    registered = pm.register(plugin, name=name)
    if registered is None:
        raise ValueError(f"plugin {name or plugin!r} is blocked or already registered")
    _rebuild()
    return registered


def unregister(plugin: object | None = None, name: str | None = None) -> None:
    """Unregister a plugin given by object or by name."""
    pm = get_plugin_manager()
    pm.unregister(plugin, name=name)
    _rebuild()


# the process's pools load the entry-point plugins when they start
hooks.on_system_start(lambda config: get_plugin_manager())
