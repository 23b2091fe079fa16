"""cmwq_exec.rq.Worker on Redis database 12: jobs that wait overlap, timeouts and stop commands reach
a job's thread, and ``rq worker -w cmwq_exec.rq.Worker`` keeps RQ's warm and cold shutdowns and
serves the metrics ``cmwq-exec top`` reads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

import cmwq_exec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

pytestmark = pytest.mark.slow  # every test here needs Redis

rq = pytest.importorskip("rq")
import rqjobs  # noqa: E402
from rq.command import send_stop_job_command  # noqa: E402
from rq.job import JobStatus  # noqa: E402

from cmwq_exec.rq import Worker  # noqa: E402


def work_in_burst(queue: Any, connection: Any) -> Worker:
    worker = Worker([queue], connection=connection)
    worker.work(burst=True, logging_level="WARNING")
    return worker


def beside(what: str, predicate: Any, then: Any) -> threading.Thread:
    """On a side thread: wait for ``predicate``, then call ``then`` (the worker has the main thread)."""

    def run() -> None:
        wait_for(what, predicate, timeout=60)
        then()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_waiting_jobs_overlap(queue: Any, connection: Any) -> None:
    """Ten jobs asleep in blocking() at once: RQ's worker, one job at a time, would hold one."""
    rqjobs.gate.clear()
    rqjobs.inside.clear()
    jobs = [queue.enqueue(rqjobs.meet, i) for i in range(10)]
    side = beside("ten jobs waiting at once", lambda: len(rqjobs.inside) == 10, rqjobs.gate.set)
    work_in_burst(queue, connection)
    side.join(5)
    assert [job.latest_result().return_value for job in jobs] == list(range(10))


def test_with_detection_an_unannotated_wait_in_a_job_is_a_sleep(queue: Any, connection: Any) -> None:
    """With blocking detection on (CMWQ_DETECT_BLOCKING=1), a job's own wait that it does not wrap
    in blocking() tells the pool its worker sleeps: the worker's run of a job is a user call site
    of cmwq_exec.detect."""
    job = queue.enqueue(rqjobs.detected_sleep)
    cmwq_exec.detect_blocking()
    try:
        work_in_burst(queue, connection)
    finally:
        cmwq_exec.undetect_blocking()
    assert job.latest_result().return_value is True


def test_timeout_is_raised_in_the_job_thread(queue: Any, connection: Any) -> None:
    """A job spinning past its timeout fails with RQ's JobTimeoutException; the next job runs."""
    spun = queue.enqueue(rqjobs.spin, job_timeout=1)
    after = queue.enqueue(pow, 2, 5)
    work_in_burst(queue, connection)
    assert spun.get_status(refresh=True) == JobStatus.FAILED
    assert spun.latest_result().exc_string.splitlines()[-1] == (
        "rq.timeouts.JobTimeoutException: Task exceeded maximum timeout value (1 seconds)")
    assert after.latest_result().return_value == 32


def test_stop_command_stops_the_job(queue: Any, connection: Any) -> None:
    """send_stop_job_command: the job is STOPPED, in the FailedJobRegistry, its stopped callback ran."""
    key = queue.name
    job = queue.enqueue(rqjobs.hold, key, on_stopped=rqjobs.record_stopped)
    beside("the job to start", lambda: connection.get(key + ":started"),
           lambda: send_stop_job_command(connection, job.id))
    work_in_burst(queue, connection)
    assert job.get_status(refresh=True) == JobStatus.STOPPED
    assert job.id in queue.failed_job_registry
    assert connection.llen(job.id + ":stopped-callback") == 1
    assert job.latest_result().exc_string == "Job stopped by user, work-horse terminated."
    connection.delete(job.id + ":stopped-callback")


def test_burst_runs_the_dependents_its_jobs_enqueue(queue: Any, connection: Any) -> None:
    """A burst ends when the queue is empty and no job runs: a job that ends after the last dequeue
    still has its dependents run, as with RQ's worker, which runs one job at a time."""
    rqjobs.gate.clear()
    rqjobs.inside.clear()
    first = queue.enqueue(rqjobs.meet, 1)
    second = queue.enqueue(pow, 2, 4, depends_on=first)
    beside("the first job waiting", lambda: rqjobs.inside, rqjobs.gate.set)
    work_in_burst(queue, connection)
    assert first.latest_result().return_value == 1
    assert second.get_status(refresh=True) == JobStatus.FINISHED
    assert second.latest_result().return_value == 16


def test_burst_dequeues_again_when_a_job_ends_as_the_queue_is_found_empty(
        queue: Any, connection: Any, monkeypatch: Any) -> None:
    """The race behind the test above, forced: the first job ends (enqueuing its dependent) after
    RQ's dequeue found the queue empty and before the worker looks at its running jobs."""
    from rq.worker import BaseWorker

    rqjobs.gate.clear()
    rqjobs.inside.clear()
    first = queue.enqueue(rqjobs.meet, 1)
    second = queue.enqueue(pow, 2, 4, depends_on=first)
    worker = Worker([queue], connection=connection)
    dequeue = BaseWorker.dequeue_job_and_maintain_ttl
    forced = []

    def dequeue_then_end_the_job(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = dequeue(self, *args, **kwargs)
        if result is None and rqjobs.inside and not forced:
            forced.append(True)
            rqjobs.gate.set()
            wait_for("the first job to end", lambda: not worker._running, timeout=60)
        return result

    monkeypatch.setattr(BaseWorker, "dequeue_job_and_maintain_ttl", dequeue_then_end_the_job)
    worker.work(burst=True, logging_level="WARNING")
    assert forced
    assert first.latest_result().return_value == 1
    assert second.get_status(refresh=True) == JobStatus.FINISHED
    assert second.latest_result().return_value == 16


def test_a_worker_stops_cleanly_when_its_channel_thread_is_slow_to_wake(
        queue: Any, connection: Any, monkeypatch: Any) -> None:
    """The command channel's thread ends (closing the channel) before the worker closes it: two
    threads closing one redis-py PubSub at once fail (seen with redis-py 8.1, whose ``stop()`` does
    not wait, when the thread woke later than RQ's 1 s wait)."""
    import cmwq_exec.rq

    monkeypatch.setattr(cmwq_exec.rq, "PUBSUB_WAKE", 3.0)
    worker = work_in_burst(queue, connection)
    assert worker.pubsub_thread is not None and not worker.pubsub_thread.is_alive()


# -- as users start it ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def rq_worker(queue: Any) -> Iterator[Any]:
    """Start ``rq worker -w cmwq_exec.rq.Worker`` on the test's queue; killed after the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(**env: str) -> subprocess.Popen[str]:
        path = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])
        proc = subprocess.Popen(
            [sys.executable, "-m", "rq.cli", "worker", "-w", "cmwq_exec.rq.Worker", "--url", rqjobs.URL,
             "--logging_level", "WARNING", queue.name],
            env={**os.environ, "PYTHONPATH": path, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        print(proc.communicate(timeout=30)[0])  # shown if the test failed


def test_warm_shutdown_finishes_the_running_job(queue: Any, connection: Any, rq_worker: Any) -> None:
    """SIGINT: the running job finishes and its result is stored; the worker exits; a job
    enqueued meanwhile is not run."""
    key = queue.name
    proc = rq_worker()
    held = queue.enqueue(rqjobs.hold, key)
    wait_for("the job to start", lambda: connection.get(key + ":started"), timeout=60)
    proc.send_signal(signal.SIGINT)
    later = queue.enqueue(pow, 2, 3)
    connection.set(key + ":release", 1)
    assert proc.wait(timeout=60) == 0
    assert held.get_status(refresh=True) == JobStatus.FINISHED
    assert held.latest_result().return_value == "released"
    # not run: in the queue, or in its intermediate queue if the worker's last BLMOVE took it as
    # the signal cut the call short (RQ's own worker does the same; its maintenance puts it back)
    intermediate = [i.decode() for i in connection.lrange(queue.intermediate_queue_key, 0, -1)]
    assert later.get_status(refresh=True) == JobStatus.QUEUED
    assert later.id in queue.job_ids or later.id in intermediate


def test_cold_shutdown_leaves_the_running_job_started(queue: Any, connection: Any, rq_worker: Any) -> None:
    """The signal again: the worker exits at once, as RQ's after killing its horse; the job is left
    in the StartedJobRegistry for RQ's cleanup, with no result."""
    key = queue.name
    proc = rq_worker()
    held = queue.enqueue(rqjobs.hold, key)
    wait_for("the job to start", lambda: connection.get(key + ":started"), timeout=60)
    proc.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    # RQ ignores a second signal within a second of the first (a worker pool sends one too)
    wait_for("RQ's one-second window to pass", lambda: time.monotonic() - signalled > 1.5, timeout=10)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert held.get_status(refresh=True) == JobStatus.STARTED
    assert held.id in queue.started_job_registry
    assert held.latest_result() is None


def test_metrics_show_the_rq_workqueue(queue: Any, connection: Any, rq_worker: Any) -> None:
    port = free_port()
    proc = rq_worker(CMWQ_METRICS_PORT=str(port))
    jobs = [queue.enqueue(pow, 2, i) for i in range(20)]
    wait_for("twenty results", lambda: all(j.get_status(refresh=True) == JobStatus.FINISHED for j in jobs),
             timeout=60)

    def rq_row() -> Any:
        top = subprocess.run([sys.executable, "-m", "cmwq_exec.cli", "top", "--json", "--url",
                              f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True)
        if top.returncode != 0:
            return None
        rows = json.loads(top.stdout.splitlines()[-1])["workqueues"]
        return next((row for row in rows if row["workqueue"] == "rq" and row["completed"] >= 20), None)

    assert wait_for("the rq workqueue in cmwq-exec top", rq_row, timeout=30)["started"] >= 20
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0


def test_rq_worker_pool_runs_one_cmwq_worker_per_process(queue: Any, connection: Any) -> None:
    """``rq worker-pool -w cmwq_exec.rq.Worker -n 2``: RQ's own pool of worker processes (one per
    CPU here), each a cmwq worker; the jobs run in its worker processes, and SIGINT stops them all."""
    from rq import Worker as RQWorker

    path = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "rq.cli", "worker-pool", "-w", "cmwq_exec.rq.Worker", "--url", rqjobs.URL,
         "-n", "2", "--logging-level", "WARNING", queue.name],
        env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def registered() -> Any:
            found = RQWorker.all(connection=connection, queue=queue)
            return found if len(found) == 2 else None

        pids = {worker.pid for worker in wait_for("two workers registered", registered, timeout=60)}
        assert len(pids) == 2 and proc.pid not in pids
        jobs = [queue.enqueue(rqjobs.where) for _ in range(20)]
        wait_for("twenty results", lambda: all(
            j.get_status(refresh=True) == JobStatus.FINISHED for j in jobs), timeout=60)
        ran = [job.latest_result().return_value for job in jobs]
        assert {pid for pid, _ in ran} <= pids
        assert all(thread.startswith("cmwq/") for _, thread in ran)  # a cmwq pool's worker thread
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        print(proc.communicate(timeout=30)[0])  # shown if the test failed
