"""Per-CPU child processes for the Celery pool: one worker, every CPU.

One CPython process runs Python code on one CPU at a time, and a Celery worker's consumer costs
CPU per task in that same process. With ``cmwq_processes`` (or ``CMWQ_PROCESSES``) set, the
``celery worker`` process started with this pool becomes a *supervisor*: it starts N child
processes, pins each to one CPU, and does nothing else. Each child is a complete Celery worker
node running the single-process pool (:class:`cmwq_exec.celery.TaskPool`) on its own
concurrency-managed per-CPU pool, and consumes from the broker on its own, so neither the
tasks nor the consumers of two children share a GIL.

The shape follows from a measurement (``benchmarks/bench_celery.py``): one process stops at
~1250-1440 tasks/s of 10 ms I/O tasks whatever the pool, at about one core (~0.7 ms of CPU per
task, most of it Celery's consumer and tracer). A parent consuming for its children (prefork's
shape) would keep that ceiling; children that consume remove it.

The children
    Child *i* (0 <= i < N) re-runs the parent's own command line with ``-n {name}.{i}@{host}``
    (the parent being ``{name}@{host}``), ``CMWQ_CHILD=i`` and ``CMWQ_CHILD_CPU=cpu`` in its
    environment; the usable CPUs (``os.sched_getaffinity``) are dealt out in order. ``-c`` means
    running tasks per child. ``--pidfile`` and ``--detach`` stay with the parent, an embedded
    beat (``-B``) runs in child 0 only, and a ``--statedb`` file gets the child's index as a
    suffix. A fresh interpreter per child (not a fork of the supervisor) means no state, lock or
    thread of the parent is copied.

    The children share the parent's process group (so ``kill -- -PGID`` reaches them all), ignore
    SIGINT (a Ctrl-C reaches the parent, which tells them), and get SIGTERM if the parent dies.

The supervisor
    * connects to no broker and is not a Celery node: ``celery inspect``/``control`` commands
      reach the children by their names (a broadcast reaches every child: ``pool_grow 1`` lets
      each child run one more task);
    * warm shutdown (SIGTERM, the first Ctrl-C): SIGTERM to every child, then waits until all have
      exited; cold shutdown (SIGQUIT, or a second Ctrl-C while waiting): SIGQUIT to every child;
    * keeps each child on its CPU. When a CPU goes offline the kernel moves the threads pinned to
      it and, for each one it has to move, widens its CPU mask for good ("no longer affine to
      cpuN"); so once a second, while a child's CPU is online, every thread of that child whose
      mask is not just that CPU is pinned to it again. Meanwhile the child's own
      concurrency-managed pools follow the CPUs as in any process (a trustee drains the pool of
      the CPU that left);
    * checks the configuration a child would check at its start (the core's settings from the
      environment: :func:`check_configuration`) before it starts any child: a bad value stops the
      worker with the error a single process gives, naming the variable;
    * a child that dies (a signal, an exit code other than 0) while the worker is not stopping is
      replaced by a new process with the same index, name and CPU, after a pause that doubles from
      0.5 s up to 10 s while replacements keep dying within 10 s of their start. After
      MAX_YOUNG_DEATHS such deaths in a row the worker stops (exit status 1), saying which child
      and how it died: a child that cannot stay up is a fault a restart does not fix. A child that
      exits with EX_CONFIG (78: it found a configuration error before consuming) stops the worker
      at once. A child that exits with 0 by itself (the ``shutdown`` control command) is not
      replaced; the supervisor exits when no child is left;
    * the tasks a dead child had started: each child keeps a ledger of its started tasks
      (:mod:`cmwq_exec.celery_process_ledger`); when a child dies by a signal or an exit code
      other than 0 (and not in a cold shutdown the supervisor asked for), every task of its ledger
      is recorded FAILURE ``WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL) Child:
      ...')`` in the result backend, as prefork records its dead child's job. Tasks with
      ``acks_late`` are not in the ledger: their messages go back to the broker, which delivers
      them to another child (RabbitMQ at once; Redis after its ``visibility_timeout``), as do the
      tasks the child had received and not started (not acknowledged yet, whatever ``acks_late``
      says);
    * recycling: a child past ``--max-tasks-per-child`` or ``--max-memory-per-child``, or with a
      task abandoned for longer than ``cmwq_abandon_grace``, asks for a replacement; the
      supervisor starts it first and hands the CPU over without two consumers of one node name
      at once (:mod:`cmwq_exec.celery_process_recycle`). Each process of a slot has files of its
      own in the status directory (:mod:`cmwq_exec.celery_process_files`);
    * metrics: with ``cmwq_metrics_port`` / ``CMWQ_METRICS_PORT`` set, the supervisor serves the
      one endpoint of the whole worker (:mod:`cmwq_exec.celery_process_metrics`). Each child
      serves its own metrics on a free loopback port it writes into a status file of the
      supervisor; a scrape of the supervisor answers from the children's metrics read at most a
      second before, each labelled ``child``, and adds ``cmwq_celery_children`` (live children)
      and ``cmwq_celery_child_restarts_total``.

This needs the worker to be started by the ``celery ... worker`` command line (the children run
it again); an embedded worker (``app.Worker(...)``, ``worker_main``) gets a clear error.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from billiard.common import human_status
from celery.exceptions import ImproperlyConfigured, WorkerShutdown, WorkerTerminate
from celery.worker import state as _worker_state

from . import celery_process_ledger as ledger
from . import celery_process_recycle as recycle
from . import plugin as _plugin
from .celery_process_command import child_command, child_nodename, is_worker_command
from .celery_process_files import STATUS_DIR_PREFIX, remove_stale_status_dirs
from .celery_process_metrics import ChildrenCollector, serve
from .core import system as _core_system
from .core.config import from_environment
from .core.cpus import online_cpus

__all__ = ["CHILD", "Supervisor", "child_command", "child_index", "child_nodename", "is_worker_command",
           "processes_wanted"]

log = logging.getLogger("cmwq_exec.celery")

#: environment of a child: its index, its CPU, where it writes its metrics port and its ledger
CHILD, CHILD_CPU, CHILD_STATUS = "CMWQ_CHILD", "CMWQ_CHILD_CPU", "CMWQ_CHILD_STATUS"
CHILD_LEDGER = "CMWQ_CHILD_LEDGER"

_ALLOWED = "unset, '' or 0 (one process), 'auto' (one child per usable CPU) or a whole number N >= 1"

#: respawn pauses: doubling from the first while children die young, up to the last
RESPAWN_PAUSE, RESPAWN_PAUSE_MAX, YOUNG = 0.5, 10.0, 10.0
#: a child that dies young this many times in a row stops the worker (~30 s of restarts)
MAX_YOUNG_DEATHS = 5
#: a child's exit status for a configuration error found before it consumed (sysexits' EX_CONFIG)
EX_CONFIG = 78
#: how often the supervisor looks at its children and the shutdown flags
TICK = 0.1
#: how often it checks that every thread of every child is still pinned to the child's CPU
PIN_CHECK = 1.0


# -- choosing the mode -------------------------------------------------------------------------------


def child_index(environ: Mapping[str, str] = os.environ) -> int | None:
    """This process's index if it is a child of a supervisor, else None."""
    raw = environ.get(CHILD)
    return None if raw in (None, "") else int(raw)


def processes_wanted(setting: object, environ: Mapping[str, str] = os.environ) -> int:
    """How many children the worker should have: 0 for the single-process pool.

    ``setting`` is the app's ``cmwq_processes`` (None if unset), which wins over the
    environment's ``CMWQ_PROCESSES``. A child never has children. Raises ImproperlyConfigured
    naming the setting or variable, the value and what is allowed."""
    if child_index(environ) is not None:
        return 0
    if setting is not None:
        where, value = "the cmwq_processes setting", setting
    else:
        where, value = "the environment variable CMWQ_PROCESSES", environ.get("CMWQ_PROCESSES")
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ImproperlyConfigured(f"{where} is {value!r}: use {_ALLOWED}")
    if isinstance(value, int):
        count = value
    else:
        text = str(value).strip().lower()
        if text in ("", "0"):
            return 0
        if text == "auto":
            return len(usable_cpus())
        if not text.isdigit():
            raise ImproperlyConfigured(f"{where} is {value!r}: use {_ALLOWED}")
        count = int(text)
    if count < 0:
        raise ImproperlyConfigured(f"{where} is {value!r}: use {_ALLOWED}")
    return count


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def check_configuration() -> None:
    """Raise ValueError naming the first ``CMWQ_<NAME>`` variable (or ``cmwq_exec.configure()``
    setting) whose value the core would refuse when its pools start, as a child does at its start.
    The supervisor checks before it starts a child, so a bad value stops the worker instead of
    killing every child it starts."""
    # the configuration configure() left, with the environment over it: what get_system() reads
    from_environment(_core_system._config).validate()
    # and the plugins' own settings: loading them raises SettingError (a ValueError) for a bad one
    _plugin.get_plugin_manager()


# -- a child's side --------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def become_child(index: int, environ: Mapping[str, str] = os.environ) -> ledger.Ledger | None:
    """Called in a child before its pool starts: check the configuration (a bad value exits with
    EX_CONFIG, which the supervisor does not restart), stay on our CPU, die with the supervisor
    (warm), leave Ctrl-C to it; returns the ledger the pool keeps of the tasks it starts (None if
    the supervisor gave no path)."""
    try:
        check_configuration()
    except ValueError as exc:
        log.critical("cmwq_exec child %s: configuration error: %s", index, exc)
        raise SystemExit(EX_CONFIG) from exc
    cpu = environ.get(CHILD_CPU)
    if cpu not in (None, ""):
        try:
            os.sched_setaffinity(0, {int(cpu)})
        except OSError as exc:
            log.warning("cmwq_exec child %s: cannot pin to CPU %s: %s", index, cpu, exc)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("cmwq_exec child %s: no PR_SET_PDEATHSIG", index, exc_info=True)
    parent = environ.get("CMWQ_CHILD_PARENT")
    if parent and os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before we could ask to follow it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    files = environ.get(recycle.CHILD_FILES)
    if files:  # its limits (celery_process_recycle); a replacement holds until its predecessor stops
        recycle.ChildLimits(files).connect()
        if environ.get(recycle.CHILD_HOLD):
            recycle.hold(files, index)
    path = environ.get(CHILD_LEDGER)
    return ledger.keep_ledger(path) if path else None


def pin_threads(pid: int, cpu: int) -> int:
    """Pin every thread of process ``pid`` whose CPU mask is not ``{cpu}`` to ``cpu``; returns
    how many were. Threads that exit meanwhile, or a CPU that goes offline meanwhile, are
    skipped (the next look retries)."""
    wanted = {cpu}
    pinned = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0  # exited
    for tid in tids:
        try:
            if os.sched_getaffinity(int(tid)) != wanted:
                os.sched_setaffinity(int(tid), wanted)
                pinned += 1
        except OSError:
            continue
    return pinned


def report_metrics_port(port: int, environ: Mapping[str, str] = os.environ) -> None:
    """A child tells the supervisor where its metrics are."""
    path = environ.get(CHILD_STATUS)
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        out.write(str(port))
    os.replace(tmp, path)


# -- the supervisor ----------------------------------------------------------------------------------

class Child:
    """One child process slot: its index, CPU and node name stay; its process is replaced.

    Each process of the slot (a *generation*) has its own files, ``{base}.{generation}.*``: a
    recycled process drains while its replacement runs (celery_process_recycle)."""

    def __init__(self, index: int, cpu: int, nodename: str, base: str) -> None:
        self.index = index  # I
        self.cpu = cpu  # I
        self.nodename = nodename  # I
        self.base = base  # I: the prefix of its processes' files
        self.generation = 0  # S: the current process's
        self.files = f"{base}.0"  # S: the current process's file prefix (recycling files)
        self.status_path = f"{base}.0.port"  # S: where the current process writes its metrics port
        self.ledger_path = f"{base}.0.tasks"  # S: the tasks it started (celery_process_ledger)
        self.handover = recycle.Handover()  # S: its recycled processes that have not exited yet
        self.proc: subprocess.Popen[bytes] | None = None  # S: the supervisor's thread
        self.started_at = 0.0  # S
        self.restarts = 0  # S: read by scrapes (an int: a torn read cannot happen)
        self.pause = RESPAWN_PAUSE  # S
        self.respawn_at: float | None = None  # S: when to start it again
        self.young_deaths = 0  # S: deaths within YOUNG of the start, in a row
        self.done = False  # S: exited with 0 by itself, not replaced
        self.reaped: int | None = None  # S: pid of the last process whose death was handled

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def recycles(self) -> int:
        """Processes of this slot replaced at their request (read by scrapes: an int)."""
        return self.handover.recycles

    def metrics_port(self) -> int | None:
        try:
            with open(self.status_path) as status:
                return int(status.read().strip())
        except (OSError, ValueError):
            return None


class Supervisor:
    """Starts, watches, replaces and stops the children of one worker (see the module doc).

    Runs on the worker's main thread, inside the pool's ``on_start``, which it never leaves
    normally: it raises Celery's WorkerShutdown or WorkerTerminate when the worker is to stop,
    after its children have exited, or the error that stops the worker (a configuration error,
    a child that keeps dying young)."""

    def __init__(self, nodename: str, count: int, metrics: tuple[int, str] | None = None,
                 argv: Sequence[str] | None = None, app: Any = None) -> None:
        given = argv
        argv = list(sys.argv if argv is None else argv)
        if not is_worker_command(argv):
            raise ImproperlyConfigured(
                "cmwq_processes / CMWQ_PROCESSES needs the worker to be started by the `celery ... "
                f"worker` command line (each child runs it again); this process was started as {argv!r}")
        try:
            check_configuration()
        except ValueError as exc:
            raise ImproperlyConfigured(f"cmwq_exec: {exc}") from exc
        recycle.check_limits(_app_of(app).conf)
        cpus = usable_cpus()
        self.nodename = nodename  # I
        self.app = app  # I: whose result backend hears of a dead child's tasks (None: current_app)
        # I: what the children run again (interpreter options included); a given argv, as run by us
        self.orig_argv = list(sys.orig_argv) if given is None else [sys.executable, *argv]
        remove_stale_status_dirs()
        # I: the children's status files; named by our pid, so the next supervisor removes the
        # directory if we are killed before we can (SIGKILL)
        self.dir = tempfile.mkdtemp(prefix=f"{STATUS_DIR_PREFIX}{os.getpid()}-")
        self.children = [Child(i, cpus[i % len(cpus)], child_nodename(nodename, i),
                               os.path.join(self.dir, f"child{i}")) for i in range(count)]  # I
        self.metrics = metrics  # I: (port, addr) of the worker's endpoint
        self._server: Any = None
        self.stopping = False  # S
        self.cold = False  # S: SIGQUIT sent: the children's tasks end as in a cold shutdown
        self.pin_check_at = 0.0  # S: when _keep_pinned runs next
        self._reports: list[threading.Thread] = []  # S: threads recording dead children's tasks

    # -- running --

    def run(self) -> None:
        """Start the children and watch them until the worker stops; never returns."""
        try:
            self._start_metrics()
            for child in self.children:
                self._spawn(child)
            while True:
                code = _worker_state.should_terminate
                if code is not None and code is not False:
                    self.stop(cold=True)
                    raise WorkerTerminate(code)
                code = _worker_state.should_stop
                if code is not None and code is not False:
                    self.stop(cold=False)
                    raise WorkerShutdown(code)
                self._watch()
                if time.monotonic() >= self.pin_check_at:
                    self.pin_check_at = time.monotonic() + PIN_CHECK
                    self._keep_pinned()
                if all(child.done for child in self.children):
                    log.info("cmwq_exec: every child exited by itself: the worker stops")
                    self.stop(cold=False)
                    raise WorkerShutdown(0)
                time.sleep(TICK)
        except _StopWorker as stopping:
            # the other children are sound: let them finish their tasks (a warm shutdown)
            self.stop(cold=_worker_state.should_terminate not in (None, False))
            raise stopping.error from None
        except BaseException:
            self.stop(cold=True)  # a no-op after a stop above; else whatever went wrong, end them
            raise

    def _spawn(self, child: Child) -> None:
        """Start a process for ``child``, a new generation with files of its own; it holds before
        consuming while a recycled process of the slot may still consume (celery_process_recycle)."""
        child.generation += 1
        child.files = f"{child.base}.{child.generation}"
        child.status_path, child.ledger_path = f"{child.files}.port", f"{child.files}.tasks"
        environ = dict(os.environ)
        environ.update({CHILD: str(child.index), CHILD_CPU: str(child.cpu), CHILD_STATUS: child.status_path,
                        CHILD_LEDGER: child.ledger_path, "CMWQ_CHILD_PARENT": str(os.getpid()),
                        recycle.CHILD_FILES: child.files})
        environ.pop(recycle.CHILD_HOLD, None)
        if child.handover.holding():
            environ[recycle.CHILD_HOLD] = "1"
        command = child_command(self.orig_argv, sys.executable, child.nodename, child.index)
        try:
            child.proc = subprocess.Popen(command, env=environ, close_fds=True)
        except OSError as exc:
            log.error("cmwq_exec: cannot start child %s (%s): %s", child.index, child.nodename, exc)
            child.proc = None
            child.started_at = time.monotonic()  # a start that failed died young: back off
            self._count_death(child, str(exc))
            self._schedule_respawn(child)
            return
        try:
            os.sched_setaffinity(child.proc.pid, {child.cpu})
        except OSError as exc:
            log.warning("cmwq_exec: cannot pin child %s to CPU %s: %s", child.index, child.cpu, exc)
        child.started_at = time.monotonic()
        child.respawn_at = None
        log.info("cmwq_exec: child %s (%s) started on CPU %s, pid %s", child.index, child.nodename,
                 child.cpu, child.proc.pid)

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            self._recycle(child, now)
            if child.done:
                continue
            if child.respawn_at is not None:
                if now >= child.respawn_at:
                    child.restarts += 1
                    self._spawn(child)
                continue
            proc = child.proc
            code = None if proc is None else proc.poll()
            if code is None:
                continue
            self._reap(child)
            if code == 0:
                log.info("cmwq_exec: child %s (%s) exited by itself", child.index, child.nodename)
                child.done = True
                continue
            how = human_status(code)
            if code == EX_CONFIG:
                raise _StopWorker(ImproperlyConfigured(
                    f"cmwq_exec: child {child.index} ({child.nodename}) found a configuration error at its "
                    f"start (exit status {EX_CONFIG}; its log above names the setting): the worker stops"))
            self._count_death(child, how)
            log.warning("cmwq_exec: child %s (%s, pid %s) died with %s; starting a new one",
                        child.index, child.nodename, proc.pid if proc else "?", how)
            self._schedule_respawn(child)

    def _recycle(self, child: Child, now: float) -> None:
        """The handover of ``child``'s CPU from a process that asked to be recycled to its
        replacement (see celery_process_recycle), and the reaping of recycled processes."""
        handover = child.handover
        if not self.stopping and child.respawn_at is None:
            reason = handover.asked(child.proc, child.files)
            if reason is not None and child.proc is not None:
                log.info("cmwq_exec: child %s (%s, pid %s) is replaced: %s", child.index, child.nodename,
                         child.proc.pid, reason)
                handover.begin(child.proc, child.files, child.ledger_path, reason)
                self._spawn(child)
            # one CPU at a time between two consumers: the others consume meanwhile
            others_between = any(other.handover.gap for other in self.children if other is not child)
            handover.advance(child.proc, child.files, now, may_stop=not others_between)
        for out in handover.exited():
            self._reap_process(child, out.proc, out.ledger_path)
            recycle.remove_files(out.files)
            log.info("cmwq_exec: child %s (%s): recycled pid %s exited (%s)", child.index, child.nodename,
                     out.proc.pid, human_status(out.proc.returncode or 0))

    def _count_death(self, child: Child, how: str) -> None:
        """Count a death of ``child``'s process; stop the worker (RuntimeError, after a warm stop of
        the other children) when it is the MAX_YOUNG_DEATHS-th in a row within YOUNG seconds of a
        start."""
        young = time.monotonic() - child.started_at < YOUNG
        child.young_deaths = child.young_deaths + 1 if young else 0
        if child.young_deaths >= MAX_YOUNG_DEATHS:
            raise _StopWorker(RuntimeError(
                f"cmwq_exec: child {child.index} ({child.nodename}) died {child.young_deaths} times in a "
                f"row within {YOUNG:g} s of its start (the last with {how}): restarting it does not "
                "help, the worker stops (the child's log above says why it died)"))

    def _keep_pinned(self) -> None:
        """Pin every thread of every live child whose CPU is online back to that CPU (see the
        module doc: the kernel widens a thread's mask when it moves it off an offline CPU)."""
        online = online_cpus()
        for child in self.children:
            proc = child.proc
            if proc is None or child.cpu not in online or not child.alive():
                continue
            repinned = pin_threads(proc.pid, child.cpu)
            if repinned:
                log.info("cmwq_exec: child %s (%s): %s threads pinned to CPU %s again", child.index,
                         child.nodename, repinned, child.cpu)

    def _schedule_respawn(self, child: Child) -> None:
        now = time.monotonic()
        young = child.started_at and now - child.started_at < YOUNG
        child.pause = min(RESPAWN_PAUSE_MAX, child.pause * 2) if young else RESPAWN_PAUSE
        child.respawn_at = now + (child.pause if young else 0.0)

    # -- a dead child's tasks --

    def _reap(self, child: Child) -> None:
        """Once per exited process of the slot (see _reap_process)."""
        proc = child.proc
        if proc is None or proc.returncode is None or child.reaped == proc.pid:
            return
        child.reaped = proc.pid
        self._reap_process(child, proc, child.ledger_path)
        recycle.remove_files(child.files)

    def _reap_process(self, child: Child, proc: subprocess.Popen[bytes], ledger_path: str) -> None:
        """An exited process of ``child``: if it died (not exit code 0, not in a cold shutdown we
        asked for), record the tasks of its ledger as failed with WorkerLostError, on a thread of
        its own (a slow result backend must not stop the watching)."""
        records = ledger.read_ledger(ledger_path)
        for path in (ledger_path, ledger_path[:-len(".tasks")] + ".port"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if proc.returncode == 0 or self.cold or not records:
            return
        exc = ledger.lost_error(proc.returncode, f"{child.index} ({child.nodename}, pid {proc.pid})")
        log.error("cmwq_exec: child %s (%s) died with %s while running %s tasks: recording them as failed",
                  child.index, child.nodename, human_status(proc.returncode), len(records))
        app = _app_of(self.app)
        thread = threading.Thread(target=ledger.report_lost, args=(app, records, exc),
                                  name=f"cmwq-lost-child{child.index}", daemon=True)
        thread.start()
        self._reports.append(thread)

    # -- stopping --

    def stop(self, cold: bool) -> None:
        """Tell every child to stop (SIGTERM warm, SIGQUIT cold) and wait until all have exited;
        a cold shutdown asked for while waiting for a warm one is passed on. Then wait (up to
        REPORT_WAIT seconds) for the failures of dead children's tasks to be recorded."""
        if not self.stopping:
            self.stopping = True
            log.info("cmwq_exec: %s shutdown of %s children", "cold" if cold else "warm", len(self.children))
            self._signal_all(signal.SIGQUIT if cold else signal.SIGTERM)
        elif cold:
            self._signal_all(signal.SIGQUIT)
        escalated = cold
        while any(child.alive() or child.handover.alive() for child in self.children):
            if not escalated and _worker_state.should_terminate not in (None, False):
                escalated = True
                self._signal_all(signal.SIGQUIT)
            time.sleep(TICK)
        for child in self.children:
            self._reap(child)  # one killed while the worker stopped
            for out in child.handover.exited():
                self._reap_process(child, out.proc, out.ledger_path)
        deadline = time.monotonic() + REPORT_WAIT
        for thread in self._reports:
            thread.join(max(0.0, deadline - time.monotonic()))
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _signal_all(self, signum: int) -> None:
        if signum == signal.SIGQUIT:
            self.cold = True
        for child in self.children:
            child.handover.signal(signum)
            if child.alive():
                assert child.proc is not None
                try:
                    child.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    # -- metrics --

    def _start_metrics(self) -> None:
        if self.metrics is None:
            return
        from prometheus_client import CollectorRegistry

        port, addr = self.metrics
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ImproperlyConfigured(f"cmwq_metrics_port / CMWQ_METRICS_PORT must be a TCP port number "
                                       f"from 0 to 65535 (0 picks a free port), got {port!r}")
        registry = CollectorRegistry()
        registry.register(ChildrenCollector(self.children))
        try:
            self._server = serve(port, addr, registry)
        except OSError as exc:
            raise ImproperlyConfigured(f"cannot serve metrics on {addr}:{port}: {exc}") from exc
        log.info("cmwq_exec: serving the children's Prometheus metrics on http://%s:%s/metrics", addr, port)


def _app_of(app: Any) -> Any:
    """``app``, or the current app (the worker's) when None."""
    if app is not None:
        return app
    from celery import current_app

    return current_app._get_current_object()


#: seconds a stopping supervisor waits for the failures of dead children's tasks to be recorded
REPORT_WAIT = 30.0


class _StopWorker(Exception):
    """Raised while watching: stop the children warm, then raise ``error`` (see Supervisor.run)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
