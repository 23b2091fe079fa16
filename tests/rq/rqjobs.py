"""Jobs of the RQ worker's tests (a module RQ can import by name, in this process and in a worker's)."""

from __future__ import annotations

import os
import threading
import time

import redis

import cmwq_exec

URL = "redis://127.0.0.1:6379/12"
gate = threading.Event()
inside: list[int] = []


def meet(i: int) -> int:
    """Wait inside blocking() until the gate opens."""
    inside.append(i)
    with cmwq_exec.blocking():
        assert gate.wait(30)
    return i


def detected_sleep() -> bool:
    """A plain time.sleep: whether this job's worker was told it sleeps (see helpers)."""
    from helpers import sleeps_as_its_worker_sees

    return sleeps_as_its_worker_sees()


def spin() -> None:
    while True:
        pass


def hold(key: str) -> str:
    """Count itself in Redis, then wait (in blocking()) until ``key + ':release'`` exists."""
    client = redis.Redis.from_url(URL)
    client.incr(key + ":started")
    while not client.exists(key + ":release"):
        with cmwq_exec.blocking():
            time.sleep(0.01)
    return "released"


def record_stopped(job, connection) -> None:  # noqa: ANN001 - RQ's callback signature
    connection.rpush(job.id + ":stopped-callback", os.getpid())


def where() -> tuple[int, str]:
    """The process and the thread that ran the job."""
    return os.getpid(), threading.current_thread().name
