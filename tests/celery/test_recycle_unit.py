"""The parts of child recycling (:mod:`cmwq_exec.celery_process_recycle`) without a broker: the
settings, what a child checks after a task, and the supervisor's handover step by step with real
processes standing in for children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from celery import bootsteps, signals
from celery.exceptions import ImproperlyConfigured
from celery.worker import state as worker_state
from celery_harness import wait_for

from cmwq_exec import celery_process_recycle as recycle
from cmwq_exec import celery_processes as cp

CELERY = os.path.join(os.path.dirname(sys.executable), "celery")


@pytest.mark.parametrize(("conf", "environ", "seconds"), [
    ({}, {}, recycle.ABANDON_GRACE),
    ({}, {"CMWQ_ABANDON_GRACE": ""}, recycle.ABANDON_GRACE),
    ({}, {"CMWQ_ABANDON_GRACE": "2.5"}, 2.5),
    ({"cmwq_abandon_grace": 0}, {"CMWQ_ABANDON_GRACE": "7"}, 0.0),
    ({"cmwq_abandon_grace": "3"}, {}, 3.0),
])
def test_the_abandon_grace_comes_from_the_setting_then_the_environment(conf, environ, seconds):
    assert recycle.abandon_grace(conf, environ) == seconds


@pytest.mark.parametrize(("conf", "environ", "named"), [
    ({}, {"CMWQ_ABANDON_GRACE": "soon"}, "the environment variable CMWQ_ABANDON_GRACE is 'soon'"),
    ({}, {"CMWQ_ABANDON_GRACE": "-1"}, "the environment variable CMWQ_ABANDON_GRACE is '-1'"),
    ({"cmwq_abandon_grace": True}, {}, "the cmwq_abandon_grace setting is True"),
    ({"cmwq_abandon_grace": float("nan")}, {}, "the cmwq_abandon_grace setting is nan"),
    ({"cmwq_abandon_grace": float("inf")}, {}, "the cmwq_abandon_grace setting is inf"),
])
def test_a_bad_abandon_grace_is_refused_naming_where_it_came_from(conf, environ, named):
    with pytest.raises(ImproperlyConfigured, match="use a number of seconds >= 0") as refused:
        recycle.abandon_grace(conf, environ)
    assert named in str(refused.value)


@pytest.mark.parametrize("name", ["worker_max_tasks_per_child", "worker_max_memory_per_child"])
@pytest.mark.parametrize("value", [-1, "50", 1.5, True])
def test_a_bad_per_child_limit_setting_is_refused_by_the_supervisor(name, value):
    with pytest.raises(ImproperlyConfigured, match=f"the {name} setting is {value!r}: use a whole number"):
        recycle.check_limits({name: value})
    recycle.check_limits({name: 0})
    recycle.check_limits({name: None})


def test_the_supervisor_refuses_a_bad_abandon_grace_before_it_starts_a_child(monkeypatch):
    monkeypatch.setenv("CMWQ_ABANDON_GRACE", "later")
    with pytest.raises(ImproperlyConfigured, match="CMWQ_ABANDON_GRACE is 'later'"):
        cp.Supervisor("w@h", 1, argv=[CELERY, "-A", "p", "worker"], app=SimpleNamespace(conf={}))


def ready_child(limits: recycle.ChildLimits, monkeypatch: Any, max_tasks: int | None = None,
                max_memory: int | None = None, pool: Any = None, grace: float = 10.0) -> Any:
    """``limits`` told its consumer is ready, with a worker of these limits; the looking thread is
    not started (the tests call its steps)."""
    monkeypatch.setattr(recycle.threading, "Thread", lambda **kwargs: SimpleNamespace(start=lambda: None))
    consumer = SimpleNamespace(controller=SimpleNamespace(max_tasks_per_child=max_tasks,
                                                          max_memory_per_child=max_memory),
                               hostname="w.0@h", app=SimpleNamespace(conf={"cmwq_abandon_grace": grace}),
                               pool=pool, blueprint=SimpleNamespace(state=bootsteps.RUN))
    limits.on_ready(sender=consumer)
    return consumer


def test_a_child_asks_once_after_its_max_tasks(tmp_path, monkeypatch):
    limits = recycle.ChildLimits(str(tmp_path / "c"))
    ready_child(limits, monkeypatch, max_tasks=3)
    for _ in range(2):
        limits.after_task()
    assert not (tmp_path / "c.recycle").exists()
    limits.after_task()
    assert (tmp_path / "c.recycle").read_text() == "it ran 3 tasks (--max-tasks-per-child 3)"
    (tmp_path / "c.recycle").unlink()
    limits.after_task()
    assert not (tmp_path / "c.recycle").exists(), "it asked twice"


def test_tasks_finished_before_the_consumer_is_ready_count(tmp_path, monkeypatch):
    limits = recycle.ChildLimits(str(tmp_path / "c"))
    for _ in range(4):
        limits.after_task()
    ready_child(limits, monkeypatch, max_tasks=3)
    assert (tmp_path / "c.recycle").exists()


def test_a_child_asks_after_a_task_that_left_it_above_its_max_memory(tmp_path, monkeypatch):
    """Measured as billiard measures it after a task: mem_rss(), in KiB."""
    limits = recycle.ChildLimits(str(tmp_path / "c"))
    ready_child(limits, monkeypatch, max_memory=1000)
    rss = [900]
    monkeypatch.setattr(recycle, "mem_rss", lambda: rss[0])
    limits.after_task()
    assert not (tmp_path / "c.recycle").exists()
    rss[0] = 1001
    limits.after_task()
    asked = (tmp_path / "c.recycle").read_text()
    assert "its memory (1001 KiB) passed --max-memory-per-child (1000 KiB)" in asked


def test_no_limit_zero_or_none_never_asks(tmp_path, monkeypatch):
    limits = recycle.ChildLimits(str(tmp_path / "c"))
    ready_child(limits, monkeypatch, max_tasks=0, max_memory=None)
    monkeypatch.setattr(recycle, "mem_rss", lambda: 10**9)
    for _ in range(100):
        limits.after_task()
    assert not (tmp_path / "c.recycle").exists()


def test_a_task_abandoned_past_the_grace_gets_its_child_recycled(tmp_path, monkeypatch):
    abandoned: list[dict[str, Any]] = []
    pool = SimpleNamespace(abandoned_active=lambda: abandoned)
    limits = recycle.ChildLimits(str(tmp_path / "c"))
    ready_child(limits, monkeypatch, pool=pool, grace=5.0)
    limits._check_abandoned(100.0)
    abandoned.append({"worker_pid": 7, "name": "t.stubborn", "id": "abc", "abandoned": "hard",
                      "abandoned_at": "app.py:12 in stubborn"})
    limits._check_abandoned(101.0)  # first seen
    limits._check_abandoned(105.9)
    assert not (tmp_path / "c.recycle").exists()
    limits._check_abandoned(106.0)
    assert (tmp_path / "c.recycle").read_text() == ("task t.stubborn[abc] survived its unwind (hard) for "
                                                    "more than 5 s; its thread is at app.py:12 in stubborn")


def test_a_task_that_returns_within_the_grace_is_forgotten(tmp_path, monkeypatch):
    abandoned = [{"worker_pid": 7}]
    limits = recycle.ChildLimits(str(tmp_path / "c"))
    ready_child(limits, monkeypatch, pool=SimpleNamespace(abandoned_active=lambda: abandoned), grace=5.0)
    limits._check_abandoned(100.0)
    abandoned.clear()
    limits._check_abandoned(104.0)
    abandoned.append({"worker_pid": 8})
    limits._check_abandoned(106.0)
    assert not (tmp_path / "c.recycle").exists()
    assert limits._seen == {8: 106.0}


def test_the_consumer_is_released_once_its_blueprint_has_stopped(tmp_path, monkeypatch):
    limits = recycle.ChildLimits(str(tmp_path / "c"))
    consumer = ready_child(limits, monkeypatch)
    assert not limits.consumer_stopped()
    consumer.blueprint.state = bootsteps.CLOSE
    assert not limits.consumer_stopped()
    consumer.blueprint.state = bootsteps.TERMINATE
    assert limits.consumer_stopped()


def test_a_child_sends_worker_process_shutdown_when_its_worker_stopped(tmp_path, monkeypatch):
    limits = recycle.ChildLimits(str(tmp_path / "c"))
    ready_child(limits, monkeypatch)
    heard: list[dict[str, Any]] = []

    def hear(sender: Any = None, **kwargs: Any) -> None:
        heard.append({"sender": sender, **kwargs})

    signals.worker_process_shutdown.connect(hear)
    try:
        limits.on_shutdown(sender=SimpleNamespace(exitcode=0))
    finally:
        signals.worker_process_shutdown.disconnect(hear)
    assert [(h["sender"], h["pid"], h["exitcode"]) for h in heard] == [("w.0@h", os.getpid(), 0)]


def test_a_replacement_holds_until_it_is_let_go(tmp_path):
    files = str(tmp_path / "c")
    done = threading.Event()
    thread = threading.Thread(target=lambda: (recycle.hold(files, 0), done.set()))
    thread.start()
    wait_for("the replacement to say it is ready", lambda: os.path.exists(files + recycle.READY), 10)
    assert not done.wait(0.1)
    open(files + recycle.GO, "w").close()
    assert done.wait(10)
    thread.join()


def test_a_replacement_stops_holding_when_the_worker_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(worker_state, "should_stop", 0)  # EX_OK: a warm shutdown was asked for
    recycle.hold(str(tmp_path / "c"), 0)  # returns


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def deaf_sleeper() -> subprocess.Popen[bytes]:
    """A sleeper that ignores SIGTERM (an old process that has not stopped consuming yet), once
    it says so. Not SIGSTOP: a SIGTERM left at its default action kills a stopped process at
    once, and the handover then saw it gone (released) a moment later, now and then."""
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('deaf', flush=True); "
                             "time.sleep(60)"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"deaf\n"
    return proc


def test_the_handover_stops_the_old_process_once_the_new_is_ready_and_lets_it_go_once_released(tmp_path):
    old, new = sleeper(), sleeper()
    try:
        old_files, new_files = str(tmp_path / "c.1"), str(tmp_path / "c.2")
        handover = recycle.Handover()
        open(old_files + recycle.RECYCLE, "w").write("it ran 3 tasks")
        assert handover.asked(old, old_files) == "it ran 3 tasks"
        handover.begin(old, old_files, old_files + ".tasks", "it ran 3 tasks")
        assert handover.asked(old, old_files) is None, "an outgoing process asked again"
        assert handover.holding() and handover.recycles == 1
        handover.advance(new, new_files, 1.0)
        assert old.poll() is None, "the old process was stopped before its replacement was ready"
        open(new_files + recycle.READY, "w").close()
        handover.advance(new, new_files, 2.0, may_stop=False)
        assert old.poll() is None, "stopped while another CPU was between two consumers"
        handover.advance(new, new_files, 3.0)
        assert old.wait(10) == -signal.SIGTERM
        assert handover.gap
        handover.advance(new, new_files, 3.1)
        assert os.path.exists(new_files + recycle.GO), "not let go once the old process is gone"
        assert not handover.gap
        assert [out.proc for out in handover.exited()] == [old] and not handover.outgoing
    finally:
        for proc in (old, new):
            proc.kill()
            proc.wait()


def test_a_replacement_is_let_go_when_the_old_process_released_its_consumer(tmp_path):
    old, new = deaf_sleeper(), sleeper()  # the old one ignores its SIGTERM for now
    try:
        old_files, new_files = str(tmp_path / "c.1"), str(tmp_path / "c.2")
        handover = recycle.Handover()
        handover.begin(old, old_files, old_files + ".tasks", "why")
        open(new_files + recycle.READY, "w").close()
        handover.advance(new, new_files, 1.0)
        handover.advance(new, new_files, 2.0)
        assert not os.path.exists(new_files + recycle.GO)
        open(old_files + recycle.RELEASED, "w").close()
        handover.advance(new, new_files, 3.0)
        assert os.path.exists(new_files + recycle.GO)
        assert handover.alive(), "the old process still drains"
    finally:
        for proc in (old, new):
            proc.kill()
            proc.wait()


def test_a_replacement_is_let_go_after_release_wait_if_the_old_process_is_wedged(tmp_path):
    old, new = deaf_sleeper(), sleeper()
    try:
        new_files = str(tmp_path / "c.2")
        handover = recycle.Handover()
        handover.begin(old, str(tmp_path / "c.1"), "", "why")
        open(new_files + recycle.READY, "w").close()
        handover.advance(new, new_files, 1.0)
        handover.advance(new, new_files, 1.0 + recycle.RELEASE_WAIT)
        assert not os.path.exists(new_files + recycle.GO)
        handover.advance(new, new_files, 1.1 + recycle.RELEASE_WAIT)
        assert os.path.exists(new_files + recycle.GO)
    finally:
        for proc in (old, new):
            proc.kill()
            proc.wait()
