"""The cmwq Dramatiq worker on real brokers, Redis (database 8) and RabbitMQ: what a stop finishes,
acks and requeues; and the launcher as users start it (``python -m cmwq_exec.dramatiq``): overlap
of waiting messages, the metrics ``cmwq-exec top`` reads, SIGTERM's graceful shutdown, bad options."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RABBITMQ_URL, REDIS_URL
from helpers import wait_for

import cmwq_exec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.celery
def test_stop_finishes_the_running_message_and_requeues_the_prefetched(broker: Any,
                                                                       queue_name: str) -> None:
    """Dramatiq's stop, kept: the message running when stop() is called finishes and is acked; the
    messages the consumer had prefetched into the work queue and no link had taken are requeued,
    not run; a second worker runs each of them once (on Redis, without the requeue they would wait
    for the dead worker's heartbeat to time out, past the join's timeout)."""
    import dramatiq

    from cmwq_exec.dramatiq import Worker

    release, ran = threading.Event(), []

    @dramatiq.actor(queue_name=queue_name, max_retries=0)
    def held() -> None:
        with cmwq_exec.blocking():
            release.wait(30)
        ran.append("held")

    @dramatiq.actor(queue_name=queue_name, max_retries=0)
    def quick(i: int) -> None:
        ran.append(i)

    worker = Worker(broker, worker_timeout=100)
    worker.start()
    held.send()
    wait_for("the held message to run", lambda: worker.stats()["running"] == 1, timeout=30)
    worker.workers[0].pause()  # the chain takes nothing more; the consumer goes on prefetching
    wait_for("the chain to hold", lambda: worker.stats()["paused"], timeout=30)
    for i in range(3):
        quick.send(i)
    wait_for("three messages in the work queue", lambda: worker.work_queue.qsize() == 3, timeout=30)
    stopping = threading.Thread(target=worker.stop, kwargs={"timeout": 30_000})
    stopping.start()
    release.set()
    stopping.join(60)
    assert not stopping.is_alive()
    assert ran == ["held"]
    second = Worker(broker, worker_timeout=100)
    second.start()
    try:
        broker.join(queue_name, timeout=30_000)
        second.join()
    finally:
        second.stop()
    assert ran[0] == "held" and sorted(ran[1:]) == [0, 1, 2]


APP = """
import os
import time

import dramatiq
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

import cmwq_exec

if os.environ["DQ_BROKER"] == "redis":
    broker = RedisBroker(url=os.environ["DQ_REDIS"])
else:
    broker = RabbitmqBroker(url=os.environ["DQ_RABBITMQ"])
dramatiq.set_broker(broker)
log = redis.Redis.from_url(os.environ["DQ_REDIS"])
KEY = os.environ["DQ_QUEUE"]


@dramatiq.actor(queue_name=KEY, max_retries=0)
def meet(n):
    log.incr(KEY + ":started")
    deadline = time.monotonic() + 60
    while int(log.get(KEY + ":started")) < n and time.monotonic() < deadline:
        with cmwq_exec.blocking():
            time.sleep(0.01)
    if int(log.get(KEY + ":started")) >= n:
        log.incr(KEY + ":met")


@dramatiq.actor(queue_name=KEY, max_retries=0)
def hold(i):
    log.incr(KEY + ":started")
    while not log.exists(KEY + ":release"):
        with cmwq_exec.blocking():
            time.sleep(0.01)
    log.rpush(KEY + ":done", i)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def app(tmp_path: Path, broker: Any, queue_name: str) -> Iterator[Any]:
    """The app module in a directory of its own, imported here too (on the test's broker); its
    Redis keys are deleted after."""
    import importlib

    import redis

    (tmp_path / "dqapp.py").write_text(APP)
    env = {"DQ_BROKER": broker.kind, "DQ_REDIS": REDIS_URL, "DQ_RABBITMQ": RABBITMQ_URL,
           "DQ_QUEUE": queue_name}
    os.environ.update(env)
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("dqapp", None)
    module = importlib.import_module("dqapp")
    module.env = dict(os.environ, **env, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    module.cwd = tmp_path
    try:
        yield module
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dqapp", None)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"{queue_name}*"))
        if keys:
            client.delete(*keys)
        for name in env:
            os.environ.pop(name, None)


@pytest.fixture
def start(app: Any) -> Iterator[Any]:
    """Start the launcher with one worker process, in a session of its own; its output lines are
    collected in ``proc.lines``."""
    procs: list[subprocess.Popen[str]] = []

    def run(*options: str, **env: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "cmwq_exec.dramatiq", "dqapp", "--processes", "1",
                                 *options], cwd=app.cwd, env={**app.env, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                                  daemon=True)
        reader.start()
        proc.lines, proc.reader = lines, reader  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the main process and its worker process
        proc.wait(timeout=30)
        proc.reader.join(30)  # type: ignore[attr-defined]
        print("".join(proc.lines))  # type: ignore[attr-defined]  # shown if the test failed


def count(app: Any, what: str) -> int:
    return int(app.log.get(f"{app.KEY}:{what}") or 0)


@pytest.mark.slow
@pytest.mark.celery
def test_launcher_overlaps_waiting_messages_and_serves_metrics(app: Any, start: Any) -> None:
    """Thirty messages that each wait until all thirty have started: they all meet only if all
    thirty wait at once (Dramatiq's default of 8 threads could not); the metrics endpoint shows
    the dramatiq workqueue to cmwq-exec top; SIGTERM stops the worker, which exits 0."""
    port = free_port()
    proc = start(CMWQ_METRICS_PORT=str(port))
    for _ in range(30):
        app.meet.send(30)
    wait_for("thirty messages to meet", lambda: count(app, "met") == 30, timeout=90)

    def dramatiq_row() -> Any:
        top = subprocess.run([sys.executable, "-m", "cmwq_exec.cli", "top", "--json", "--url",
                              f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True)
        if top.returncode != 0:
            return None
        rows = json.loads(top.stdout.splitlines()[-1])["workqueues"]
        return next((r for r in rows if r["workqueue"] == "dramatiq" and r["started"] >= 30), None)

    wait_for("the dramatiq workqueue in cmwq-exec top", dramatiq_row, timeout=30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.mark.slow
@pytest.mark.celery
def test_sigterm_finishes_running_messages_and_leaves_the_rest(app: Any, start: Any) -> None:
    """SIGTERM with two messages running and a prefetch of two: the worker waits for both, which
    finish once each, and exits; what it never took stays in the broker, and the next worker runs
    each of those once. (Its consumer may still fetch a message while the stop begins, as
    Dramatiq's own worker threads take prefetched messages until they are stopped: a message it
    started, it finished.)"""
    proc = start(dramatiq_queue_prefetch="2")
    for i in range(5):
        app.hold.send(i)
    wait_for("two messages to run", lambda: count(app, "started") == 2, timeout=60)
    proc.send_signal(signal.SIGTERM)
    # the worker process checks for the signal once a second: release once its stop has begun
    wait_for("the worker's stop", lambda: any("Shutting down..." in line for line in proc.lines),
             timeout=60)
    app.log.set(f"{app.KEY}:release", 1)
    assert proc.wait(timeout=60) == 0
    done = sorted(int(x) for x in app.log.lrange(f"{app.KEY}:done", 0, -1))
    assert len(done) >= 2 and count(app, "started") == len(done), (done, count(app, "started"))
    again = start()
    wait_for("the three others to run", lambda: app.log.llen(f"{app.KEY}:done") == 5, timeout=60)
    assert sorted(int(x) for x in app.log.lrange(f"{app.KEY}:done", 0, -1)) == [0, 1, 2, 3, 4]
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=60) == 0


@pytest.mark.slow
@pytest.mark.parametrize(("options", "message"), [
    (["dqapp", "--threads", "0"], "--threads must be a positive integer, got '0'"),
    (["dqapp", "--processes", "none"], "--processes must be a positive integer, got 'none'"),
    ([], "the following arguments are required: broker"),
])
def test_launcher_refuses_bad_options(options: list[str], message: str) -> None:
    """The launcher's errors name the option and what is allowed, and exit 2 as argparse does."""
    pytest.importorskip("dramatiq")
    done = subprocess.run([sys.executable, "-m", "cmwq_exec.dramatiq", *options], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


@pytest.mark.slow
def test_launcher_refuses_a_bad_metrics_port() -> None:
    pytest.importorskip("dramatiq")
    done = subprocess.run([sys.executable, "-m", "cmwq_exec.dramatiq", "dqapp"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env=dict(os.environ, CMWQ_METRICS_PORT="http"))
    assert done.returncode == 2
    assert "CMWQ_METRICS_PORT must be a TCP port number from 0 to 65535" in done.stderr


