"""The harness of the Celery integration tests: brokers, waiting, ``celery worker`` processes.

Shared by conftest.py (fixtures), the test modules and benchmarks. Waits poll for a state with a
deadline (``wait_for`` of tests/polling.py), never sleep for one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
for _path in (HERE, HERE.parent):  # app.py here; polling.py, the suite's one wait, in tests/
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from app import DEFAULT_BACKEND, POOL  # noqa: E402
from polling import wait_for  # noqa: E402

CELERY = str(Path(sys.executable).with_name("celery"))

#: db 13 is the Redis broker of these tests, db 14 their results (see app.DEFAULT_BACKEND).
BROKERS = {
    "redis": "redis://127.0.0.1:6379/13",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
}
PORTS = {"redis": 6379, "amqp": 5672}


def broker_problem(kind: str) -> str | None:
    """None if the broker answers, else why not."""
    try:
        with socket.create_connection(("127.0.0.1", PORTS[kind]), timeout=2):
            pass
    except OSError as exc:
        return f"{kind} broker on 127.0.0.1:{PORTS[kind]} is unreachable: {exc}"
    if kind == "redis":
        import redis

        try:
            redis.Redis.from_url(DEFAULT_BACKEND, socket_timeout=2).ping()
        except Exception as exc:  # noqa: BLE001
            return f"redis on 127.0.0.1:6379 does not answer PING: {exc}"
    return None


def worker_cwd() -> Path:
    return HERE


def worker_env(broker: str, queue: str) -> dict[str, str]:
    """The environment a ``celery -A app`` command of a test runs with."""
    environ = dict(os.environ)
    environ.update({
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), environ.get("PYTHONPATH", "")]),
        "CMWQ_TEST_BROKER": broker,
        "CMWQ_TEST_BACKEND": DEFAULT_BACKEND,
        "CMWQ_TEST_QUEUE": queue,
        "PYTHONUNBUFFERED": "1",
    })
    return environ


class Worker:
    """One ``celery worker`` subprocess of the app in app.py, on ``queue``.

    ``via``: "setting" (the cmwq pool through ``worker_pool``), "custom" (the cmwq pool through
    ``-P custom`` + ``CELERY_CUSTOM_WORKER_POOL``) or another pool's name ("threads", "prefork").
    """

    def __init__(self, app: Any, broker: str, queue: str, log: Path, *, concurrency: int | None,
                 via: str, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 loglevel: str = "info") -> None:
        self.app = app
        self.name = f"cmwq-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        self.log = log
        environ = worker_env(broker, queue)
        command = [CELERY, "-A", "app", "worker", "-n", self.name, "-l", loglevel,
                   "--without-mingle", "--without-gossip", "--without-heartbeat"]
        if via == "setting":  # worker_pool = "cmwq_exec.celery:TaskPool"
            environ["CMWQ_TEST_POOL"] = POOL
        elif via == "custom":  # -P custom + CELERY_CUSTOM_WORKER_POOL
            environ["CELERY_CUSTOM_WORKER_POOL"] = POOL
            command += ["-P", "custom"]
        else:
            command += ["-P", via]
        if concurrency is not None:
            command += ["-c", str(concurrency)]
        command += list(args)
        environ.update(env or {})
        self.command = command
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(command, cwd=worker_cwd(), env=environ, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ping(self) -> bool:
        """Whether the worker answers ``inspect ping``."""
        return self.name in self.answering([self.name])

    def answering(self, names: list[str]) -> set[str]:
        """Which of the nodes ``names`` answer ``inspect ping``. A broker connection the test's app
        pooled may have been closed by the broker meanwhile (RabbitMQ resets one it found idle on a
        busy machine); such a ping is a "none yet": the app's connections are dropped and the
        next ping connects afresh."""
        try:
            replies = self.app.control.ping(destination=names, timeout=0.5)
        except self.app.connection_for_write().connection_errors:
            self.app.pool.force_close_all()
            return set()
        return {name for reply in replies for name in reply}

    def wait_ready(self, timeout: float = 30.0) -> Worker:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            return self.ping()

        wait_for(f"worker {self.name} to answer ping\n{self.tail()}", ready, timeout, interval=0.1)
        return self

    def stats(self) -> dict[str, Any]:
        reply = self.app.control.inspect([self.name], timeout=2.0).stats() or {}
        assert self.name in reply, f"no stats from {self.name}: {reply}\n{self.tail()}"
        return reply[self.name]

    def signal(self, signum: int) -> None:
        if self.alive():
            self.proc.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.name} still running after {timeout}s\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL the worker's whole process group: its children too (child processes mode, or be sure),
        also when the worker itself has exited and left some behind."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: started in a new session
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        finally:
            self._log_file.close()

    def tail(self, lines: int = 40) -> str:
        self._log_file.flush()
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- per-CPU child processes (``CMWQ_PROCESSES``): the worker supervises, its children serve --

    def child_pids(self) -> list[int]:
        """The worker process's direct children now (from /proc); [] once it has exited."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as children:
                return [int(pid) for pid in children.read().split()]
        except OSError:
            return []

    def wait_children(self, n: int, timeout: float = 60.0) -> list[str]:
        """Wait until all ``n`` child nodes answer ping; returns their names (see
        :func:`children_names`). Fails at once if the worker exits meanwhile."""
        names = children_names(self, n)

        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            return self.answering(names) >= set(names)

        wait_for(f"the {n} children of {self.name} to answer ping\n{self.tail()}", ready, timeout,
                 interval=0.2)
        return names

    def node_stats(self, name: str) -> dict[str, Any]:
        """``inspect stats`` of node ``name`` (one of this worker's children)."""
        reply = self.app.control.inspect([name], timeout=2.0).stats() or {}
        assert name in reply, f"no stats from {name}: {reply}\n{self.tail()}"
        return reply[name]

    def threads(self) -> int:
        """Threads of the worker process now (from /proc)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        return 0




def children_names(worker: Worker, n: int) -> list[str]:
    """The node names of the ``n`` children of ``worker`` in child processes mode: child ``i`` of
    ``-n {name}@{host}`` is ``{name}.{i}@{host}``."""
    name, _, host = worker.name.partition("@")
    return [f"{name}.{i}@{host}" for i in range(n)]


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (no such process, or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("State:"):
                    return line.split()[1] in ("Z", "X")
    except OSError:
        return True
    return False


def cpus_allowed(pid: int) -> str:
    """``Cpus_allowed_list`` of process ``pid`` (its main thread), e.g. "1" or "0-3"."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"/proc/{pid}/status has no Cpus_allowed_list")


def tcp_connections(pid: int, port: int) -> int:
    """How many TCP connections process ``pid`` has open to remote ``port`` (from /proc)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    except OSError:
        return 0
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                        count += 1
        except OSError:
            continue
    return count
