"""The Celery app the integration tests and the benchmark start workers with.

One module serves both sides: the test process builds an app with :func:`make_app` for the broker
and queue of each test, and ``celery -A tests.celery.app worker`` builds the same app from the
environment (``CMWQ_TEST_BROKER``, ``CMWQ_TEST_BACKEND``, ``CMWQ_TEST_QUEUE``, ``CMWQ_TEST_POOL``).

Tasks that matter for "no task lost" record their completion in Redis (``SADD``), so a test checks
every id arrived whatever happened to the worker that first received it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
    worker_process_init,
    worker_process_shutdown,
)

import cmwq_exec

#: The results store and the Redis the record tasks write to (db chosen for these tests).
DEFAULT_BACKEND = "redis://127.0.0.1:6379/14"
POOL = "cmwq_exec.celery:TaskPool"


def make_app(broker: str, backend: str = DEFAULT_BACKEND, queue: str = "celery",
             pool: str | None = None, **conf: Any) -> Celery:
    """An app whose tasks all go to ``queue``. ``pool``: the ``worker_pool`` setting, or None."""
    app = Celery("cmwq_test", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # redis broker: a message of a killed worker comes back after 5 s, looked for every 1 s; a
        # worker SIGKILLed while it held the restore mutex blocks restoring until the mutex expires
        # (kombu's default: 300 s), so let it expire quickly
        broker_transport_options={"visibility_timeout": 5, "unacked_restore_interval": 1,
                                  "unacked_restore_throttle": 1, "unacked_mutex_expire": 2},
        worker_prefetch_multiplier=int(os.environ.get("CMWQ_TEST_PREFETCH", "4")),
    )
    if pool:
        app.conf.worker_pool = pool
    extra = os.environ.get("CMWQ_TEST_CONF")  # JSON settings for the worker side of a test
    if extra:
        app.conf.update(json.loads(extra))
    app.conf.update(conf)
    _register_tasks(app)
    return app


def _redis(app: Celery) -> redis.Redis:
    client = getattr(app, "_cmwq_redis", None)
    if client is None:
        client = app._cmwq_redis = redis.Redis.from_url(app.conf.result_backend)
    return client


_MAX_SCRIPT = """
local old = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > old then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"""


def _register_tasks(app: Celery) -> None:
    @app.task(name="t.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="t.sleep", shared=False)
    def sleep(seconds: float, token: Any = None) -> Any:
        """I/O-bound: tells the pool it blocks, as a well-behaved library call would."""
        with cmwq_exec.blocking():
            time.sleep(seconds)
        return token

    @app.task(name="t.sleep_raw", shared=False)
    def sleep_raw(seconds: float, token: Any = None) -> Any:
        """I/O-bound without the annotation (the watchdog has to notice)."""
        time.sleep(seconds)
        return token

    @app.task(name="t.echo_socket", shared=False)
    def echo_socket(port: int, payload: bytes = b"x") -> int:
        """A real local socket round trip to a server that answers after a delay."""
        with socket.create_connection(("127.0.0.1", port)) as conn, cmwq_exec.blocking():
            conn.sendall(payload)
            return len(conn.recv(64))

    @app.task(name="t.spin", shared=False)
    def spin(iterations: int) -> int:
        """CPU-bound pure Python."""
        total = 0
        for i in range(iterations):
            total += i * i
        return total

    @app.task(name="t.spin_pid", shared=False)
    def spin_pid(seconds: float = 0.02) -> int:
        """CPU-bound for ``seconds``; returns the pid of the process that ran it."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pass
        return os.getpid()

    @app.task(name="t.record", shared=False, acks_late=True, reject_on_worker_lost=True)
    def record(key: str, token: str, seconds: float = 0.0) -> str:
        """Sleep, then SADD ``token`` to ``key`` and count the run in ``key:runs``."""
        if seconds:
            with cmwq_exec.blocking():
                time.sleep(seconds)
        client = _redis(app)
        client.sadd(key, token)
        client.incr(key + ":runs")
        return token

    @app.task(name="t.record_early", shared=False, acks_late=False)
    def record_early(key: str, token: str, seconds: float = 0.0) -> str:
        """Like t.record but acked when it starts: the message is gone once the task runs, so
        nothing but the pool finishing it can bring it to ``key``."""
        client = _redis(app)
        client.sadd(key + ":started", token)
        if seconds:
            with cmwq_exec.blocking():
                time.sleep(seconds)
        client.sadd(key, token)
        client.incr(key + ":runs")
        return token

    @app.task(name="t.gauge", shared=False)
    def gauge(key: str, seconds: float, annotated: bool = True) -> int:
        """Counts how many of these are in flight at once: ``key:peak`` is the most seen together.
        ``annotated``: sleep inside blocking() (the pool may start more tasks meanwhile), else a
        plain sleep, which counts as running."""
        client = _redis(app)
        now = client.incr(key + ":now")
        client.eval(_MAX_SCRIPT, 1, key + ":peak", now)
        try:
            if annotated:
                with cmwq_exec.blocking():
                    time.sleep(seconds)
            else:
                time.sleep(seconds)
        finally:
            client.decr(key + ":now")
        return now

    @app.task(name="t.soft_limited", shared=False)
    def soft_limited(seconds: float) -> str:
        """Polls in short sleeps so the soft limit lands promptly; reports that it caught it."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                time.sleep(0.02)
        except SoftTimeLimitExceeded:
            return "soft-limit-caught"
        return "finished"

    @app.task(name="t.spin_until", shared=False)
    def spin_until(seconds: float, key: str | None = None) -> str:
        """CPU-bound loop for ``seconds``; marks ``key`` unwound if interrupted by anything."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                pass
        finally:
            if key:
                _redis(app).set(key + ":unwound", "1")
        return "finished"

    @app.task(name="t.long", shared=False, bind=True)
    def long(self: Any, key: str, seconds: float) -> str:
        """Marks ``key:started``, sleeps in short steps; ``key:finished`` only if it ran out, and
        ``key:unwound`` whenever it stops (a terminate lands here)."""
        client = _redis(app)
        client.set(key + ":started", self.request.id)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                with cmwq_exec.blocking():
                    time.sleep(0.02)
            client.set(key + ":finished", "1")
        finally:
            client.set(key + ":unwound", "1")
        return "finished"

    @app.task(name="t.stubborn", shared=False)
    def stubborn(key: str, seconds: float) -> str:
        """Ignores every interruption (swallows BaseException) and runs for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with cmwq_exec.blocking():
                    time.sleep(0.02)
            except BaseException:  # noqa: BLE001 - the point of this task
                _redis(app).incr(key + ":ignored")
        _redis(app).set(key + ":done", "1")
        return "stubborn-finished"

    @app.task(name="t.where", shared=False)
    def where(key: str, token: str, seconds: float = 0.0) -> dict[str, Any]:
        """Note when it started and in which process, sleep ``seconds``, then SADD ``token`` to
        ``key`` and count the run in ``key:runs``; returns the start, the pid and the child index."""
        started = time.time()
        if seconds:
            with cmwq_exec.blocking():
                time.sleep(seconds)
        client = _redis(app)
        client.sadd(key, token)
        client.incr(key + ":runs")
        return {"start": started, "pid": os.getpid(), "child": os.environ.get("CMWQ_CHILD")}

    @app.task(name="t.hog", shared=False)
    def hog(mib: int) -> int:
        """Touch ``mib`` MiB of memory (the process's resident set grows by that), let it go; returns
        the pid."""
        block = bytearray(mib * 1024 * 1024)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        del block
        return os.getpid()

    # -- the benchmark's tasks: no result stored, completion counted in Redis -----------------

    @app.task(name="b.io", shared=False, ignore_result=True)
    def bench_io(key: str, seconds: float) -> None:
        """I/O-bound: sleeps, saying so (a no-op outside the cmwq pool)."""
        with cmwq_exec.blocking():
            time.sleep(seconds)
        _redis(app).incr(key)

    @app.task(name="b.http", shared=False, ignore_result=True)
    def bench_http(key: str, url: str) -> None:
        """I/O-bound as most task code is: a GET through urllib, not annotated with blocking()."""
        with urllib.request.urlopen(url, timeout=60) as answer:
            answer.read()
        _redis(app).incr(key)

    @app.task(name="b.cpu", shared=False, ignore_result=True)
    def bench_cpu(key: str, iterations: int) -> None:
        """CPU-bound pure Python."""
        total = 0
        for i in range(iterations):
            total += i * i
        _redis(app).incr(key)

    @app.task(name="t.current_app", shared=False)
    def current_app_main() -> str:
        """The name of the app the task body sees as ``celery.current_app``."""
        from celery import current_app

        return current_app.main

    @app.task(name="t.retry_then", shared=False, bind=True)
    def retry_then(self: Any, key: str, failures: int) -> int:
        """Retries itself ``failures`` times (``self.retry``), then returns the number of runs."""
        runs = _redis(app).incr(key + ":tries")
        if runs <= failures:
            raise self.retry(countdown=0.1, max_retries=5)
        return runs

    @app.task(name="t.autoretry", shared=False, autoretry_for=(ValueError,),
              retry_kwargs={"max_retries": 2, "countdown": 0.1})
    def autoretry(key: str, failures: int) -> int:
        """Raises ValueError ``failures`` times (retried at most twice), then returns the runs."""
        runs = _redis(app).incr(key + ":tries")
        if runs <= failures:
            raise ValueError(f"run {runs}")
        return runs

    class ClassBasedAutoRetry(app.Task):
        """A class-based task that autoretries once (Celery's own suite has one like it)."""

        name = "t.class_autoretry"
        autoretry_for = (ValueError,)
        retry_kwargs = {"max_retries": 1, "countdown": 0.1}

        def run(self) -> int:
            if self.request.retries:
                return self.request.retries
            raise ValueError("first run")

    app.register_task(ClassBasedAutoRetry())

    @app.task(name="t.reject_once", shared=False, acks_late=True)
    def reject_once(key: str) -> int:
        """Rejects its first delivery with requeue; returns the number of deliveries."""
        deliveries = _redis(app).incr(key + ":deliveries")
        if deliveries == 1:
            raise Reject("first delivery", requeue=True)
        return deliveries

    @app.task(name="t.timeout_once", shared=False, acks_late=True, acks_on_failure_or_timeout=False)
    def timeout_once(key: str) -> int:
        """Spins past its hard limit on the first run; returns the number of runs."""
        runs = _redis(app).incr(key + ":runs")
        if runs == 1:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.02)
        return runs

    @app.task(name="t.timeout_acked", shared=False, acks_late=True)
    def timeout_acked(key: str) -> int:
        """Counts its runs and spins past any hard limit (acks_on_failure_or_timeout: the default)."""
        runs = _redis(app).incr(key + ":runs")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.02)
        return runs

    @app.task(name="t.fail_late", shared=False, acks_late=True)
    def fail_late(key: str) -> None:
        _redis(app).incr(key + ":runs")
        raise ValueError("late failure")

    @app.task(name="t.fail", shared=False)
    def fail(message: str) -> None:
        raise ValueError(message)

    @app.task(name="t.no_result", shared=False, ignore_result=True)
    def no_result(key: str, token: str) -> str:
        _redis(app).sadd(key, token)
        return token

    @app.task(name="t.rate_limited", shared=False, rate_limit="4/s")
    def rate_limited(key: str) -> None:
        _redis(app).rpush(key, time.time())

    @app.task(name="t.soft_in_blocking", shared=False)
    def soft_in_blocking(after: float) -> int:
        """Enters and leaves blocking() in a tight loop, so the soft limit most likely lands in its
        enter or exit; catches it and goes on for ``after`` seconds more (however late a busy
        machine delivers the limit: up to 60 s). Returns how often it caught it.

        The tight loop is inside the ``try``, its test and its jump back included: the interpreter
        raises an asynchronous exception at a loop's jump back too, and a jump back outside the
        ``try`` would let the limit escape the task (it did, once, in CI)."""
        give_up = time.monotonic() + 60
        deadline = give_up
        caught = 0
        while True:  # jumps back only after a limit was caught: at most one lands per task
            try:
                while True:
                    if time.monotonic() >= deadline:
                        return caught
                    with cmwq_exec.blocking():
                        pass
            except SoftTimeLimitExceeded:
                caught += 1
                deadline = min(give_up, time.monotonic() + after)

    @app.task(name="t.sleep_state", shared=False)
    def sleep_state() -> dict[str, Any]:
        """The concurrency-management state of the pool this task runs on, seen from inside it:
        nr_running (this task counts), and the workers left flagged SLEEPING or at a sleep depth."""
        from cmwq_exec.core.worker import SLEEPING, current_worker

        me = current_worker()
        assert me is not None
        pool = me.pool
        with pool.lock:
            return {"nr_running": pool.nr_running, "workers": len(pool.workers),
                    "sleep_state_left": [repr(w) for w in pool.workers
                                         if w.flags & SLEEPING or w.sleep_depth]}

    @app.task(name="t.record_plain", shared=False, acks_late=False)
    def record_plain(key: str, token: str, seconds: float) -> str:
        """Note when it started (``key:started``, a sorted set scored by the wall clock), sleep
        without saying so (it counts as running), then SADD ``token`` to ``key`` and count the run
        in ``key:runs``."""
        client = _redis(app)
        client.zadd(key + ":started", {token: time.time()})
        time.sleep(seconds)
        client.sadd(key, token)
        client.incr(key + ":runs")
        return token

    @app.task(name="t.thread_count", shared=False)
    def thread_count() -> int:
        import threading

        return threading.active_count()


def revoked_key(task_id: str) -> str:
    """The Redis list of the ``task_revoked`` signals a worker sent for ``task_id``."""
    return f"cmwq-test:revoked:{task_id}"


@task_revoked.connect
def _record_revoked(sender: Any = None, request: Any = None, terminated: Any = None, signum: Any = None,
                    expired: Any = None, **_: Any) -> None:
    """Record every ``task_revoked`` signal (worker side), so a test sees that it was sent, how
    often, and with what."""
    client = _redis(sender.app)
    signal = {"terminated": bool(terminated), "expired": bool(expired),
              "signum": int(signum) if signum else None}
    client.rpush(revoked_key(request.id), json.dumps(signal))
    client.expire(revoked_key(request.id), 600)


def signals_key(task_id: str) -> str:
    """The Redis list of the task signals a worker sent for ``task_id``, in order."""
    return f"cmwq-test:signals:{task_id}"


#: Tasks whose signals are not recorded, besides the benchmark's (``b.``): t.soft_in_blocking's soft
#: limit must land in its own code. Celery's Signal.send logs and drops an exception raised in a
#: receiver, so a limit landing in the prerun recorder's Redis round trip (prefork's signal can too)
#: would be lost, and the task would report it never caught one.
UNRECORDED = {"t.soft_in_blocking"}


def _recorder(name: str) -> Any:
    def record(sender: Any = None, task_id: str | None = None, request: Any = None, **_: Any) -> None:
        task_name = getattr(sender, "name", "")
        if task_name.startswith("b.") or task_name in UNRECORDED:
            return  # the benchmark's tasks (one Redis INCR each, nothing else), and the above
        task_id = task_id or getattr(request, "id", None)
        if task_id is None:  # task_success sends only the result; the task knows its request
            task_id = sender.request.id
        client = _redis(sender.app)
        client.rpush(signals_key(task_id), json.dumps({"signal": name, "time": time.time()}))
        client.expire(signals_key(task_id), 600)
    return record


_SIGNAL_RECORDERS = {name: _recorder(name) for name in ("prerun", "postrun", "success", "failure", "retry")}
for _signal, _name in ((task_prerun, "prerun"), (task_postrun, "postrun"), (task_success, "success"),
                       (task_failure, "failure"), (task_retry, "retry")):
    _signal.connect(_SIGNAL_RECORDERS[_name])


def process_init_key(hostname: str) -> str:
    """The Redis list of the pids that sent ``worker_process_init`` for worker ``hostname``."""
    return f"cmwq-test:process-init:{hostname}"


@worker_process_init.connect
def _record_process_init(sender: Any = None, **_: Any) -> None:
    if sender is None:  # a pool made by a test, not by a worker
        return
    client = redis.Redis.from_url(os.environ.get("CMWQ_TEST_BACKEND", DEFAULT_BACKEND))
    client.rpush(process_init_key(sender), os.getpid())
    client.expire(process_init_key(sender), 600)


def process_shutdown_key(hostname: str) -> str:
    """The Redis list of the pids that sent ``worker_process_shutdown`` for worker ``hostname``."""
    return f"cmwq-test:process-shutdown:{hostname}"


@worker_process_shutdown.connect
def _record_process_shutdown(sender: Any = None, pid: Any = None, **_: Any) -> None:
    if sender is None:
        return
    client = redis.Redis.from_url(os.environ.get("CMWQ_TEST_BACKEND", DEFAULT_BACKEND))
    client.rpush(process_shutdown_key(sender), pid if pid is not None else os.getpid())
    client.expire(process_shutdown_key(sender), 600)


#: The app ``celery -A tests.celery.app worker`` runs.
app = make_app(
    os.environ.get("CMWQ_TEST_BROKER", "redis://127.0.0.1:6379/13"),
    os.environ.get("CMWQ_TEST_BACKEND", DEFAULT_BACKEND),
    os.environ.get("CMWQ_TEST_QUEUE", "celery"),
    os.environ.get("CMWQ_TEST_POOL") or None,
)
