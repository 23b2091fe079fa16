"""Per-CPU child processes (``CMWQ_PROCESSES`` / ``cmwq_processes``) against a real broker.

The ``celery worker`` process started by the harness only supervises: it connects to no broker and
answers no control command. Child ``i`` is a full Celery node ``{name}.{i}@{host}``, pinned to the
i-th usable CPU, consuming on its own, with ``-c`` tasks running at once. Each test starts one
worker with two children (the machine may have only two CPUs).

RabbitMQ only: a SIGKILLed child's unacked messages come back at once (kombu's Redis transport waits
for the visibility timeout and may lose the message in transit, see test_celery_pool.py), and one
broker keeps this module quick: a worker with children takes a few seconds to start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from typing import Any

import pytest
from celery import group
from celery.exceptions import TimeLimitExceeded
from celery_harness import (
    BROKERS,
    PORTS,
    Worker,
    broker_problem,
    cpus_allowed,
    process_gone,
    tcp_connections,
    wait_for,
)
from helpers import in_ci, need_sysfs_hotplug, read_cpu1, write_cpu1
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.celery, pytest.mark.slow, pytest.mark.timeout(180)]

CHILDREN = 2


@pytest.fixture
def broker(results_redis: Any) -> str:
    """RabbitMQ only (see the module docstring)."""
    problem = broker_problem("amqp")
    if problem:
        if in_ci():
            pytest.fail(f"{problem} (CI=true: brokers must run; see .ci/services.sh)")
        pytest.skip(f"{problem} (start it with .ci/services.sh)")
    return BROKERS["amqp"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def members(redis_client: Any, name: str) -> set[str]:
    return {m.decode() for m in redis_client.smembers(name)}


def started_not_done(redis_client: Any, key: str) -> set[str]:
    """The t.record_early tokens started and not finished, once there are some. A task is active
    (what ``inspect active`` reports) from its acceptance, before its body records its start: read
    at once, the set was empty on a busy machine although tasks ran."""
    return wait_for("a task started and not finished",
                    lambda: members(redis_client, key + ":started") - members(redis_client, key), 20)


def start(start_worker: Any, concurrency: int | None = 2, env: dict[str, str] | None = None,
          via: str = "setting", args: tuple[str, ...] = ()) -> tuple[Worker, list[str]]:
    """A worker with CHILDREN children (``CMWQ_PROCESSES`` unless ``env`` says otherwise), once
    every child answers ping. ``via``: the pool chosen by ``worker_pool`` or by ``-P custom``."""
    worker = start_worker(concurrency=concurrency, via=via, ready=False, args=args,
                          env={"CMWQ_PROCESSES": str(CHILDREN), **(env or {})})
    return worker, worker.wait_children(CHILDREN)


def child_stats(worker: Worker, names: list[str]) -> list[dict[str, Any]]:
    return [worker.node_stats(name) for name in names]


def active(app: Any, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The tasks each node runs now."""
    reply = app.control.inspect(names, timeout=1.0).active() or {}
    return {name: reply.get(name, []) for name in names}


def every_child_runs(app: Any, names: list[str]) -> dict[str, list[dict[str, Any]]] | None:
    running = active(app, names)
    return running if all(running.values()) else None


def spin_pids(app: Any, n: int = 20) -> set[int]:
    """The pids that ran ``n`` short CPU-bound tasks."""
    return set(group(app.tasks["t.spin_pid"].s(0.02) for _ in range(n))().get(timeout=30))


def samples(port: int) -> list[Any]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [sample for family in text_string_to_metric_families(body) for sample in family.samples]


def sample_value(port: int, name: str, **labels: str) -> float | None:
    """The value of the first sample ``name`` whose labels include ``labels``, or None."""
    for sample in samples(port):
        if sample.name == name and labels.items() <= sample.labels.items():
            return sample.value
    return None


def test_children_are_pinned_nodes_the_parent_only_supervises_and_serves_their_metrics(
        celery_app, start_worker, results_redis, key):
    """Two children answer ping by their names and the parent's name gets no reply; the parent has
    no broker connection. Child i runs on the i-th usable CPU alone, its stats say so
    ("cmwq-child": index, cpu, parent pid) and carry the pool's. Tasks run in both children, and -c
    counts per child: -c 2 x 2 children run 4 tasks at once, never more. The parent's /metrics has
    every child's cmwq metrics labelled child="i" and the number of live children."""
    port = free_port()
    worker, names = start(start_worker, concurrency=2, env={"CMWQ_METRICS_PORT": str(port)})
    assert celery_app.control.ping(destination=[worker.name], timeout=1.0) == [], \
        "the supervising parent must not be a Celery node"
    assert tcp_connections(worker.pid, PORTS["amqp"]) == 0, "the parent must not connect to the broker"

    usable = sorted(os.sched_getaffinity(0))
    stats = child_stats(worker, names)
    pids = [s["pid"] for s in stats]
    assert sorted(worker.child_pids()) == sorted(pids), "the children are the worker's own processes"
    for index, (name, s) in enumerate(zip(names, stats, strict=True)):
        cpu = usable[index % len(usable)]
        assert s["pool"]["cmwq-child"] == {"index": index, "cpu": cpu, "parent-pid": worker.pid}, (name, s)
        assert cpus_allowed(s["pid"]) == str(cpu), f"{name} (pid {s['pid']}) should run on CPU {cpu} only"
        assert s["pool"]["implementation"] == "cmwq_exec.celery:TaskPool"
        assert s["pool"]["max-concurrency"] == 2, s["pool"]
    assert len({cpus_allowed(pid) for pid in pids}) == CHILDREN, "each child on its own CPU"
    assert all(tcp_connections(pid, PORTS["amqp"]) for pid in pids), "each child consumes on its own"

    ran = group(celery_app.tasks["t.spin_pid"].s(0.02) for _ in range(20))().get(timeout=30)
    assert set(ran) == set(pids), f"tasks ran in {set(ran)}, the children are {pids}"

    results = group(celery_app.tasks["t.gauge"].s(key, 0.3, annotated=False) for _ in range(12))()
    results.get(timeout=30)
    assert int(results_redis.get(key + ":peak")) == 2 * CHILDREN, "-c 2 per child, both children"

    def metrics_of_both() -> bool:
        return (sample_value(port, "cmwq_celery_children") == CHILDREN
                and all(sample_value(port, "cmwq_pool_workers", child=str(i)) is not None
                        for i in range(CHILDREN))
                and all((sample_value(port, "cmwq_workqueue_works_completed_total", child=str(i),
                                      workqueue="celery") or 0) >= ran.count(pid)
                        for i, pid in enumerate(pids)))

    wait_for("the parent's /metrics to show both children's pools", metrics_of_both, 15)
    assert sample_value(port, "cmwq_celery_child_restarts_total", child="0") == 0


def test_time_limit_revoke_terminate_and_pool_grow_in_each_child(celery_app, start_worker, results_redis,
                                                                   key):
    """Selected by the cmwq_processes setting, which wins over CMWQ_PROCESSES=0. A task past its
    time_limit fails with TimeLimitExceeded; revoke(terminate=True) ends a running task in the child
    that runs it, and both children keep their pids and keep running tasks; pool_grow / pool_shrink
    (broadcast) change every child's max-concurrency."""
    worker, names = start(start_worker, concurrency=2,
                          env={"CMWQ_PROCESSES": "0",
                               "CMWQ_TEST_CONF": json.dumps({"cmwq_processes": str(CHILDREN)})})
    t = celery_app.tasks
    pids = [s["pid"] for s in child_stats(worker, names)]

    limited = t["t.long"].apply_async((key + "h", 30), time_limit=1)
    with pytest.raises(TimeLimitExceeded):
        limited.get(timeout=20)
    assert not results_redis.get(key + "h:finished")

    victim = t["t.long"].delay(key + "v", 60)
    survivor = t["t.long"].delay(key + "s", 2)
    wait_for("both tasks to start",
             lambda: results_redis.get(key + "v:started") and results_redis.get(key + "s:started"), 20)
    running = {task["id"]: name for name, tasks in active(celery_app, names).items() for task in tasks}
    assert victim.id in running, running
    celery_app.control.revoke(victim.id, terminate=True, signal="SIGTERM")
    wait_for(f"the victim (in {running[victim.id]}) to be REVOKED", lambda: victim.state == "REVOKED", 10)
    assert not results_redis.get(key + "v:finished")
    assert survivor.get(timeout=20) == "finished"
    assert [s["pid"] for s in child_stats(worker, names)] == pids, "no child was replaced"
    assert spin_pids(celery_app) == set(pids), "both children still run tasks"

    # every child of the worker, and only them (other workers may share the broker)
    replies = celery_app.control.pool_grow(1, destination=names, reply=True, timeout=2.0)
    assert {name for reply in replies for name in reply} == set(names), replies
    assert all("ok" in answer for reply in replies for answer in reply.values()), replies
    assert [s["pool"]["max-concurrency"] for s in child_stats(worker, names)] == [3] * CHILDREN
    celery_app.control.pool_shrink(1, destination=names, reply=True, timeout=2.0)
    assert [s["pool"]["max-concurrency"] for s in child_stats(worker, names)] == [2] * CHILDREN


def test_autoscale_grows_and_shrinks_each_child(celery_app, start_worker, results_redis, key):
    """``--autoscale=4,1`` on the worker's command line reaches every child (each re-runs it): each
    starts at one task, grows under a load of tasks that wait without saying so (each counts as
    running), never past 4, and shrinks back to one when idle."""
    worker, names = start(start_worker, concurrency=None, args=("--autoscale=4,1",),
                          env={"AUTOSCALE_KEEPALIVE": "1"})
    assert [s["pool"]["max-concurrency"] for s in child_stats(worker, names)] == [1] * CHILDREN
    results = group(celery_app.tasks["t.gauge"].s(key, 0.5, annotated=False) for _ in range(24))()

    def each_grew() -> list[dict[str, Any]] | None:
        stats = child_stats(worker, names)
        return stats if all(s["pool"]["max-concurrency"] >= 2 for s in stats) else None

    grown = wait_for("autoscale to grow every child", each_grew, 30)
    assert all(s["autoscaler"]["max"] == 4 for s in grown), [s["autoscaler"] for s in grown]
    results.get(timeout=60)
    assert 2 < int(results_redis.get(key + ":peak")) <= 4 * CHILDREN
    wait_for("autoscale to shrink every child back to one",
             lambda: all(s["pool"]["max-concurrency"] == 1 for s in child_stats(worker, names)), 30)


def test_a_killed_child_is_replaced_one_that_exits_by_itself_is_not(celery_app, start_worker,
                                                                      results_redis, key):
    """SIGKILL child 0 while it runs acks_late tasks: RabbitMQ gives its unacked messages to a live
    child, so every task is recorded; a new process with the same index, name and CPU comes up and
    answers ping; the parent counts the restart. A child stopped by the remote ``shutdown`` command
    exits 0 and stays stopped: once both are, the parent exits 0."""
    port = free_port()
    worker, names = start(start_worker, concurrency=2, env={"CMWQ_METRICS_PORT": str(port)})
    before = child_stats(worker, names)
    victim = before[0]
    tokens = [f"k{i}" for i in range(12)]
    for token in tokens:
        celery_app.tasks["t.record"].delay(key, token, 1.5)
    running = wait_for(f"{names[0]} to run tasks", lambda: active(celery_app, names[:1])[names[0]], 20)
    held = {task["args"][1] for task in running}

    os.kill(victim["pid"], signal.SIGKILL)
    assert held - members(results_redis, key), "the killed child had finished its tasks: nothing tested"
    wait_for(f"every task to complete (missing {set(tokens) - members(results_redis, key)})",
             lambda: members(results_redis, key) == set(tokens), 60)

    def replaced() -> dict[str, Any] | None:
        reply = celery_app.control.inspect([names[0]], timeout=1.0).stats() or {}
        s = reply.get(names[0])
        return s if s and s["pid"] != victim["pid"] else None

    after = wait_for(f"a new {names[0]}\n{worker.tail()}", replaced, 30, interval=0.2)
    identity = victim["pool"]["cmwq-child"]
    assert after["pool"]["cmwq-child"] == identity, (identity, after["pool"]["cmwq-child"])
    assert cpus_allowed(after["pid"]) == str(identity["cpu"])
    assert sorted(worker.child_pids()) == sorted([after["pid"], before[1]["pid"]])
    assert worker.node_stats(names[1])["pid"] == before[1]["pid"], "the other child was not touched"
    wait_for("the restart in /metrics",
             lambda: sample_value(port, "cmwq_celery_child_restarts_total", child="0") == 1
             and sample_value(port, "cmwq_celery_children") == CHILDREN, 15)
    assert sample_value(port, "cmwq_celery_child_restarts_total", child="1") == 0

    celery_app.control.shutdown(destination=[names[0]])
    wait_for(f"{names[0]} to stop", lambda: process_gone(after["pid"]), 20)
    celery_app.control.shutdown(destination=[names[1]])
    assert worker.wait_exit(30) == 0, worker.tail()  # a replaced child 0 would keep it running


def test_sigterm_to_the_parent_is_a_warm_shutdown_of_every_child(celery_app, start_worker, results_redis,
                                                                  key):
    """Tasks running in both children when the parent gets SIGTERM finish and their results are
    stored; the parent exits 0 and leaves no child behind."""
    worker, names = start(start_worker, concurrency=2)
    pids = worker.child_pids()
    results = {f"w{i}": celery_app.tasks["t.record_early"].delay(key, f"w{i}", 2.0) for i in range(12)}
    wait_for("both children to run tasks", lambda: every_child_runs(celery_app, names), 20)
    in_progress = started_not_done(results_redis, key)
    worker.signal(signal.SIGTERM)
    assert in_progress, "no task was running at the shutdown: nothing tested"

    assert worker.wait_exit(40) == 0, worker.tail()
    started, done = members(results_redis, key + ":started"), members(results_redis, key)
    assert started == done, f"started, not finished: {started - done}\n{worker.tail()}"
    for token in started:
        assert results[token].get(timeout=5) == token
    wait_for(f"the children {pids} to be gone", lambda: all(process_gone(pid) for pid in pids), 5)


def test_a_killed_parent_is_a_warm_shutdown_of_every_child(celery_app, start_worker, results_redis, key):
    """SIGKILL to the supervisor alone (not its process group): no child is left behind serving
    without it. Each gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops warmly: the tasks
    it had started finish and their results are stored."""
    worker, names = start(start_worker, concurrency=2)
    pids = worker.child_pids()
    assert len(pids) == CHILDREN, pids
    results = {f"k{i}": celery_app.tasks["t.record_early"].delay(key, f"k{i}", 2.0) for i in range(12)}
    wait_for("both children to run tasks", lambda: every_child_runs(celery_app, names), 20)
    in_progress = started_not_done(results_redis, key)
    os.kill(worker.pid, signal.SIGKILL)
    assert in_progress, "no task was running when the parent died: nothing tested"

    wait_for(f"the children {pids} to exit", lambda: all(process_gone(pid) for pid in pids), 40)
    started, done = members(results_redis, key + ":started"), members(results_redis, key)
    assert started == done, f"started, not finished: {started - done}\n{worker.tail()}"
    for token in started:
        assert results[token].get(timeout=5) == token


def test_sigquit_to_the_parent_is_a_cold_shutdown_of_every_child(celery_app, start_worker, results_redis,
                                                                 key):
    """SIGQUIT: the parent and both children exit without waiting for their 60 s tasks (this
    worker selects the pool with ``-P custom``)."""
    worker, names = start(start_worker, concurrency=2, via="custom")
    pids = worker.child_pids()
    for i in range(4):
        celery_app.tasks["t.record"].delay(key, f"q{i}", 60)
    wait_for("both children to run tasks", lambda: every_child_runs(celery_app, names), 20)
    worker.signal(signal.SIGQUIT)
    worker.wait_exit(20)  # a warm shutdown would wait for the tasks: 60 s
    wait_for(f"the children {pids} to be gone", lambda: all(process_gone(pid) for pid in pids), 10)
    assert results_redis.scard(key) == 0, "a task finished: the shutdown was not cold"


@pytest.mark.hotplug
def test_a_childs_cpu_going_offline_and_back(celery_app, start_worker, results_redis, key):
    """CPU 1 goes offline under child 1, which is pinned to it, while tasks run: child 1 is not
    replaced and goes on serving on the CPU left (the kernel moves it; its engine's CPU 1 pool is
    drained by a trustee); no task is lost. When CPU 1 is back, every thread of child 1 is on it
    again (the kernel does not restore the masks it widened: the supervisor does), and both
    children run tasks."""
    need_sysfs_hotplug()
    worker, names = start(start_worker, concurrency=2)
    stats = child_stats(worker, names)
    pids = [s["pid"] for s in stats]
    assert [s["pool"]["cmwq-child"]["cpu"] for s in stats] == [0, 1]
    spin = celery_app.tasks["t.spin_pid"]
    try:
        before = group(spin.s(0.02) for _ in range(40))()
        write_cpu1("0")
        during = group(spin.s(0.02) for _ in range(40))()
        assert len(before.get(timeout=60)) == 40
        ran_during = set(during.get(timeout=60))
        assert ran_during <= set(pids), ran_during
        assert worker.node_stats(names[1])["pid"] == pids[1], "child 1 was replaced"
        assert spin_pids(celery_app, 40) == set(pids), "child 1 stopped taking tasks offline"
    finally:
        write_cpu1("1")
    assert read_cpu1() == "1"

    def child1_masks() -> set[str]:
        masks = set()
        for tid in os.listdir(f"/proc/{pids[1]}/task"):
            try:
                masks.add(",".join(map(str, sorted(os.sched_getaffinity(int(tid))))))
            except OSError:
                pass  # exited
        return masks

    # the kernel widened the mask of every thread it moved off CPU 1; the supervisor pins them back
    wait_for("every thread of child 1 to be on CPU 1 again", lambda: child1_masks() == {"1"}, 10)
    assert cpus_allowed(pids[1]) == "1"
    assert spin_pids(celery_app, 40) == set(pids)
    assert sorted(worker.child_pids()) == sorted(pids), "a child was replaced"


def test_a_bad_cmwq_processes_value_is_a_clear_error(start_worker):
    """The worker does not start; its log names the variable, the value and what is allowed."""
    worker = start_worker(concurrency=2, via="setting", ready=False, env={"CMWQ_PROCESSES": "two"})
    assert worker.wait_exit(30) != 0, worker.tail()
    log = worker.log.read_text(errors="replace")
    assert "CMWQ_PROCESSES" in log and "two" in log, log
    assert "auto" in log, f"the error should say what is allowed:\n{log}"


def test_a_bad_core_setting_stops_the_worker_before_any_child_starts(start_worker):
    """The supervisor checks what a child would check at its start: the worker exits non-zero,
    naming the variable, instead of starting children that die at once, again and again."""
    worker = start_worker(concurrency=2, via="setting", ready=False,
                          env={"CMWQ_PROCESSES": str(CHILDREN), "CMWQ_IDLE_TIMEOUT": "abc"})
    assert worker.wait_exit(60) != 0, worker.tail()
    log = worker.log.read_text(errors="replace")
    assert "CMWQ_IDLE_TIMEOUT='abc'" in log, log
    assert "child 0" not in log, f"a child was started:\n{log}"


def test_a_child_that_keeps_dying_at_its_start_stops_the_worker(start_worker, tmp_path):
    """Each child's state file (``--statedb F`` becomes ``F.i``) cannot be opened, so each child
    dies at its start: after a few deaths in a row of a child the worker stops with an error that
    says so, its children gone."""
    state = tmp_path / "state"
    for index in range(CHILDREN):  # whichever file dbm makes of F.i is a directory
        for suffix in ("", ".db", ".dat", ".dir"):
            (tmp_path / f"state.{index}{suffix}").mkdir()
    worker = start_worker(concurrency=2, via="setting", ready=False, args=("--statedb", str(state)),
                          env={"CMWQ_PROCESSES": str(CHILDREN)})
    assert worker.wait_exit(150) != 0, worker.tail()
    log = worker.log.read_text(errors="replace")
    assert "times in a row within" in log and "the worker stops" in log, log[-3000:]
    assert not worker.child_pids()


def test_the_metrics_endpoint_answers_500_scrapes_at_once_with_every_childs_samples(start_worker):
    """500 clients scrape the supervisor at once: each gets an answer (a generous timeout: the
    machine is shared) holding both children's samples."""
    import threading

    port = free_port()
    worker, names = start(start_worker, concurrency=2, env={"CMWQ_METRICS_PORT": str(port)})

    def both() -> bool:
        return {s.labels.get("child") for s in samples(port) if s.name == "cmwq_pool_workers"} >= {"0", "1"}

    wait_for("both children's metrics", both, 30)
    failures: list[str] = []

    def scrape() -> None:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=120).read().decode()
        except OSError as exc:
            failures.append(repr(exc))
            return
        children = {s.labels.get("child") for family in text_string_to_metric_families(body)
                    for s in family.samples if s.name == "cmwq_pool_workers"}
        if children != {"0", "1"}:
            failures.append(f"samples of children {sorted(children)} only")

    threads = [threading.Thread(target=scrape) for _ in range(500)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not failures, f"{len(failures)} of 500 scrapes failed: {sorted(set(failures))[:5]}"
    assert sorted(worker.child_pids()) == sorted(s["pid"] for s in child_stats(worker, names))
