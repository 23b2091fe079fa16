"""The cmwq Huey consumer as its users start it (``python -m cmwq_exec.huey``), on Redis database 11:
results, overlap of waiting tasks, the metrics ``cmwq-exec top`` reads, and what each shutdown
signal does to running and queued tasks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]

APP = """
import os
import time

import redis
from huey import RedisHuey, signals

import cmwq_exec

huey = RedisHuey(os.environ["HUEY_NAME"], url=os.environ["HUEY_URL"])
log = redis.Redis.from_url(os.environ["HUEY_URL"])
KEY = os.environ["HUEY_NAME"]


@huey.signal(signals.SIGNAL_INTERRUPTED)
def interrupted(signal, task, *args, **kwargs):
    log.rpush(KEY + ":interrupted", task.id)


@huey.task()
def wait(seconds):
    log.incr(KEY + ":started")
    with cmwq_exec.blocking():
        time.sleep(seconds)
    return seconds


@huey.task()
def hold_until_released():
    log.incr(KEY + ":started")
    while not log.exists(KEY + ":release"):
        with cmwq_exec.blocking():
            time.sleep(0.01)
    return "released"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def app(tmp_path: Path, redis_url: str) -> Iterator[Any]:
    """The app module in a directory of its own, imported here too; its keys are deleted after."""
    import importlib

    import redis

    name = f"cmwq-huey-{uuid.uuid4().hex[:10]}"
    (tmp_path / "hueyapp.py").write_text(APP)
    env = dict(os.environ, HUEY_NAME=name, HUEY_URL=redis_url,
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    os.environ.update(HUEY_NAME=name, HUEY_URL=redis_url)
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("hueyapp", None)
    module = importlib.import_module("hueyapp")
    module.env = env
    module.cwd = tmp_path
    try:
        yield module
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("hueyapp", None)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"*{name}*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
def start(app: Any) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def run(*options: str, **env: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "cmwq_exec.huey", "hueyapp.huey", *options],
                                cwd=app.cwd, env={**app.env, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        print(proc.communicate(timeout=30)[0])  # shown if the test failed


def started(app: Any) -> int:
    return int(app.log.get(app.KEY + ":started") or 0)


@pytest.mark.slow
def test_results_overlap_and_metrics(app: Any, start: Any) -> None:
    """Forty tasks that each wait 0.5 s: all started before the first one ends could only happen
    with them overlapping; the metrics endpoint shows the huey workqueue to cmwq-exec top."""
    port = free_port()
    proc = start("-q", CMWQ_METRICS_PORT=str(port))
    results = [app.wait(0.5) for _ in range(40)]
    wait_for("forty tasks started", lambda: started(app) == 40, timeout=60)
    assert sum(r.get(blocking=True, timeout=60) for r in results) == 20.0
    assert started(app) == 40

    def huey_row() -> Any:
        top = subprocess.run([sys.executable, "-m", "cmwq_exec.cli", "top", "--json", "--url",
                              f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True)
        if top.returncode != 0:
            return None
        rows = json.loads(top.stdout.splitlines()[-1])["workqueues"]
        return next((row for row in rows if row["workqueue"] == "huey" and row["completed"] >= 40), None)

    row = wait_for("the huey workqueue in cmwq-exec top", huey_row, timeout=30)
    assert row["started"] >= 40
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0


@pytest.mark.slow
def test_graceful_signal_finishes_running_and_leaves_queued(app: Any, start: Any) -> None:
    """SIGINT: the running task finishes and its result is stored; the consumer exits; a task
    enqueued after it stopped dequeuing is still in the queue for the next consumer."""
    proc = start("-q", "-w", "1")
    held = app.hold_until_released()
    wait_for("the task to start", lambda: started(app) == 1, timeout=60)
    proc.send_signal(signal.SIGINT)
    later = app.wait(0)
    app.log.set(app.KEY + ":release", 1)
    assert proc.wait(timeout=60) == 0
    assert held.get(blocking=True, timeout=10) == "released"
    # a dispatcher already blocked in BRPOP when the signal came may take one more and run it (as
    # Huey's own worker does); otherwise it waits in the queue for the next consumer, not run
    if app.huey.pending_count() == 1:
        assert later.get() is None
    else:
        assert app.huey.pending_count() == 0 and later.get(blocking=True, timeout=10) == 0
    assert app.log.lrange(app.KEY + ":interrupted", 0, -1) == []


@pytest.mark.slow
def test_interrupt_signal_interrupts_running_tasks(app: Any, start: Any) -> None:
    """SIGTERM: the running task gets KeyboardInterrupt, Huey reports it interrupted (no result),
    and the consumer exits."""
    proc = start("-q")
    held = app.hold_until_released()
    wait_for("the task to start", lambda: started(app) == 1, timeout=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert app.log.lrange(app.KEY + ":interrupted", 0, -1) == [held.id.encode()]
    assert held.get() is None


@pytest.mark.parametrize(("options", "message"), [
    (["-k", "process"], "only 'thread' runs on cmwq"),
    (["-w", "0"], "must be at least 1"),
    ([], "expected one argument"),
])
def test_launcher_refuses_bad_options(options: list[str], message: str) -> None:
    """The launcher's errors name the option and what is allowed, and exit 2 as optparse does."""
    pytest.importorskip("huey")
    args = [*options, "hueyapp.huey"] if options else []
    done = subprocess.run([sys.executable, "-m", "cmwq_exec.huey", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


def test_launcher_refuses_a_bad_metrics_port() -> None:
    pytest.importorskip("huey")
    done = subprocess.run([sys.executable, "-m", "cmwq_exec.huey", "hueyapp.huey"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env=dict(os.environ, CMWQ_METRICS_PORT="http"))
    assert done.returncode == 2
    assert "CMWQ_METRICS_PORT must be a TCP port number from 0 to 65535" in done.stderr
