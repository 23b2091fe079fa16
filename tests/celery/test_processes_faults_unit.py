"""Processes mode's faults without a worker: the ledger of started tasks, recording a dead child's
tasks, configuration errors and crash loops, and a metrics endpoint that a stuck child or a burst
of scrapes cannot stall (tests/celery/test_processes_faults.py runs them with real workers)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states
from celery.exceptions import ImproperlyConfigured, WorkerLostError

from cmwq_exec import celery_process_ledger as ledger
from cmwq_exec import celery_process_metrics as pm
from cmwq_exec import celery_processes as cp

CELERY = "/venv/bin/celery"


def supervisor(count: int = 1) -> cp.Supervisor:
    return cp.Supervisor("w@h", count, argv=[CELERY, "-A", "p", "worker"])


# -- the ledger ----------------------------------------------------------------------------------


def record(task_id: str) -> bytes:
    return json.dumps({"id": task_id, "task": "t.x", "store": True}).encode()


def test_the_ledger_holds_the_tasks_started_and_not_finished(tmp_path):
    book = ledger.Ledger(str(tmp_path / "tasks"))
    for i in range(5):
        book.started(f"id{i}", record(f"id{i}"))
    book.finished("id1")
    book.finished("id3")
    book.finished("never-started")
    assert [r["id"] for r in ledger.read_ledger(book.path)] == ["id0", "id2", "id4"]
    assert ledger.read_ledger(str(tmp_path / "none")) == []


def test_a_line_that_is_not_whole_is_skipped(tmp_path):
    path = tmp_path / "tasks"
    path.write_bytes(b'+{"id":"a","task":"t"}\n+{"id":"b","task":"t"}\n-"a"\n+{"id":"c","ta')
    assert [r["id"] for r in ledger.read_ledger(str(path))] == ["b"]


def test_a_compacted_ledger_keeps_only_the_running_tasks(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "COMPACT_AT", 2000)
    book = ledger.Ledger(str(tmp_path / "tasks"))
    for i in range(300):
        book.started(f"id{i}", record(f"id{i}"))
        if i % 7:
            book.finished(f"id{i}")
    assert os.path.getsize(book.path) < 2000 + 100, "the file was never compacted"
    assert [r["id"] for r in ledger.read_ledger(book.path)] == [f"id{i}" for i in range(0, 300, 7)]


def test_a_child_killed_while_writing_leaves_a_ledger_of_its_running_tasks(tmp_path):
    """Four threads start and end tasks as fast as they can; SIGKILL at some moment: the ledger
    read afterwards holds exactly the tasks the process had started and not finished (each thread
    prints its ids as it goes, flushed before the ledger hears of them)."""
    path = str(tmp_path / "tasks")
    code = (
        "import os, sys, threading\n"
        "from cmwq_exec.celery_process_ledger import Ledger\n"
        f"book = Ledger({path!r})\n"
        "lock = threading.Lock()\n"
        "def run(t):\n"
        "    for i in range(10**9):\n"
        "        tid = f'{t}-{i}'\n"
        "        book.started(tid, ('{\"id\":\"%s\"}' % tid).encode())\n"
        "        if i % 3 == 0:\n"
        "            continue\n"
        "        with lock:\n"
        "            os.write(1, f'{tid}\\n'.encode())\n"
        "            book.finished(tid)\n"
        "for t in range(4):\n"
        "    threading.Thread(target=run, args=(t,), daemon=True).start()\n"
        "threading.Event().wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.stdout is not None
    for _ in range(20000):  # let it run through a few compactions' worth of lines
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    rest, _ = proc.communicate()
    running = {r["id"] for r in ledger.read_ledger(path)}
    assert running, "nothing was running when the process died: nothing tested"
    started: dict[str, list[int]] = {}
    for tid in running:
        thread, number = tid.split("-")
        started.setdefault(thread, []).append(int(number))
    printed = set(rest.decode().split())
    for thread, numbers in started.items():
        last = max(numbers)  # the task the kill may have caught between its start and its end
        # every third task of a thread never finishes: each one it started is kept, through every
        # compaction of the file; any other task is kept only if the kill came before its end
        assert {n for n in numbers if n % 3 == 0} == set(range(0, last + 1, 3)), thread
        assert not [n for n in numbers if n % 3 and n != last], thread
        assert not {f"{thread}-{n}" for n in numbers if n % 3 == 0} & printed


def decoded(record: bytes | None) -> dict[str, Any]:
    assert record is not None
    value = json.loads(record)
    assert isinstance(value, dict)
    return value


def celery_request(app: Celery, name: str = "t.x", cls: type[Any] | None = None, **options: Any) -> Any:
    """Celery's worker Request for a message of task ``name`` (``options``: as_task_v2's, e.g.
    group_id, chord), built the way the consumer builds it."""
    from celery.worker.request import Request

    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, name, args=(), kwargs={}, **options)

    class Received:  # what Request reads of kombu's Message
        headers, properties, payload = message.headers, message.properties, message.body
        body, content_type, content_encoding = message.body, "application/json", "utf-8"
        delivery_info = {"exchange": "", "routing_key": "celery"}

    return (cls or Request)(Received(), app=app, task=app.tasks[name])


@pytest.fixture
def tasks_app() -> Iterator[Celery]:
    app = Celery("cmwq_ledger", broker="memory://", backend="cache+memory://", set_as_current=False)

    def x() -> None:
        pass

    app.task(name="t.x", shared=False)(x)
    app.task(name="t.late", shared=False, acks_late=True)(x)
    app.task(name="t.ignored", shared=False, ignore_result=True)(x)
    yield app
    app.close()


def test_a_task_with_acks_late_is_not_recorded(tasks_app):
    assert ledger.request_record(celery_request(tasks_app, "t.late")) is None
    request = celery_request(tasks_app, group_id="g", group_index=2, reply_to="q")
    kept = decoded(ledger.request_record(request))
    assert kept["id"] == request.id and kept["task"] == "t.x" and kept["store"] is True
    assert kept["group"] == "g" and kept["group_index"] == 2 and kept["reply_to"] == "q"


def test_a_task_whose_result_is_ignored_is_recorded_without_storing(tasks_app):
    assert decoded(ledger.request_record(celery_request(tasks_app, "t.ignored")))["store"] is False
    assert decoded(ledger.request_record(celery_request(tasks_app, ignore_result=True)))["store"] is False


def test_the_chord_and_errbacks_of_the_message_body_are_kept(tasks_app):
    chord = {"task": "t.x", "args": [], "kwargs": {}, "options": {}, "subtask_type": None}
    request = celery_request(tasks_app, chord=chord, errbacks=[chord], group_id="g")
    kept = decoded(ledger.request_record(request))
    assert kept["chord"] == chord and kept["errbacks"] == [chord] and kept["group"] == "g"


def test_a_request_field_that_is_not_json_leaves_only_what_identifies_the_task(tasks_app):
    request = celery_request(tasks_app, chord=object(), group_id="g")
    assert decoded(ledger.request_record(request)) == {"id": request.id, "task": "t.x", "store": True}


def test_a_task_is_in_the_ledger_before_its_accept_acks_it(tasks_app, tmp_path):
    """The accept callback (Request.on_accepted) acks a task not acks_late, on the consumer's
    thread, while the task starts on its own: a child killed right after the ack must have the
    task in its ledger already, or nothing ever reports it (PENDING for ever). Its end is written
    once its call returns."""
    from celery.worker.request import Request

    from cmwq_exec.celery import TaskPool

    path = str(tmp_path / "tasks")
    seen: dict[str, list[str]] = {}
    release = threading.Event()

    class Acking(Request):
        def on_accepted(self, pid: Any, time_accepted: float) -> None:  # reads the ledger as a
            seen[self.id] = [r["id"] for r in ledger.read_ledger(path)]  # kill at the ack would

    requests = [celery_request(tasks_app, cls=Acking) for _ in range(3)]
    pool = TaskPool(limit=3)
    pool.start()
    pool._ledger = ledger.keep_ledger(path)  # what a child's on_start sets (become_child)
    try:
        done = threading.Semaphore(0)
        for request in requests:
            pool.apply_async(lambda: release.wait(10), accept_callback=request.on_accepted,
                             callback=lambda _: done.release())
        for _ in range(50):
            if len(seen) == len(requests):
                break
            threading.Event().wait(0.1)
        for request in requests:
            assert request.id in seen.get(request.id, []), (request.id, seen)
        release.set()
        for _ in requests:
            assert done.acquire(timeout=10)
        assert ledger.read_ledger(path) == []  # each call returned: its end is written
    finally:
        release.set()
        pool.stop()


def test_the_error_is_worded_as_prefork_words_it():
    error = ledger.lost_error(-9, "0 (w.0@h, pid 42)")
    assert isinstance(error, WorkerLostError)
    assert str(error) == "Worker exited prematurely: signal 9 (SIGKILL) Child: 0 (w.0@h, pid 42)."
    assert str(ledger.lost_error(3, "1")) == "Worker exited prematurely: exitcode 3 Child: 1."


@pytest.fixture
def backend_app() -> Iterator[Celery]:
    import redis

    try:
        redis.Redis(socket_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"redis on 127.0.0.1:6379 does not answer PING: {exc}")
    app = Celery("cmwq_lost", broker="memory://", backend="redis://127.0.0.1:6379/14", set_as_current=False)
    app.conf.result_serializer = "json"
    app.conf.accept_content = ["json"]

    def x() -> None:
        pass

    app.task(name="t.x", shared=False)(x)
    yield app
    app.close()


def test_the_tasks_of_a_dead_child_are_recorded_failed_unless_they_stored_an_outcome(backend_app):
    lost, done, ignored = (str(uuid.uuid4()) for _ in range(3))
    backend_app.backend.store_result(done, 7, states.SUCCESS)
    records = [{"id": lost, "task": "t.x", "store": True}, {"id": done, "task": "t.x", "store": True},
               {"id": ignored, "task": "t.x", "store": False}]
    error = ledger.lost_error(-9, "0")
    try:
        assert ledger.report_lost(backend_app, records, error) == 2
        result = backend_app.AsyncResult(lost)
        assert result.state == states.FAILURE
        assert isinstance(result.result, WorkerLostError) and "signal 9 (SIGKILL)" in str(result.result)
        assert backend_app.AsyncResult(done).result == 7
        assert backend_app.AsyncResult(ignored).state == states.PENDING  # errors not stored
    finally:
        for task_id in (lost, done, ignored):
            backend_app.backend.forget(task_id)


# -- configuration errors and crash loops ----------------------------------------------------------


def test_the_supervisor_refuses_a_bad_core_setting_naming_the_variable(monkeypatch):
    monkeypatch.setenv("CMWQ_IDLE_TIMEOUT", "abc")
    with pytest.raises(ImproperlyConfigured, match="CMWQ_IDLE_TIMEOUT='abc'"):
        supervisor()


def test_a_child_with_a_bad_core_setting_exits_with_ex_config(monkeypatch):
    monkeypatch.setenv("CMWQ_IDLE_TIMEOUT", "abc")
    with pytest.raises(SystemExit) as stopped:
        cp.become_child(0, {})
    assert stopped.value.code == cp.EX_CONFIG == 78


def test_a_child_that_exits_with_ex_config_stops_the_worker():
    sup = supervisor()
    child = sup.children[0]
    child.proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({cp.EX_CONFIG})"])
    child.proc.wait()
    try:
        with pytest.raises(cp._StopWorker, match="configuration error") as stopping:
            sup._watch()
        assert isinstance(stopping.value.error, ImproperlyConfigured)
        assert child.respawn_at is None, "a child that cannot be configured was to be started again"
    finally:
        os.rmdir(sup.dir)


def test_a_child_that_keeps_dying_young_stops_the_worker(monkeypatch):
    sup = supervisor()
    child = sup.children[0]
    now = [1000.0]
    monkeypatch.setattr(cp.time, "monotonic", lambda: now[0])
    child.started_at = now[0] - 60.0
    sup._count_death(child, "exitcode 1")  # an old one: no count
    for _ in range(cp.MAX_YOUNG_DEATHS - 1):
        child.started_at = now[0] - 1.0
        sup._count_death(child, "exitcode 1")
    child.started_at = now[0] - 60.0
    sup._count_death(child, "exitcode 1")  # a child that lived long starts the count over
    for _ in range(cp.MAX_YOUNG_DEATHS - 1):
        child.started_at = now[0] - 1.0
        sup._count_death(child, "exitcode 1")
    child.started_at = now[0] - 1.0
    with pytest.raises(cp._StopWorker, match=f"child 0 .* died {cp.MAX_YOUNG_DEATHS} times in a row"):
        sup._count_death(child, "signal 11 (SIGSEGV)")
    os.rmdir(sup.dir)


# -- the metrics endpoint ------------------------------------------------------------------------


class _FakeChild:
    def __init__(self, index: int, port: int) -> None:
        self.index, self.port, self.restarts = index, port, 0

    def alive(self) -> bool:
        return True

    def recycles(self) -> int:
        return 0

    def metrics_port(self) -> int | None:
        return self.port


def _counting_server(body: bytes) -> tuple[http.server.ThreadingHTTPServer, list[int]]:
    hits: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the base class's name
            hits.append(1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hits


def test_a_stuck_child_drops_only_its_samples_and_a_burst_of_scrapes_reads_the_children_once():
    """Child 1 accepts connections and never answers: a scrape still answers, with child 0's
    samples, after the read timeout; scrapes within MAX_AGE of that read do not read again."""
    good, hits = _counting_server(b"# TYPE x gauge\nx 5.0\n")
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(8)
    children = [_FakeChild(0, good.server_address[1]), _FakeChild(1, stuck.getsockname()[1])]
    collector = pm.ChildrenCollector(children, max_age=3600.0, timeout=0.5)
    registry_text = _scrape_text(collector)
    try:
        assert 'x{child="0"} 5.0' in registry_text and 'x{child="1"}' not in registry_text
        for _ in range(20):
            assert 'x{child="0"} 5.0' in _scrape_text(collector)
        assert len(hits) == 1, f"the children were read {len(hits)} times for 21 scrapes"
    finally:
        good.shutdown()
        good.server_close()
        stuck.close()


def _scrape_text(collector: pm.ChildrenCollector) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def listen_backlog(port: int) -> int:
    """The listen backlog of the socket listening on ``port`` (``ss``: Send-Q of a listener)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], check=True, capture_output=True,
                         text=True).stdout.split()
    return int(out[2])


def test_the_endpoint_has_a_listen_backlog_for_a_burst_and_answers_500_scrapes_at_once():
    """Python's servers listen with a backlog of 5: a burst of connections beyond that waits for
    SYN retries or fails while the server is busy."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(pm.ChildrenCollector([]))
    server = pm.serve(0, "127.0.0.1", registry)
    port = server.server_address[1]
    failures: list[BaseException] = []

    def scrape() -> None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as reply:
                assert b"cmwq_celery_children 0.0" in reply.read()
        except BaseException as exc:  # noqa: BLE001 - counted
            failures.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(500)]
    try:
        with open("/proc/sys/net/core/somaxconn") as somaxconn:
            assert listen_backlog(port) == min(pm.REQUEST_QUEUE, int(somaxconn.read()))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        server.shutdown()
        server.server_close()
    assert not failures, f"{len(failures)} of 500 scrapes failed, e.g. {failures[0]!r}"
