"""A cmwq_exec event plugin: structured logging of what the pools do.

Each event becomes one ``logging`` record on the logger ``cmwq_exec.events``
whose ``extra=`` fields say what happened: ``cmwq_event`` (the hook's name
without ``cmwq_``: ``worker_created``, ``worker_destroyed``,
``worker_adopted``, ``worker_create_failed``, ``manager_ran``, ``mayday``, ``work_rescued``,
``trustee_state``, ``cpu_intensive``, ``worker_blocked``, ``stall``) and the
details as ``cmwq_pool``, ``cmwq_worker``, ``cmwq_donor``, ``cmwq_workqueue``, ``cmwq_work``,
``cmwq_reason``, ``cmwq_state``, ``cmwq_created``, ``cmwq_destroyed``,
``cmwq_error``, ``cmwq_seconds``, ``cmwq_stacks`` as they apply.

Levels: worker life cycle and manager runs at DEBUG; mayday, rescues, trustee
states, CPU-intensive and blocked workers at INFO; failed worker creation and
stalls at WARNING.

``work_started`` / ``work_finished`` are deliberately not logged: they fire
once per work, on the hot path, and implementing them would make every work
pay for the plugin.

For JSON lines, attach :class:`JSONLinesFormatter` to a handler yourself, or
set ``CMWQ_EVENT_LOG`` to a file path (``-`` for stderr) before the plugin is
loaded, and it adds such a handler to ``cmwq_exec.events`` (at DEBUG).

Installed (``pip install plugins/cmwq_event_log``) the ``cmwq_exec`` entry
point registers this module; explicitly::

    from cmwq_exec import plugin
    import cmwq_event_log
    plugin.register(cmwq_event_log, name="event_log")
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import pluggy

try:
    from cmwq_exec.plugin import SettingError
except ImportError:  # pragma: no cover - without cmwq_exec nothing loads this module as a plugin
    SettingError = ValueError  # type: ignore[misc,assignment]

__all__ = ["JSONLinesFormatter", "LOGGER_NAME", "log"]

hookimpl = pluggy.HookimplMarker("cmwq_exec")

LOGGER_NAME = "cmwq_exec.events"
log = logging.getLogger(LOGGER_NAME)

_PREFIX = "cmwq_"


class JSONLinesFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message and the ``cmwq_*`` fields.

    The ``cmwq_`` prefix is dropped from field names (``cmwq_pool`` becomes ``pool``).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key.startswith(_PREFIX):
                entry[key[len(_PREFIX):]] = value
        return json.dumps(entry, default=str, sort_keys=True)


def _emit(level: int, event: str, message: str, **fields: Any) -> None:
    if not log.isEnabledFor(level):
        return
    extra = {_PREFIX + "event": event}
    extra.update((_PREFIX + key, value) for key, value in fields.items())
    log.log(level, message, extra=extra)


# -- naming the things involved (never takes a lock: event hooks run without the pool lock) -----


def _pool_name(pool: Any) -> str:
    name = getattr(pool, "name", None)
    if name:
        return str(name)
    cpu = getattr(pool, "cpu", None)
    return "unbound" if cpu is None else f"cpu{cpu}"


def _worker_name(worker: Any) -> str:
    name = getattr(worker, "name", None)
    if name:
        return str(name)
    thread = getattr(worker, "thread", None)
    if thread is not None:
        return str(thread.name)
    return repr(worker)


def _workqueue_name(workqueue: Any) -> str:
    return str(getattr(workqueue, "name", workqueue))


def _work_name(work: Any) -> str:
    if work is None:
        return "-"
    fn = getattr(work, "fn", None) or getattr(work, "func", None)
    if fn is not None:
        return getattr(fn, "__qualname__", None) or repr(fn)
    return repr(work)


# -- the hooks ----------------------------------------------------------------------------------


@hookimpl
def cmwq_worker_created(pool: Any, worker: Any) -> None:
    pool_name, worker_name = _pool_name(pool), _worker_name(worker)
    _emit(logging.DEBUG, "worker_created", f"{pool_name}: worker {worker_name} created",
          pool=pool_name, worker=worker_name)


@hookimpl
def cmwq_worker_destroyed(pool: Any, worker: Any, reason: str) -> None:
    pool_name, worker_name = _pool_name(pool), _worker_name(worker)
    _emit(logging.DEBUG, "worker_destroyed", f"{pool_name}: worker {worker_name} destroyed ({reason})",
          pool=pool_name, worker=worker_name, reason=reason)


@hookimpl
def cmwq_worker_adopted(pool: Any, worker: Any, donor: Any) -> None:
    pool_name, worker_name, donor_name = _pool_name(pool), _worker_name(worker), _pool_name(donor)
    _emit(logging.DEBUG, "worker_adopted", f"{pool_name}: worker {worker_name} adopted from {donor_name}",
          pool=pool_name, worker=worker_name, donor=donor_name)


@hookimpl
def cmwq_worker_create_failed(pool: Any, error: BaseException) -> None:
    pool_name = _pool_name(pool)
    _emit(logging.WARNING, "worker_create_failed", f"{pool_name}: creating a worker failed: {error!r}",
          pool=pool_name, error=repr(error))


@hookimpl
def cmwq_manager_ran(pool: Any, created: int, destroyed: int) -> None:
    pool_name = _pool_name(pool)
    _emit(logging.DEBUG, "manager_ran",
          f"{pool_name}: manager created {created} and destroyed {destroyed} workers",
          pool=pool_name, created=created, destroyed=destroyed)


@hookimpl
def cmwq_mayday(pool: Any, workqueue: Any) -> None:
    pool_name, wq_name = _pool_name(pool), _workqueue_name(workqueue)
    _emit(logging.INFO, "mayday", f"{pool_name}: mayday, summoning the rescuer of {wq_name}",
          pool=pool_name, workqueue=wq_name)


@hookimpl
def cmwq_work_rescued(pool: Any, workqueue: Any, work: Any) -> None:
    pool_name, wq_name, work_name = _pool_name(pool), _workqueue_name(workqueue), _work_name(work)
    _emit(logging.INFO, "work_rescued", f"{pool_name}: rescuer of {wq_name} ran {work_name}",
          pool=pool_name, workqueue=wq_name, work=work_name)


@hookimpl
def cmwq_trustee_state(pool: Any, state: str) -> None:
    pool_name = _pool_name(pool)
    _emit(logging.INFO, "trustee_state", f"{pool_name}: trustee {state}", pool=pool_name, state=state)


@hookimpl
def cmwq_cpu_intensive(pool: Any, worker: Any, work: Any) -> None:
    pool_name, worker_name, work_name = _pool_name(pool), _worker_name(worker), _work_name(work)
    _emit(logging.INFO, "cpu_intensive",
          f"{pool_name}: worker {worker_name} is CPU-intensive in {work_name}",
          pool=pool_name, worker=worker_name, work=work_name)


@hookimpl
def cmwq_worker_blocked(pool: Any, worker: Any, work: Any) -> None:
    pool_name, worker_name, work_name = _pool_name(pool), _worker_name(worker), _work_name(work)
    _emit(logging.INFO, "worker_blocked",
          f"{pool_name}: worker {worker_name} blocked in {work_name} without blocking()",
          pool=pool_name, worker=worker_name, work=work_name)


@hookimpl
def cmwq_stall(pool: Any, seconds: float, stacks: dict[int, str]) -> None:
    pool_name = _pool_name(pool)
    text = "\n".join(f"--- thread {tid} ---\n{stack}" for tid, stack in stacks.items())
    _emit(logging.WARNING, "stall", f"{pool_name}: no progress for {seconds:.1f}s\n{text}",
          pool=pool_name, seconds=seconds, stacks={str(tid): stack for tid, stack in stacks.items()})


def _configure_from_env() -> None:
    """Add a JSON-lines handler when ``CMWQ_EVENT_LOG`` names a file (``-``: stderr).

    A file that cannot be opened for appending is a ``cmwq_exec.plugin.SettingError``: raised while
    cmwq_exec loads this module, it stops the program instead of leaving it without the log asked for.
    """
    target = os.environ.get("CMWQ_EVENT_LOG")
    if not target:
        return
    handler: logging.Handler
    if target == "-":
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = logging.FileHandler(target, encoding="utf-8")
        except OSError as exc:
            raise SettingError(f"CMWQ_EVENT_LOG={target!r}: cannot append to that file: {exc}") from exc
    handler.setFormatter(JSONLinesFormatter())
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.DEBUG:
        log.setLevel(logging.DEBUG)


_configure_from_env()
