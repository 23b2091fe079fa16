"""The per-CPU processes mode without a broker: choosing it, the children's command lines, the
respawn pauses and the merged metrics (tests/celery/test_processes.py runs it for real)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from celery.exceptions import ImproperlyConfigured

from cmwq_exec import celery_processes as cp

CELERY = "/venv/bin/celery"


@pytest.mark.parametrize(("setting", "env", "wanted"), [
    (None, {}, 0),
    (None, {"CMWQ_PROCESSES": ""}, 0),
    (None, {"CMWQ_PROCESSES": "0"}, 0),
    (None, {"CMWQ_PROCESSES": "3"}, 3),
    (None, {"CMWQ_PROCESSES": " Auto "}, len(os.sched_getaffinity(0))),
    (2, {"CMWQ_PROCESSES": "5"}, 2),  # the setting wins
    ("auto", {}, len(os.sched_getaffinity(0))),
    (0, {"CMWQ_PROCESSES": "4"}, 0),
    (None, {"CMWQ_PROCESSES": "4", "CMWQ_CHILD": "1"}, 0),  # a child never has children
    ("auto", {"CMWQ_CHILD": "0"}, 0),
])
def test_the_mode_is_read_from_the_setting_then_the_environment(setting, env, wanted):
    assert cp.processes_wanted(setting, env) == wanted


@pytest.mark.parametrize(("setting", "env", "named"), [
    (None, {"CMWQ_PROCESSES": "-1"}, "CMWQ_PROCESSES"),
    (None, {"CMWQ_PROCESSES": "two"}, "CMWQ_PROCESSES"),
    (None, {"CMWQ_PROCESSES": "1.5"}, "CMWQ_PROCESSES"),
    (-2, {}, "cmwq_processes"),
    (True, {}, "cmwq_processes"),
    ("many", {}, "cmwq_processes"),
])
def test_a_bad_value_names_where_it_came_from_and_what_is_allowed(setting, env, named):
    with pytest.raises(ImproperlyConfigured) as info:
        cp.processes_wanted(setting, env)
    message = str(info.value)
    assert named in message
    assert "'auto'" in message and "N >= 1" in message


def test_a_child_is_named_after_the_worker_with_its_index():
    assert cp.child_nodename("w1@host.example", 0) == "w1.0@host.example"
    assert cp.child_nodename("celery@h", 3) == "celery.3@h"


def test_the_child_command_line_replaces_the_name_and_keeps_the_rest():
    argv = ["python3", CELERY, "-A", "proj", "worker", "-P", "custom", "-c", "8", "-n", "w@h",
            "-l", "info", "--autoscale=10,3", "-Q", "a,b"]
    assert cp.child_command(argv, "/py", "w.1@h", 1) == [
        "/py", CELERY, "-A", "proj", "worker", "-P", "custom", "-c", "8", "-l", "info",
        "--autoscale=10,3", "-Q", "a,b", "-n", "w.1@h"]


@pytest.mark.parametrize("name_option",
                         [["-n", "w@h"], ["--hostname", "w@h"], ["--hostname=w@h"], ["-nw@h"], []])
def test_every_spelling_of_the_name_option_is_replaced(name_option):
    argv = ["python", "-m", "celery", "-A", "proj", "worker", *name_option, "-c", "2"]
    command = cp.child_command(argv, "/py", "w.0@h", 0)
    assert command == ["/py", "-m", "celery", "-A", "proj", "worker", "-c", "2", "-n", "w.0@h"]


def test_pidfile_and_detach_stay_with_the_supervisor_beat_with_child_0_statedb_per_child():
    argv = ["py", CELERY, "-A", "proj", "worker", "--pidfile", "/run/w.pid", "--pidfile=/run/x", "-D",
            "--detach", "-B", "--beat", "-S", "/var/state", "--statedb=/var/s2"]
    first = cp.child_command(argv, "/py", "w.0@h", 0)
    second = cp.child_command(argv, "/py", "w.1@h", 1)
    assert first == ["/py", CELERY, "-A", "proj", "worker", "-B", "--beat", "-S", "/var/state.0",
                     "--statedb=/var/s2.0", "-n", "w.0@h"]
    assert second == ["/py", CELERY, "-A", "proj", "worker", "-S", "/var/state.1",
                      "--statedb=/var/s2.1", "-n", "w.1@h"]


def test_an_app_called_worker_is_not_the_subcommand():
    argv = ["py", CELERY, "-A", "worker", "worker", "-c", "1"]
    assert cp.child_command(argv, "/py", "w.0@h", 0) == ["/py", CELERY, "-A", "worker", "worker", "-c", "1",
                                                         "-n", "w.0@h"]


def test_only_the_celery_worker_command_line_can_have_children():
    assert cp.is_worker_command([CELERY, "-A", "proj", "worker", "-c", "2"])
    assert cp.is_worker_command(["/usr/lib/python3/site-packages/celery/__main__.py", "-A", "p", "worker"])
    assert not cp.is_worker_command([CELERY, "-A", "proj", "beat"])
    assert not cp.is_worker_command(["myscript.py", "worker"])
    with pytest.raises(ImproperlyConfigured, match="celery ... worker` command line"):
        cp.Supervisor("w@h", 2, argv=["myscript.py"])
    with pytest.raises(ValueError, match="not a celery worker command line"):
        cp.child_command(["py", CELERY, "beat"], "/py", "w.0@h", 0)


def test_children_are_dealt_the_usable_cpus_in_order():
    supervisor = cp.Supervisor("w@h", 5, argv=[CELERY, "-A", "p", "worker"])
    cpus = sorted(os.sched_getaffinity(0))
    assert [c.cpu for c in supervisor.children] == [cpus[i % len(cpus)] for i in range(5)]
    assert [c.nodename for c in supervisor.children] == [f"w.{i}@h" for i in range(5)]
    os.rmdir(supervisor.dir)


def test_a_child_that_keeps_dying_young_waits_longer_each_time(monkeypatch):
    supervisor = cp.Supervisor("w@h", 1, argv=[CELERY, "-A", "p", "worker"])
    child = supervisor.children[0]
    now = [1000.0]
    monkeypatch.setattr(cp.time, "monotonic", lambda: now[0])
    pauses = []
    for _ in range(7):
        child.started_at = now[0] - 1.0  # died one second after it started
        supervisor._schedule_respawn(child)
        pauses.append(child.respawn_at - now[0])
    assert pauses == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    child.started_at = now[0] - 60.0  # lived a minute: replaced at once, the pause starts over
    supervisor._schedule_respawn(child)
    assert child.respawn_at == now[0] and child.pause == cp.RESPAWN_PAUSE
    os.rmdir(supervisor.dir)


def test_the_supervisor_endpoint_merges_the_children_with_a_child_label(tmp_path):
    """Two real processes serve cmwq metrics on free ports; the collector labels each one's."""
    from prometheus_client import CollectorRegistry, generate_latest

    serve = ("import sys, time\n"
             "from cmwq_exec import metrics\n"
             "server, _ = metrics.start_http_server(0)\n"
             "from cmwq_exec.celery_processes import report_metrics_port\n"
             "report_metrics_port(server.server_port)\n"
             "time.sleep(60)\n")
    supervisor = cp.Supervisor("w@h", 2, argv=[CELERY, "-A", "p", "worker"])
    procs = []
    try:
        for child in supervisor.children:
            env = dict(os.environ, CMWQ_CHILD_STATUS=child.status_path, CMWQ_HOTPLUG="0")
            child.proc = subprocess.Popen([sys.executable, "-c", serve], env=env)
            procs.append(child.proc)
        supervisor.children[1].restarts = 3
        supervisor.children[0].handover.recycles = 2
        import time

        deadline = time.monotonic() + 30
        while any(c.metrics_port() is None for c in supervisor.children):
            assert time.monotonic() < deadline, "the children never reported their metrics ports"
            time.sleep(0.05)
        registry = CollectorRegistry()
        registry.register(cp.ChildrenCollector(supervisor.children))
        text = generate_latest(registry).decode()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert "cmwq_celery_children 2.0" in text
    assert 'cmwq_celery_child_restarts_total{child="1"} 3.0' in text
    assert 'cmwq_celery_child_recycles_total{child="0"} 2.0' in text
    for index in ("0", "1"):
        assert f'cmwq_pool_workers{{child="{index}",' in text


def test_a_child_that_cannot_be_started_is_retried_after_a_growing_pause(monkeypatch):
    supervisor = cp.Supervisor("w@h", 1, argv=[CELERY, "-A", "p", "worker"])
    child = supervisor.children[0]

    def no_process(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(cp.subprocess, "Popen", no_process)
    monkeypatch.setattr(cp.time, "monotonic", lambda: 500.0)
    supervisor._spawn(child)
    first = child.respawn_at - child.started_at
    supervisor._spawn(child)
    second = child.respawn_at - child.started_at
    assert child.proc is None
    assert (first, second) == (1.0, 2.0)
    os.rmdir(supervisor.dir)


def test_pin_threads_pins_every_thread_of_a_process_back_to_its_cpu():
    """What the supervisor does once a second for each child (the kernel widens the mask of a
    thread it moves off an offline CPU): here a subprocess with a second thread, both widened."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two usable CPUs")
    code = ("import threading, time; threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); "
            "print('up', flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) == 2 and all(os.sched_getaffinity(t) == set(cpus) for t in tids)
        assert cp.pin_threads(child.pid, cpus[-1]) == 2
        assert all(os.sched_getaffinity(t) == {cpus[-1]} for t in tids)
        assert cp.pin_threads(child.pid, cpus[-1]) == 0  # nothing left to do
    finally:
        child.kill()
        child.wait()
    assert cp.pin_threads(child.pid, cpus[-1]) == 0  # gone: nothing to pin, no error


def test_a_new_supervisor_removes_the_status_dirs_of_killed_ones(tmp_path, monkeypatch):
    """A supervisor killed with SIGKILL cannot remove its status directory; the next one does, and
    leaves alone those of supervisors that still run and anything else in the directory."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # exited and reaped: no process has this pid (unless reused)
    stale = tmp_path / f"{cp.STATUS_DIR_PREFIX}{dead_pid}-abc"
    stale.mkdir()
    (stale / "child0.port").write_text("4242")
    running = tmp_path / f"{cp.STATUS_DIR_PREFIX}{os.getpid()}-def"
    running.mkdir()
    other = tmp_path / f"{cp.STATUS_DIR_PREFIX}notapid"
    other.mkdir()
    monkeypatch.setattr(cp.tempfile, "tempdir", str(tmp_path))
    supervisor = cp.Supervisor("w@h", 1, argv=[CELERY, "-A", "p", "worker"])
    assert not stale.exists()
    assert running.exists() and other.exists()
    assert os.path.dirname(supervisor.dir) == str(tmp_path)
    assert os.path.basename(supervisor.dir).startswith(f"{cp.STATUS_DIR_PREFIX}{os.getpid()}-")
    os.rmdir(supervisor.dir)
