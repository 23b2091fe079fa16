"""The first-party plugins in plugins/: fixed concurrency (ThreadPoolExecutor-like) and the event log."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import fake_pool, wait_for

import cmwq_exec
from cmwq_exec import WQ, Work, WorkQueue, blocking, plugin

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"
for _name in ("cmwq_fixed_concurrency", "cmwq_event_log"):
    if str(PLUGINS / _name) not in sys.path:
        sys.path.insert(0, str(PLUGINS / _name))

import cmwq_event_log  # noqa: E402
from cmwq_fixed_concurrency import FixedConcurrency  # noqa: E402


@pytest.fixture
def registered() -> Iterator[Callable[[object, str], None]]:
    """Register plugins for one test; unregister them afterwards, whatever happens."""
    names: list[str] = []

    def register(obj: object, name: str) -> None:
        names.append(plugin.register(obj, name=f"{name}-{uuid.uuid4().hex[:6]}"))

    yield register
    for name in names:
        plugin.unregister(name=name)


class HeldWorks:
    """``n`` works on a fresh unbound workqueue, each blocked in ``blocking()`` until released.

    Counts how many are in their body at once, and the most ever seen.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0
        self.started = 0
        self.finished = 0
        self.release = threading.Event()
        self.wq = WorkQueue(f"plugin_test_{uuid.uuid4().hex[:8]}", WQ.UNBOUND)

    def _work(self) -> None:
        with self.lock:
            self.started += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            with blocking():
                self.release.wait(30)
        finally:
            with self.lock:
                self.running -= 1
                self.finished += 1

    def queue(self) -> None:
        for _ in range(self.n):
            assert self.wq.queue_work(Work(self._work))

    def finish(self) -> None:
        self.release.set()
        self.wq.flush()
        self.wq.destroy()


def _unbound_pool() -> Any:
    return next(pool for pool in cmwq_exec.get_system().pools if pool.cpu is None)


# -- fixed concurrency --------------------------------------------------------------------------


def test_fixed_concurrency_gives_blocked_works_no_extra_workers(registered) -> None:
    registered(FixedConcurrency(2), "fixed")
    works = HeldWorks(5)
    try:
        works.queue()
        wait_for("two works to start", lambda: works.started >= 2)
        # A negative: give concurrency management time to (wrongly) start more. With the default
        # policy all five start within milliseconds (see the test below).
        time.sleep(0.5)
        with works.lock:
            assert (works.started, works.running) == (2, 2)
        stats = _unbound_pool().stats()
        assert stats["nr_pending"] == 3
        assert stats["nr_running"] == 0  # both busy workers are asleep in blocking()
    finally:
        works.finish()
    assert works.finished == 5
    assert works.max_running == 2


def test_without_the_plugin_blocked_works_do_get_workers() -> None:
    """The contrast that makes the test above mean something: concurrency management at work."""
    works = HeldWorks(5)
    try:
        works.queue()
        wait_for("all five works to run at once", lambda: works.running == 5)
    finally:
        works.finish()
    assert works.max_running == 5


def test_unregistering_the_fixed_policy_restores_concurrency_management() -> None:
    name = plugin.register(FixedConcurrency(1), name="fixed-temporary")
    try:
        assert _unbound_pool().need_more_worker is not cmwq_exec.core.policy.need_more_worker
    finally:
        plugin.unregister(name=name)
    assert _unbound_pool().need_more_worker is cmwq_exec.core.policy.need_more_worker


def _module_hooks(limit: str | None) -> list[str]:
    """The hooks the module-level plugin defines in a fresh interpreter with that environment."""
    env = {k: v for k, v in os.environ.items() if k != "CMWQ_FIXED_CONCURRENCY"}
    if limit is not None:
        env["CMWQ_FIXED_CONCURRENCY"] = limit
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS / "cmwq_fixed_concurrency"), str(ROOT)])
    probe = ("import json, cmwq_fixed_concurrency as m\n"
             "print(json.dumps(sorted(n for n in dir(m) if n.startswith('cmwq_'))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                            timeout=60)
    if result.returncode != 0:
        raise ValueError(result.stderr)
    return json.loads(result.stdout)


def test_the_installed_module_is_inert_until_a_limit_is_set() -> None:
    assert _module_hooks(None) == []
    assert _module_hooks("3") == [
        "cmwq_keep_working", "cmwq_may_start_working", "cmwq_need_more_worker",
        "cmwq_need_to_create_worker", "cmwq_need_to_manage_workers", "cmwq_too_many_workers"]
    with pytest.raises(ValueError, match="CMWQ_FIXED_CONCURRENCY must be a positive integer"):
        _module_hooks("0")


def test_fixed_policy_predicates() -> None:
    policy = FixedConcurrency(2)
    # One worker busy (blocked: nr_running 0), one idle, work pending: wake the idle one.
    assert policy.need_more_worker(fake_pool(pending=1, nr_workers=2, nr_idle=1, busy=1))
    # The woken worker left the idle list and asks again: it holds no work yet, so it may start.
    assert policy.need_more_worker(fake_pool(pending=1, nr_workers=2, nr_idle=0, busy=1))
    # Two busy, blocked or not: no more, unlike the kernel's formula.
    assert not policy.need_more_worker(fake_pool(pending=3, nr_workers=3, nr_idle=1, busy=2))
    assert cmwq_exec.core.policy.need_more_worker(fake_pool(pending=3, nr_workers=3, nr_idle=1, busy=2))
    # The last idle worker leaves: create a spare only below the limit.
    assert policy.need_to_create_worker(fake_pool(pending=2, nr_workers=1, nr_idle=0, managing=True))
    assert not policy.need_to_create_worker(fake_pool(pending=2, nr_workers=2, nr_idle=0, busy=1,
                                                      managing=True))
    assert policy.may_start_working(fake_pool(pending=1, nr_workers=2, nr_idle=0, busy=1))
    # Every busy worker keeps draining.
    assert policy.keep_working(fake_pool(pending=1, nr_workers=2, nr_idle=0, busy=2, nr_running=2))
    assert not policy.keep_working(fake_pool(pending=0, nr_workers=2, nr_idle=0, busy=2, nr_running=2))
    # Idle workers within the limit are kept; beyond it, reaped.
    assert not policy.too_many_workers(fake_pool(pending=0, nr_workers=2, nr_idle=2))
    assert policy.too_many_workers(fake_pool(pending=0, nr_workers=3, nr_idle=2, busy=1))
    assert not policy.too_many_workers(fake_pool(pending=0, nr_workers=3, nr_idle=0, busy=3))
    with pytest.raises(ValueError):
        FixedConcurrency(0)


# -- event log ----------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            self.records.append(record)

    def events(self, event: str) -> list[logging.LogRecord]:
        with self.lock_:
            return [r for r in self.records if getattr(r, "cmwq_event", None) == event]


@pytest.fixture
def event_records(registered) -> Iterator[_Records]:
    # Where the plugin is installed (tox installs it), its entry point registered it already.
    if not plugin.get_plugin_manager().is_registered(cmwq_event_log):
        registered(cmwq_event_log, "event_log")
    handler = _Records()
    logger = logging.getLogger(cmwq_event_log.LOGGER_NAME)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_event_log_records_worker_creation_and_manager_runs(event_records: _Records) -> None:
    # More blocked works than the unbound pool has idle workers: the manager must create some.
    works = HeldWorks(_unbound_pool().stats()["nr_idle"] + 3)
    try:
        works.queue()
        wait_for("all works to run", lambda: works.running == works.n)
        created = wait_for("a worker_created event", lambda: [
            r for r in event_records.events("worker_created") if r.cmwq_pool == "unbound"])
        ran = wait_for("a manager_ran event", lambda: event_records.events("manager_ran"))
    finally:
        works.finish()
    record = created[0]
    assert record.levelno == logging.DEBUG
    assert record.cmwq_worker.startswith("cmwq/unbound:")
    assert record.cmwq_worker in record.getMessage()
    assert ran[0].cmwq_created >= 1


def test_event_log_records_cpu_intensive_works(event_records: _Records) -> None:
    wq = WorkQueue(f"plugin_hog_{uuid.uuid4().hex[:8]}", WQ.UNBOUND)
    stop = threading.Event()

    def hog() -> None:  # burns CPU without sleeping until told to stop (or 10 s)
        end = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < end:
            pass

    try:
        # The watchdog judges running workers only while works are pending. Several hogs keep the
        # worklist busy even when CPU contention from outside makes a hog look blocked for a look
        # (it is then counted out, another worker starts the next hog, and the watchdog goes on).
        for _ in range(6):
            wq.queue_work(Work(hog))
        hogs = wait_for("a cpu_intensive event", lambda: [
            r for r in event_records.events("cpu_intensive") if r.cmwq_pool == "unbound"], timeout=30)
    finally:
        stop.set()
        wq.flush()
        wq.destroy()
    assert hogs[0].cmwq_work.endswith("hog")
    assert hogs[0].levelno == logging.INFO


def test_every_event_hook_logs_its_fields(event_records: _Records) -> None:
    """Each hook called as the core calls it (keyword arguments, real pool and worker objects)."""
    pool = _unbound_pool()
    system = cmwq_exec.get_system()
    if not pool.workers:
        system.start_unbound_pool()
    worker = wait_for("a worker of the unbound pool", lambda: next(iter(list(pool.workers)), None))
    wq = WorkQueue(f"plugin_events_{uuid.uuid4().hex[:8]}")

    def some_work() -> None:
        pass

    work = Work(some_work)
    try:
        calls = [
            ("worker_destroyed", dict(pool=pool, worker=worker, reason="idle"), logging.DEBUG),
            ("worker_adopted", dict(pool=pool, worker=worker, donor=cmwq_exec.get_system().online_pools[0]),
             logging.DEBUG),
            ("worker_create_failed", dict(pool=pool, error=RuntimeError("can't start new thread")),
             logging.WARNING),
            ("manager_ran", dict(pool=pool, created=1, destroyed=0), logging.DEBUG),
            ("mayday", dict(pool=pool, workqueue=wq), logging.INFO),
            ("work_rescued", dict(pool=pool, workqueue=wq, work=work), logging.INFO),
            ("trustee_state", dict(pool=pool, state="IN_CHARGE"), logging.INFO),
            ("worker_blocked", dict(pool=pool, worker=worker, work=work), logging.INFO),
            ("stall", dict(pool=pool, seconds=31.5, stacks={1234: "  File x, line 1\n"}), logging.WARNING),
        ]
        for event, kwargs, _level in calls:
            getattr(cmwq_event_log, "cmwq_" + event)(**kwargs)
    finally:
        wq.destroy()
    me = threading.get_ident()  # real events come from workers and the timer thread, not from here
    mine = {event: [r for r in event_records.events(event) if r.thread == me] for event, _, _ in calls}
    for event, kwargs, level in calls:
        [record] = mine[event]
        assert record.levelno == level, event
        assert record.getMessage().startswith("unbound: "), record.getMessage()
        if "worker" in kwargs:
            assert record.cmwq_worker.startswith("cmwq/unbound:")
        if "workqueue" in kwargs:
            assert record.cmwq_workqueue == wq.name
        if "work" in kwargs:
            assert record.cmwq_work.endswith("some_work")
    assert mine["worker_destroyed"][0].cmwq_reason == "idle"
    donor = cmwq_exec.get_system().online_pools[0].name
    adopted = mine["worker_adopted"][0]
    assert adopted.cmwq_donor == donor and adopted.getMessage().endswith(f"adopted from {donor}")
    assert mine["trustee_state"][0].cmwq_state == "IN_CHARGE"
    assert "can't start new thread" in mine["worker_create_failed"][0].cmwq_error
    stall = mine["stall"][0]
    assert stall.cmwq_stacks == {"1234": "  File x, line 1\n"} and "31.5s" in stall.getMessage()


def test_json_lines_formatter() -> None:
    record = logging.LogRecord("cmwq_exec.events", logging.INFO, __file__, 1, "cpu0: mayday", None, None)
    record.cmwq_event = "mayday"
    record.cmwq_pool = "cpu0"
    record.cmwq_workqueue = "wq"
    line = cmwq_event_log.JSONLinesFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line) | {"time": 0} == {
        "event": "mayday", "pool": "cpu0", "workqueue": "wq", "level": "INFO",
        "logger": "cmwq_exec.events", "message": "cpu0: mayday", "time": 0}


def test_event_log_implements_the_event_hooks_exactly() -> None:
    """Every hook of the module is a hookspec of cmwq_exec, with the spec's argument names."""
    import inspect

    from cmwq_exec import hookspecs

    hooks = [name for name in dir(cmwq_event_log) if name.startswith("cmwq_")]
    assert {"cmwq_worker_created", "cmwq_worker_destroyed", "cmwq_worker_adopted", "cmwq_manager_ran",
            "cmwq_mayday", "cmwq_work_rescued", "cmwq_trustee_state", "cmwq_cpu_intensive"} <= set(hooks)
    assert "cmwq_work_started" not in hooks  # per-work hooks would tax the hot path
    for name in hooks:
        spec = inspect.signature(getattr(hookspecs, name))
        impl = inspect.signature(getattr(cmwq_event_log, name))
        assert list(impl.parameters) == list(spec.parameters), name


# -- installed as distributions, found through the entry points --------------------------------


@pytest.mark.slow
def test_plugins_install_and_register_through_entry_points(tmp_path: Path) -> None:
    target = tmp_path / "site"
    sources = []
    for name in ("cmwq_fixed_concurrency", "cmwq_event_log"):
        shutil.copytree(PLUGINS / name, tmp_path / name)  # build in a copy: no build/ in the repo
        sources.append(str(tmp_path / name))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), *sources], check=True, timeout=300)

    entry_points = {ep.name: ep.value for dist in importlib.metadata.distributions(path=[str(target)])
                    for ep in dist.entry_points if ep.group == "cmwq_exec"}
    assert entry_points == {"fixed_concurrency": "cmwq_fixed_concurrency", "event_log": "cmwq_event_log"}

    # A fresh process that has them on its path loads both through cmwq_exec's plugin manager.
    probe = (
        "import cmwq_exec.plugin as p, cmwq_exec.core.policy as d\n"
        "pm = p.get_plugin_manager()\n"
        "names = sorted(n for n, _ in pm.list_name_plugin() if not n.startswith('cmwq_exec.'))\n"
        "print(names, p.current_policy.need_more_worker is not d.need_more_worker,\n"
        "      p.events.worker_created is not None)\n"
        "import os, cmwq_exec\n"
        "wq = cmwq_exec.WorkQueue('probe')  # a work on each CPU: its pool's first workers are logged\n"
        "for cpu in sorted(os.sched_getaffinity(0)):\n"
        "    wq.queue_work_on(cpu, cmwq_exec.Work(int))\n"
        "wq.flush()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CMWQ_EXEC_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(ROOT)])
    env["CMWQ_FIXED_CONCURRENCY"] = "3"
    env["CMWQ_EVENT_LOG"] = str(tmp_path / "events.jsonl")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "['event_log', 'fixed_concurrency'] True True", result.stdout

    # CMWQ_EVENT_LOG made the event log write JSON lines: the first worker of each per-CPU pool used.
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    created = {event["pool"] for event in events if event["event"] == "worker_created"}
    assert created == {f"cpu{cpu}" for cpu in os.sched_getaffinity(0)}, events
    assert all(event["logger"] == "cmwq_exec.events" and event["level"] == "DEBUG" for event in events)
