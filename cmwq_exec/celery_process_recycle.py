"""Recycling a child of the Celery supervisor (:mod:`cmwq_exec.celery_processes`).

prefork replaces a child process after ``--max-tasks-per-child`` tasks, or after a task that left
it above ``--max-memory-per-child`` KiB, and kills a child whose task passed its hard time limit.
In processes mode each child is a whole worker node, so the same limits recycle a child, and a
task that will not die is contained by recycling its child. Both halves live here: what a child
checks and asks for, and how the supervisor hands the child's CPU over to its replacement.

What a child checks (:class:`ChildLimits`, installed by ``become_child``)
    * after each task (``task_postrun``, on the task's thread): the tasks it has finished against
      ``worker_max_tasks_per_child`` / ``--max-tasks-per-child``, and its resident set size
      against ``worker_max_memory_per_child`` / ``--max-memory-per-child``, measured as prefork
      measures it (:func:`billiard.compat.mem_rss`, KiB: psutil's RSS when psutil is installed,
      the peak RSS from ``getrusage`` otherwise). The limits are the worker's own (Celery reads
      the setting or the option), read when the child's consumer is ready;
    * every :data:`LOOK` seconds: the tasks its pool *abandoned* (their thread survived the unwind
      of a hard time limit or of ``revoke(terminate=True)``: :mod:`cmwq_exec.celery_jobs`). One
      still running ``cmwq_abandon_grace`` / ``CMWQ_ABANDON_GRACE`` seconds (default
      :data:`ABANDON_GRACE`) after it was first seen abandoned gets its child recycled. Its outcome
      was stored when it was unwound (FAILURE ``TimeLimitExceeded``, or REVOKED), as prefork
      stores a task whose child it killed; the thread ends with its child's process.

    The first limit passed makes the child ask once: it writes why into its ``.recycle`` file.

The handover (the supervisor's half: :class:`Handover`)
    1. the supervisor sees the request and starts the replacement first: same index, CPU and node
       name, told to *hold* (``CMWQ_CHILD_HOLD``). The old child goes on consuming meanwhile, so
       the CPU is not left without a consumer while the new interpreter starts and imports the app;
    2. the replacement, once its pool starts (before its consumer connects), says it is ready
       (``.ready``) and holds until it is let go (``.go``);
    3. the supervisor stops the old child warm (SIGTERM, to it alone): its consumer is cancelled,
       its unstarted tasks go back to the broker unacked, its started tasks finish;
    4. once the old child's consumer has stopped (it writes ``.released``) or its process is gone,
       the supervisor lets the replacement go: it connects and consumes;
    5. the old child exits when its started tasks are done (abandoned threads are not waited for)
       and sends ``worker_process_shutdown``; a recycled child that dies instead has its ledger's
       tasks recorded as lost, as any dead child's.

    Why the replacement holds: it has the old child's node name, and two consumers of one name at
    once confuse Celery. On RabbitMQ both would consume from the one ``{name}.celery.pidbox``
    queue, so a broadcast (a revoke) would reach only one of them; ``inspect`` would get two
    replies from one name. A distinct name per generation would avoid that but would change the
    node a user addresses (``-d celery.0@host``) each time a child is recycled, and leave monitors
    with a trail of departed nodes. So the name stays and the two consumers never overlap: the
    CPU's consumer pauses from the old consumer's cancel to the new one's start (its connection
    and mingle, about a second; ``--without-mingle`` shortens it), while the other children go on
    consuming and the old child's started tasks go on running. If the old child has not stopped
    its consumer :data:`RELEASE_WAIT` seconds after the SIGTERM, the replacement is let go anyway.

Signals: each child sends ``worker_process_init`` before its first task (its pool's start) and
``worker_process_shutdown`` (``pid``, ``exitcode``) when its worker has stopped, as prefork sends
them in each child process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any

from billiard.compat import mem_rss
from celery import bootsteps, signals
from celery.exceptions import ImproperlyConfigured
from celery.worker import state as _worker_state

__all__ = ["ABANDON_GRACE", "ChildLimits", "Handover", "abandon_grace", "check_limits", "hold"]

log = logging.getLogger("cmwq_exec.celery")

#: environment of a child: the prefix of its recycling files; set (to 1) in a replacement that holds
CHILD_FILES, CHILD_HOLD = "CMWQ_CHILD_FILES", "CMWQ_CHILD_HOLD"
#: the files: the child's request (why), its consumer stopped, a replacement ready, let go
RECYCLE, RELEASED, READY, GO = ".recycle", ".released", ".ready", ".go"

#: default seconds an abandoned task may run before its child is recycled: time for a ``finally``
#: to clean up after a swallowed unwind (arbitrary; prefork kills at once)
ABANDON_GRACE = 10.0
#: how often a child looks at its abandoned tasks; once it asked, how often it looks at its consumer
LOOK, LOOK_STOPPING = 0.25, 0.02
#: how often a holding replacement looks for its go
HOLD_LOOK = 0.02
#: seconds after the old child's SIGTERM its replacement holds at most (arbitrary: a consumer stops
#: within a second; one that does not is wedged, and the CPU must not stay without a consumer)
RELEASE_WAIT = 30.0

_GRACE_ALLOWED = "a number of seconds >= 0 (0: recycle as soon as a task is abandoned)"


def abandon_grace(conf: Any, environ: Mapping[str, str] = os.environ) -> float:
    """``cmwq_abandon_grace`` (the app's setting, which wins) or ``CMWQ_ABANDON_GRACE``, in seconds;
    :data:`ABANDON_GRACE` if neither is set. Raises ImproperlyConfigured naming the setting or
    variable, the value and what is allowed."""
    value = conf.get("cmwq_abandon_grace") if conf is not None else None
    where = "the cmwq_abandon_grace setting"
    if value is None:
        value, where = environ.get("CMWQ_ABANDON_GRACE"), "the environment variable CMWQ_ABANDON_GRACE"
        if value is None or str(value).strip() == "":
            return ABANDON_GRACE
    if isinstance(value, bool):
        raise ImproperlyConfigured(f"{where} is {value!r}: use {_GRACE_ALLOWED}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{where} is {value!r}: use {_GRACE_ALLOWED}") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ImproperlyConfigured(f"{where} is {value!r}: use {_GRACE_ALLOWED}")
    return seconds


def check_limits(conf: Any) -> None:
    """Raise ImproperlyConfigured for a ``worker_max_tasks_per_child`` or
    ``worker_max_memory_per_child`` setting that is not a whole number >= 0 (0 or unset: no
    limit), or a bad abandon grace. The supervisor checks before it starts a child."""
    for name in ("worker_max_tasks_per_child", "worker_max_memory_per_child"):
        value = conf.get(name) if conf is not None else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ImproperlyConfigured(f"the {name} setting is {value!r}: use a whole number >= 0 "
                                       "(0 or None: no limit)")
    abandon_grace(conf)


def _limit(value: Any) -> int | None:
    """A worker's max-tasks / max-memory per child as a positive int, or None (no limit)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def _touch(path: str, text: str = "") -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        out.write(text)
    os.replace(tmp, path)


# -- a child's side -----------------------------------------------------------------------------------


class ChildLimits:
    """What one child checks to ask for its recycling (see the module doc).

    Fields: ``I:`` set at creation; ``R:`` set once, on the consumer's thread, when it is ready;
    ``L:`` under ``_lock``; ``M:`` the looking thread's."""

    def __init__(self, files: str) -> None:
        self.files = files  # I: the prefix of this process's recycling files
        self._lock = threading.Lock()
        self.completed = 0  # L: tasks finished
        self.reason: str | None = None  # L: why it asked (it asks once)
        self.max_tasks: int | None = None  # R
        self.max_memory: int | None = None  # R: KiB
        self.grace = ABANDON_GRACE  # R
        self.consumer: Any = None  # R
        self.hostname: str | None = None  # R
        self._seen: dict[int, float] = {}  # M: abandoned job id -> when it was first seen
        self._released = False  # M

    def connect(self) -> None:
        """Hear the worker's signals (strong references: this object lives as long as the process)."""
        signals.worker_ready.connect(self.on_ready, weak=False)
        signals.task_postrun.connect(self.after_task, weak=False)
        signals.worker_shutdown.connect(self.on_shutdown, weak=False)

    def on_ready(self, sender: Any = None, **_: Any) -> None:
        """The consumer is ready (its thread): read the worker's limits, start looking."""
        consumer = sender
        controller = getattr(consumer, "controller", None)
        self.max_tasks = _limit(getattr(controller, "max_tasks_per_child", None))
        self.max_memory = _limit(getattr(controller, "max_memory_per_child", None))
        self.hostname = getattr(consumer, "hostname", None)
        try:
            self.grace = abandon_grace(consumer.app.conf)
        except ImproperlyConfigured as exc:  # the supervisor checked it already: not expected here
            log.error("cmwq_exec: %s; using %s s", exc, ABANDON_GRACE)
        first = self.consumer is None
        self.consumer = consumer
        if first:  # (ready again after a reconnect: the same thread goes on looking)
            threading.Thread(target=self._look, name="cmwq-recycle", daemon=True).start()
        self._check_tasks()

    def after_task(self, **_: Any) -> None:
        """A task finished (its thread): count it, then measure as prefork does after a task."""
        with self._lock:
            self.completed += 1
        self._check_tasks()
        if self.max_memory is not None and self.reason is None:
            used = mem_rss()
            if used > self.max_memory:
                self.ask(f"its memory ({used} KiB) passed --max-memory-per-child ({self.max_memory} KiB)")

    def _check_tasks(self) -> None:
        if self.max_tasks is not None and self.completed >= self.max_tasks and self.reason is None:
            self.ask(f"it ran {self.completed} tasks (--max-tasks-per-child {self.max_tasks})")

    def ask(self, reason: str) -> None:
        """Ask the supervisor for a replacement, once."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        log.info("cmwq_exec: child %s asks to be replaced: %s", self.hostname, reason)
        try:
            _touch(self.files + RECYCLE, reason)
        except OSError as exc:
            log.error("cmwq_exec: child %s cannot ask to be replaced (%s): %s", self.hostname, exc, reason)

    def _look(self) -> None:
        """The looking thread: abandoned tasks past the grace; once asked, the consumer's stop."""
        while not self._released:
            if self.reason is None:
                self._check_abandoned(time.monotonic())
            elif self.consumer_stopped():
                self._released = True
                try:
                    _touch(self.files + RELEASED)
                except OSError:
                    log.debug("cmwq_exec: cannot write %s", self.files + RELEASED, exc_info=True)
            time.sleep(LOOK if self.reason is None else LOOK_STOPPING)

    def _check_abandoned(self, now: float) -> None:
        pool = getattr(self.consumer, "pool", None)
        listing = getattr(pool, "abandoned_active", None)
        entries = listing() if listing is not None else []
        current = {entry.get("worker_pid"): entry for entry in entries}
        self._seen = {job: self._seen.get(job, now) for job in current}
        for job, since in self._seen.items():
            if now - since >= self.grace:
                entry = current[job]
                self.ask(f"task {entry.get('name', '?')}[{entry.get('id', '?')}] survived its unwind "
                         f"({entry.get('abandoned')}) for more than {self.grace:g} s; its thread is at "
                         f"{entry.get('abandoned_at') or '(no Python frame)'}")
                return

    def consumer_stopped(self) -> bool:
        """Has the worker's warm shutdown stopped this child's consumer (its task and control
        consumers cancelled)? The worker stops its consumer before its pool, and the consumer's
        blueprint is TERMINATE from then on (a reconnect restarts it without leaving RUN)."""
        blueprint = getattr(self.consumer, "blueprint", None)
        return getattr(blueprint, "state", None) == bootsteps.TERMINATE

    def on_shutdown(self, sender: Any = None, **_: Any) -> None:
        """The worker has stopped (its started tasks are done): as prefork's child at its exit."""
        code = getattr(sender, "exitcode", None)
        signals.worker_process_shutdown.send(sender=self.hostname or getattr(sender, "hostname", None),
                                             pid=os.getpid(), exitcode=0 if code is None else code)


def hold(files: str, index: int) -> None:
    """In a replacement (``CMWQ_CHILD_HOLD``), before its consumer connects: say it is ready, then
    wait until the supervisor lets it go (step 4 of the handover), the worker is stopping, or
    the supervisor is gone."""
    _touch(files + READY)
    parent = os.getppid()
    started = time.monotonic()
    while not os.path.exists(files + GO):
        if _stopping():
            return
        if os.getppid() != parent:
            return  # the supervisor died: its death signal stops us
        time.sleep(HOLD_LOOK)
    log.info("cmwq_exec: child %s consumes after holding %.2f s for its predecessor", index,
             time.monotonic() - started)


def _stopping() -> bool:
    flags = (_worker_state.should_stop, _worker_state.should_terminate)
    return any(flag is not None and flag is not False for flag in flags)


# -- the supervisor's side ----------------------------------------------------------------------------


class Outgoing:
    """A recycled child's process, from its request until it has exited."""

    def __init__(self, proc: subprocess.Popen[bytes], files: str, ledger_path: str, reason: str) -> None:
        self.proc = proc  # I
        self.files = files  # I
        self.ledger_path = ledger_path  # I
        self.reason = reason  # I
        self.stopped_at: float | None = None  # S: when it got its SIGTERM

    def released(self) -> bool:
        """Its consumer has stopped, or its process is gone."""
        return self.proc.poll() is not None or os.path.exists(self.files + RELEASED)


class Handover:
    """The supervisor's half of recycling for one slot (see the module doc). S: the supervisor's
    thread."""

    def __init__(self) -> None:
        self.outgoing: list[Outgoing] = []  # S: recycled processes not yet reaped
        self.recycles = 0  # S: read by scrapes (an int)
        self.gap = False  # S: an outgoing process was stopped, the replacement not yet let go

    def asked(self, proc: subprocess.Popen[bytes] | None, files: str) -> str | None:
        """Why the slot's current process asks to be recycled, or None."""
        if proc is None or proc.poll() is not None or any(out.proc is proc for out in self.outgoing):
            return None
        try:
            with open(files + RECYCLE) as request:
                return request.read() or "asked"
        except OSError:
            return None

    def begin(self, proc: subprocess.Popen[bytes], files: str, ledger_path: str, reason: str) -> None:
        """The current process becomes outgoing; the caller starts the replacement, holding."""
        self.outgoing.append(Outgoing(proc, files, ledger_path, reason))
        self.recycles += 1

    def holding(self) -> bool:
        """Must a process started now hold? While an outgoing one may still consume."""
        return any(not out.released() for out in self.outgoing)

    def advance(self, replacement: subprocess.Popen[bytes] | None, files: str, now: float,
                may_stop: bool = True) -> None:
        """Steps 3 and 4: once the replacement is ready (and ``may_stop``: no other CPU is between
        two consumers), stop every outgoing process that has not been told; once all have released
        (or RELEASE_WAIT passed), let the replacement go."""
        if not self.outgoing:
            return
        ready = replacement is not None and os.path.exists(files + READY)
        if ready and (may_stop or self.gap):
            for out in self.outgoing:
                if out.stopped_at is None:
                    out.stopped_at = now
                    self.gap = True
                    _send(out.proc, signal.SIGTERM)
        if ready and not os.path.exists(files + GO):
            late = [out for out in self.outgoing if out.stopped_at is not None and not out.released()
                    and now - out.stopped_at > RELEASE_WAIT]
            if late:
                log.warning("cmwq_exec: pid %s has not stopped consuming %s s after its SIGTERM: its "
                            "replacement consumes anyway", late[0].proc.pid, RELEASE_WAIT)
            if late or all(out.released() for out in self.outgoing):
                _touch(files + GO)
                self.gap = False

    def exited(self) -> list[Outgoing]:
        """The outgoing processes that have exited, removed from the list (to be reaped)."""
        gone = [out for out in self.outgoing if out.proc.poll() is not None]
        self.outgoing = [out for out in self.outgoing if out.proc.poll() is None]
        return gone

    def alive(self) -> bool:
        return any(out.proc.poll() is None for out in self.outgoing)

    def signal(self, signum: int) -> None:
        """The worker stops: pass its signal on to every outgoing process."""
        for out in self.outgoing:
            if out.proc.poll() is None:
                _send(out.proc, signum)
                out.stopped_at = out.stopped_at or time.monotonic()


def _send(proc: subprocess.Popen[bytes], signum: int) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass


def remove_files(files: str) -> None:
    """Remove a process's recycling files (the supervisor, once it is reaped)."""
    for suffix in (RECYCLE, RELEASED, READY, GO):
        try:
            os.unlink(files + suffix)
        except FileNotFoundError:
            pass
