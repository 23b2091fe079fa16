"""The tasks a child process of the Celery supervisor has started and not finished: its ledger.

When a child dies (``kill -9``, the OOM killer, a crash in C code) the tasks it was running die
with it. Without ``acks_late`` their messages were acknowledged when they started, so the broker
will not deliver them again, and unless someone records an outcome their results stay PENDING for
ever. Prefork's parent records FAILURE ``WorkerLostError('Worker exited prematurely: signal 9
(SIGKILL) Job: N.')`` for the job of a child that died; with this module the supervisor of
:mod:`cmwq_exec.celery_processes` does the same for every task the dead child had started.

The ledger file
    Each child appends one line per event to a file in the supervisor's status directory: ``+``
    and a JSON record when the pool starts a task, ``-`` and the JSON task id when the task's call
    has returned (its outcome is in the result backend then: Celery's tracer stores it on the
    task's thread). The start is written *before* the pool hands Celery the accept that acks the
    message: a child killed after the ack has the task in its ledger. (Celery's ``task_prerun``
    would be too late: the accept runs on the consumer's thread at the same time as the tracer,
    and a kill between the ack and the prerun signal would lose the task, PENDING for ever.)

    Why a file of appended lines: each line is one ``os.write`` on a descriptor opened with
    ``O_APPEND``. A signal, SIGKILL included, ends a process between system calls, and what a
    finished write put in the page cache outlives the process: so a child killed at any moment has
    written each line whole or not at all, and the supervisor reads exactly the tasks started and
    not finished. It costs one system call per start and one per end, ~15-20 us per task with the
    record's encoding (against ~700 us of Celery's own CPU per task), and nothing in the supervisor
    until a child dies. A pipe would be as robust but must be drained all the time: a busy
    supervisor would block its children's tasks once the pipe is full. Task events sent over the
    broker would be lost with the connection.

    The file stays small: once it passes :data:`COMPACT_AT` bytes, the child writes the tasks still
    running to a new file and renames it over the ledger (a rename is atomic: a reader sees the old
    file or the new one). Appends and the compaction share one lock, so no event falls between the
    snapshot and the rename.

What is recorded
    Tasks with ``acks_late`` are not: their messages are not acknowledged until they end, so when
    the child's broker connection dies with it the broker delivers them again (RabbitMQ at once,
    Redis after its ``visibility_timeout``) and another child runs them. Prefork marks them failed
    instead unless ``reject_on_worker_lost`` is set, because its parent holds the message and can
    acknowledge it; the supervisor holds no message, so marking them failed would only be
    overwritten by the redelivered run. Eager calls (``task.apply`` inside a task) never reach the
    pool: they run inside a recorded task.

    A record holds what the result backend needs to report the failure as the worker would: the
    task's id and name, whether errors are stored (``ignore_result`` and
    ``store_errors_even_if_ignored``), and the request fields that chords, chains, errbacks and the
    ``rpc://`` backend read. Not the arguments (they can be large, and need not be JSON): a backend
    with ``result_extended`` stores the failure without them, and ``retry_on_worker_lost`` (which
    sends the task again from its request) is not applied: the failure is recorded.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from celery import states
from celery.exceptions import WorkerLostError

__all__ = ["COMPACT_AT", "Ledger", "keep_ledger", "lost_error", "read_ledger", "report_lost",
           "request_record"]

log = logging.getLogger("cmwq_exec.celery")

#: the ledger is rewritten with only the running tasks once it is this large (arbitrary: small
#: enough to read at once, large enough that rewrites are rare: one per ~10,000 tasks)
COMPACT_AT = 1 << 20

#: request fields a record keeps: what ``backend.mark_as_failure`` and what it calls read
_CONTEXT_FIELDS = ("root_id", "parent_id", "group", "group_index", "chord", "chain", "errbacks",
                   "retries", "reply_to", "correlation_id", "hostname", "delivery_info")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Ledger:
    """A child's side: appends start and end lines to ``path`` (see the module doc).

    Fields: ``I:`` set in ``__init__``; ``L:`` under ``_lock``."""

    def __init__(self, path: str) -> None:
        self.path = path  # I
        self._lock = threading.Lock()
        self._running: dict[str, bytes] = {}  # L: task id -> its start line
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                           0o600)  # L
        self._size = 0  # L: bytes in the file
        self._broken = False  # L: a write failed: said once, then the ledger stops

    def started(self, task_id: str, record: bytes) -> None:
        """``record``: the task's JSON object (:func:`task_record`)."""
        line = b"+" + record + b"\n"
        with self._lock:
            self._running[task_id] = line
            self._append(line)

    def start(self, request: Any) -> str | None:
        """The pool starts the task of Celery's worker ``request``: record it (unless it is not
        to be kept: :func:`request_record`); returns the id to pass to :meth:`finished`, or None.
        Never raises: the pool calls it between a job's start and its accept."""
        try:
            record = request_record(request)
        except Exception:  # noqa: BLE001 - not Celery's Request after all: run it unrecorded
            log.exception("cmwq_exec: cannot record the start of %r in the ledger", request)
            return None
        if record is None:
            return None
        self.started(request.id, record)
        return str(request.id)

    def finished(self, task_id: str) -> None:
        with self._lock:
            if self._running.pop(task_id, None) is None:
                return
            self._append(b"-" + json.dumps(task_id).encode() + b"\n")
            if self._size >= COMPACT_AT:
                self._compact()

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def _append(self, line: bytes) -> None:
        if self._broken:
            return
        try:
            _write_all(self._fd, line)
        except OSError as exc:
            self._fail(exc)
            return
        self._size += len(line)

    def _compact(self) -> None:
        tmp = f"{self.path}.new"
        data = b"".join(self._running.values())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                os.replace(tmp, self.path)
            except OSError:
                os.close(fd)
                raise
        except OSError as exc:
            self._fail(exc)
            return
        os.close(self._fd)
        self._fd, self._size = fd, len(data)

    def _fail(self, exc: OSError) -> None:
        self._broken = True
        log.error("cmwq_exec: cannot write the ledger of started tasks %s (%s): if this child dies, "
                  "the tasks it ran are not reported failed", self.path, exc)


def request_record(request: Any) -> bytes | None:
    """What the ledger keeps of the task of Celery's worker ``Request`` (the one a job's accept
    callback is bound to), as a JSON object, or None if it is not to be kept (``acks_late``)."""
    task = request.task
    if getattr(task, "acks_late", False):
        return None
    task_id, name = request.id, task.name
    ignored = bool(getattr(task, "ignore_result", False) or request.ignore_result)
    store = not ignored or bool(getattr(task, "store_errors_even_if_ignored", False))
    record: dict[str, Any] = {"id": task_id, "task": name, "store": store}
    headers = request.request_dict
    try:
        _, _, embed = request._payload  # chord, chain, errbacks: in the message body
    except (TypeError, ValueError):
        embed = None
    for field in _CONTEXT_FIELDS:
        value = headers.get(field)
        if value is None and isinstance(embed, dict):
            value = embed.get(field)
        if value is not None:
            record[field] = value
    try:
        return json.dumps(record, separators=(",", ":")).encode()
    except (TypeError, ValueError):  # a field that is not JSON (a pickled canvas): report without them
        return json.dumps({"id": task_id, "task": name, "store": store}).encode()


def keep_ledger(path: str) -> Ledger:
    """In a child, before its consumer starts: the ledger the pool writes each task's start and
    end to (:meth:`Ledger.started` with :func:`request_record`, :meth:`Ledger.finished`)."""
    return Ledger(path)


# -- the supervisor's side -------------------------------------------------------------------------


def read_ledger(path: str) -> list[dict[str, Any]]:
    """The records of the tasks started and not finished in the ledger ``path`` (none if there is
    no file), in the order they started. A line that is not whole is skipped."""
    try:
        with open(path, "rb") as ledger:
            data = ledger.read()
    except FileNotFoundError:
        return []
    running: dict[str, dict[str, Any]] = {}
    for line in data.split(b"\n"):
        try:
            value = json.loads(line[1:])
        except ValueError:
            continue
        if line[:1] == b"+" and isinstance(value, dict) and isinstance(value.get("id"), str):
            running[value["id"]] = value
        elif line[:1] == b"-" and isinstance(value, str):
            running.pop(value, None)
    return list(running.values())


def lost_error(exitcode: int, who: str) -> WorkerLostError:
    """The error of a task whose child process ended with ``exitcode`` (Popen's: -N for signal N),
    worded as prefork's (billiard's ``Worker exited prematurely: signal 9 (SIGKILL) Job: N.``)."""
    from billiard.common import human_status

    return WorkerLostError(f"Worker exited prematurely: {human_status(exitcode)} Child: {who}.")


def report_lost(app: Any, records: list[dict[str, Any]], exc: BaseException) -> int:
    """Record FAILURE ``exc`` for each task of ``records`` (from :func:`read_ledger`) in its result
    backend, as prefork's ``Request.on_failure`` does for a lost worker (chords, chains and
    errbacks hear of it too), unless the task already stored an outcome (it finished and the child
    died before its end was written). Returns how many were marked."""
    from celery.app.task import Context

    marked = 0
    for record in records:
        task_id, name = record["id"], str(record.get("task"))
        task = app.tasks.get(name)
        backend = task.backend if task is not None else app.backend
        try:
            if record.get("store", True) and _has_outcome(backend, task_id):
                continue
            request = Context({field: record.get(field) for field in _CONTEXT_FIELDS}, id=task_id,
                              task=name, ignore_result=not record.get("store", True))
            backend.mark_as_failure(task_id, exc, request=request, store_result=record.get("store", True))
        except Exception:  # noqa: BLE001 - one task's backend trouble must not hide the others
            log.exception("cmwq_exec: cannot record the failure of task %s[%s]", name, task_id)
            continue
        marked += 1
        log.error("cmwq_exec: task %s[%s] raised unexpected: %r", name, task_id, exc)
    return marked


def _has_outcome(backend: Any, task_id: str) -> bool:
    as_uri = getattr(backend, "as_uri", None)
    if callable(as_uri) and as_uri() == "rpc://":
        return False  # its results live on the caller's queue: a lookup here would consume them
    return backend.get_state(task_id) in states.READY_STATES
