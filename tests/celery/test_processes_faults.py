"""Processes mode (``CMWQ_PROCESSES``) under faults, against real workers: a child killed with its
tasks running, on Redis and RabbitMQ. Each worker has two children (the machine may have only two
CPUs); see test_processes.py for the mode itself."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from celery import states
from celery.exceptions import WorkerLostError
from celery_harness import wait_for
from test_processes import CHILDREN, active, members, start

pytestmark = [pytest.mark.celery, pytest.mark.slow, pytest.mark.timeout(240)]


def test_a_killed_childs_started_tasks_fail_with_worker_lost_and_acks_late_ones_run_again(
        celery_app, start_worker, results_redis, key):
    """SIGKILL child 0 while it runs tasks acked at their start and tasks with acks_late. Each
    acked one it had started ends FAILURE WorkerLostError('Worker exited prematurely: signal 9
    (SIGKILL) ...'), as prefork records its killed child's job; each acks_late one it had started
    goes back to the broker and ends SUCCESS in the other child (or the new child 0); the tasks it
    had received and not started run elsewhere. No result stays PENDING."""
    worker, names = start(start_worker, concurrency=3)
    tokens = {}
    # two of each kind in turn: RabbitMQ deals messages to the two children in turn, so each gets
    # both kinds (tasks in blocking() do not count against -c: each child runs all it prefetched)
    for i in range(0, 10, 2):
        for name, kind in (("t.record_early", "e"), ("t.record", "l")):
            for token in (f"{kind}{i}", f"{kind}{i + 1}"):
                tokens[celery_app.tasks[name].delay(key, token, 3.0)] = token

    def running_in_child0() -> list[dict[str, Any]] | None:
        running = active(celery_app, names[:1])[names[0]]
        started = members(results_redis, key + ":started")
        acked = [t for t in running if t["name"] == "t.record_early"]
        # an acked task inside its body (past task_prerun), and every acked one there too
        ok = acked and all(t["args"][1] in started for t in acked)
        return running if ok else None

    held = wait_for(f"{names[0]} to run a task acked at its start\n{worker.tail()}", running_in_child0, 60)
    victim = worker.node_stats(names[0])["pid"]
    os.kill(victim, signal.SIGKILL)
    held_early = {t["id"] for t in held if t["name"] == "t.record_early"}
    held_late = {t["id"] for t in held if t["name"] == "t.record"}
    assert held_early, f"the killed child ran no task acked at its start: nothing tested ({held})"

    results = {result.id: result for result in tokens}

    def all_ready() -> bool:
        return all(result.state in states.READY_STATES for result in tokens)

    def not_ready() -> str:
        return ", ".join(f"{token} {result.id} {result.state}" for result, token in tokens.items()
                         if result.state not in states.READY_STATES)

    try:
        wait_for("every result to be ready", all_ready, 120, interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: not ready: {not_ready()} (child 0 held {sorted(held_early)} "
                             f"acked, {sorted(held_late)} acks_late)\n{worker.tail()}") from None
    for task_id in held_early:
        result = results[task_id]
        assert result.state == states.FAILURE, (task_id, result.state, result.result)
        assert isinstance(result.result, WorkerLostError), repr(result.result)
        assert "Worker exited prematurely: signal 9 (SIGKILL)" in str(result.result), str(result.result)
    # child 0 may have started more tasks between the look and the kill: those acked at their
    # start failed as the held ones did, every acks_late task ran to the end somewhere
    failed = {i for i in results if results[i].state == states.FAILURE}
    assert failed >= held_early
    for task_id in failed:
        result = results[task_id]
        assert tokens[result].startswith("e"), f"an acks_late task failed: {result.result!r}"
        assert isinstance(results[task_id].result, WorkerLostError), repr(results[task_id].result)
    assert all(results[i].state == states.SUCCESS for i in set(results) - failed)
    assert held_late <= set(results) - failed
    # the failed ones never reached their end; every other one did
    assert members(results_redis, key) == {tokens[results[i]] for i in set(results) - failed}
    assert len(worker.child_pids()) == CHILDREN

