"""Processes mode (``CMWQ_PROCESSES``) recycles its children as prefork does, against real workers
on Redis and RabbitMQ: ``--max-tasks-per-child``, ``--max-memory-per-child``, and a task that will
not die (see :mod:`cmwq_exec.celery_process_recycle`). Each worker has two children (the machine
may have only two CPUs); see test_processes.py for the mode itself.
"""

from __future__ import annotations

import re
import signal
from collections import defaultdict
from typing import Any

import pytest
from app import process_init_key, process_shutdown_key
from celery import group, states
from celery.exceptions import TimeLimitExceeded
from celery_harness import Worker, process_gone, wait_for
from test_celery_pool import a_second_worker_runs_each_once
from test_processes import CHILDREN, members, start

pytestmark = [pytest.mark.celery, pytest.mark.slow, pytest.mark.timeout(420)]


def pids_of(results_redis: Any, key: str) -> list[int]:
    return [int(pid) for pid in results_redis.lrange(key, 0, -1)]


def started_pids(worker: Worker) -> dict[int, list[int]]:
    """The processes the supervisor started, by child index, in order (from its log)."""
    started: dict[int, list[int]] = defaultdict(list)
    for match in re.finditer(r"child (\d+) \(\S+\) started on CPU \d+, pid (\d+)", worker.log.read_text()):
        started[int(match.group(1))].append(int(match.group(2)))
    return started


def generations(runs: list[dict[str, Any]]) -> dict[int, list[tuple[int, float, float, int]]]:
    """By child index: (pid, first start, last start, tasks) of each process that ran tasks, in order."""
    by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_pid[run["pid"]].append(run)
    slots: dict[int, list[tuple[int, float, float, int]]] = defaultdict(list)
    for pid, mine in by_pid.items():
        starts = sorted(run["start"] for run in mine)
        slots[int(mine[0]["child"])].append((pid, starts[0], starts[-1], len(mine)))
    return {index: sorted(gens, key=lambda gen: gen[1]) for index, gens in slots.items()}


def test_max_tasks_per_child_replaces_children_and_runs_every_task_once(
        celery_app, start_worker, results_redis, key, broker):
    """--max-tasks-per-child 50, 1,000 tasks of 10 ms: every task runs once and succeeds while the
    children are replaced. Each replaced process ran at least its 50 tasks, the last task one
    started came before its replacement's first (the two never consume at once: they have one
    node name), and while a CPU changed hands the other child consumed. Each process started sent
    worker_process_init; each replaced one sent worker_process_shutdown and exited."""
    worker, names = start(start_worker, concurrency=2, args=("--max-tasks-per-child", "50"))
    tokens: list[str] = []
    runs: list[dict[str, Any]] = []
    # 1,000 tasks, then 500 more at a time while fewer processes than children were replaced: a
    # replacement is a fresh interpreter, which a busy machine starts slowly, and its slot's old
    # process consumes meanwhile
    for batch in range(5):
        sent = [f"t{len(tokens) + i}" for i in range(500 if batch else 1000)]
        tokens += sent
        runs += group(celery_app.tasks["t.where"].s(key, token, 0.01) for token in sent)().get(timeout=120)
        slots = generations(runs)
        replaced = [gen for gens in slots.values() for gen in gens[:-1]]
        if len(replaced) >= CHILDREN:
            break
    assert members(results_redis, key) == set(tokens)
    assert int(results_redis.get(key + ":runs")) == len(tokens), "a task ran twice"
    assert sorted(slots) == list(range(CHILDREN)), slots
    assert len(replaced) >= CHILDREN, f"too few replacements to test anything: {slots}"
    gaps = []
    for index, gens in slots.items():
        others = [run["start"] for run in runs if int(run["child"]) != index]
        for old, new in zip(gens, gens[1:], strict=False):
            assert old[3] >= 50, f"child {index} pid {old[0]} was replaced after {old[3]} tasks: {slots}"
            assert old[2] < new[1], f"child {index}: pid {old[0]} and pid {new[0]} consumed at once: {slots}"
            gaps.append((index, new[1] - old[2], sum(1 for t in others if old[2] < t < new[1])))
    assert any(consumed for _, _, consumed in gaps), f"no other child consumed during a handover: {gaps}"
    print(f"\n{len(replaced)} replacements; tasks per replaced process "
          f"{sorted(gen[3] for gen in replaced)}; gaps (child, s, tasks elsewhere) "
          f"{[(i, round(g, 2), n) for i, g, n in gaps]}")

    started = started_pids(worker)
    def inits_match() -> bool:
        return all(pids_of(results_redis, process_init_key(name)) == started[index]
                   for index, name in enumerate(names))

    wait_for(f"worker_process_init from each process started ({dict(started)})", inits_match, 30)
    wait_for("the replaced processes to exit", lambda: all(process_gone(gen[0]) for gen in replaced), 60)
    shut_down = {pid for name in names for pid in pids_of(results_redis, process_shutdown_key(name))}
    assert {gen[0] for gen in replaced} <= shut_down, "a replaced child sent no worker_process_shutdown"


def wait_replaced(worker: Worker, name: str, old_pid: int) -> int:
    """Wait until node ``name`` answers from a process other than ``old_pid`` and ``old_pid`` has
    exited; returns the new pid."""
    def replaced() -> int | None:
        try:
            pid = worker.node_stats(name)["pid"]
        except AssertionError:
            return None  # between two processes
        return pid if pid != old_pid and process_gone(old_pid) else None

    return wait_for(f"{name} (pid {old_pid}) to be replaced\n{worker.tail()}", replaced, 90, interval=0.3)


def test_a_child_past_max_memory_per_child_is_replaced_after_its_task(
        celery_app, start_worker, results_redis, key):
    """--max-memory-per-child 250000 KiB: short tasks leave the children alone; a task touching
    400 MiB succeeds, then its child (its resident set now above the limit, as prefork measures it)
    is replaced while tasks sent meanwhile all run once."""
    worker, names = start(start_worker, concurrency=2, args=("--max-memory-per-child", "250000"))
    before = {name: worker.node_stats(name)["pid"] for name in names}
    group(celery_app.tasks["t.where"].s(key, f"a{i}", 0.01) for i in range(40))().get(timeout=60)
    assert {name: worker.node_stats(name)["pid"] for name in names} == before, \
        f"a child under its memory limit was replaced\n{worker.tail()}"

    hogged = celery_app.tasks["t.hog"].delay(400)
    stream = group(celery_app.tasks["t.where"].s(key, f"b{i}", 0.02) for i in range(200))()
    pid = hogged.get(timeout=60)
    name = next(name for name, child_pid in before.items() if child_pid == pid)
    new_pid = wait_replaced(worker, name, pid)
    assert "passed --max-memory-per-child (250000 KiB)" in worker.log.read_text()
    stream.get(timeout=120)
    assert members(results_redis, key) == {f"a{i}" for i in range(40)} | {f"b{i}" for i in range(200)}
    assert int(results_redis.get(key + ":runs")) == 240, "a task ran twice"
    other = next(n for n in names if n != name)
    assert worker.node_stats(other)["pid"] == before[other], "the other child was replaced too"
    assert new_pid in pids_of(results_redis, process_init_key(name))


def which_replaced(worker: Worker, before: dict[str, int]) -> str:
    """Wait until one of the nodes in ``before`` (name -> pid) answers from another process and its
    old process has exited; returns its name."""
    def replaced() -> str | None:
        for name, old_pid in before.items():
            try:
                pid = worker.node_stats(name)["pid"]
            except AssertionError:
                continue  # between two processes
            if pid != old_pid and process_gone(old_pid):
                return name
        return None

    return wait_for(f"a child to be replaced\n{worker.tail()}", replaced, 90, interval=0.3)


@pytest.mark.parametrize("how", ["hard", "terminated"])
def test_a_task_swallowing_its_unwind_fails_and_its_child_is_replaced_while_tasks_flow(
        celery_app, start_worker, results_redis, key, how):
    """A task that swallows every interruption, unwound by a 1 s hard time limit (or by
    revoke(terminate=True) once it runs), with CMWQ_ABANDON_GRACE=1: it ends FAILURE
    TimeLimitExceeded at its limit (REVOKED when terminated), as prefork reports the task of a
    child it killed; a second later its child is replaced: the child's other started tasks
    finish, it exits, and the stuck thread with it (the task, meant to run 60 s, never reaches its
    end). A stream of other tasks keeps flowing meanwhile and each of them runs once."""
    worker, names = start(start_worker, concurrency=2, env={"CMWQ_ABANDON_GRACE": "1"})
    before = {name: worker.node_stats(name)["pid"] for name in names}
    stubborn = celery_app.tasks["t.stubborn"]
    stuck = stubborn.apply_async((key, 60.0), time_limit=1) if how == "hard" else stubborn.delay(key, 60.0)
    stream = group(celery_app.tasks["t.where"].s(key, f"s{i}", 0.05) for i in range(300))()
    if how == "terminated":
        def running() -> bool:
            reply = celery_app.control.inspect(names, timeout=1.0).active() or {}
            return any(task["id"] == stuck.id for tasks in reply.values() for task in tasks)

        wait_for(f"the stubborn task to run\n{worker.tail()}", running, 60, interval=0.2)
        celery_app.control.revoke(stuck.id, terminate=True)
    name = which_replaced(worker, before)
    if how == "hard":
        with pytest.raises(TimeLimitExceeded):
            stuck.get(timeout=30, propagate=True)
        assert stuck.state == states.FAILURE
    else:
        wait_for("the terminated task to be REVOKED", lambda: stuck.state == states.REVOKED, 30)
    assert f"survived its unwind ({how}) for more than 1 s" in worker.log.read_text()
    runs = stream.get(timeout=120)
    assert members(results_redis, key) == {f"s{i}" for i in range(300)}
    assert int(results_redis.get(key + ":runs")) == 300, "a task ran twice"
    assert {run["pid"] for run in runs} >= {before[n] for n in names if n != name}, "the other child stopped"
    assert results_redis.get(key + ":done") is None, "the stuck thread outlived its child"
    shut_down = pids_of(results_redis, process_shutdown_key(name))
    assert before[name] in shut_down, "the replaced child sent no worker_process_shutdown"


def test_a_warm_shutdown_during_a_handover_finishes_started_tasks_and_loses_none(
        celery_app, start_worker, results_redis, key):
    """SIGTERM to the worker while a child is being replaced (its replacement starting or holding,
    the old child consuming or draining): every process exits, each task an old or new child had
    started finished there, and a second worker runs the rest: each task ran once."""
    worker, names = start(start_worker, concurrency=2, args=("--max-tasks-per-child", "3"))
    tokens = [f"h{i}" for i in range(80)]  # more than a busy machine runs before the handover is seen
    for token in tokens:
        celery_app.tasks["t.record_early"].delay(key, token, 0.5)
    # a handover is under way while the worker has more processes than children (the replacement
    # starting or holding beside the old child); with a limit of 3 tasks there is one after another
    def handing_over() -> list[int] | None:
        pids = worker.child_pids()
        return pids if len(pids) > CHILDREN else None

    pids = wait_for(f"a handover under way\n{worker.tail()}", handing_over, 60, interval=0.02)
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(90) == 0, worker.tail(80)
    assert all(process_gone(pid) for pid in pids), "a child outlived the worker"
    started = members(results_redis, key + ":started")
    assert started <= members(results_redis, key), "a task started by a child did not finish"
    assert members(results_redis, key) < set(tokens), "every task ran before the shutdown: nothing tested"
    a_second_worker_runs_each_once(start_worker, results_redis, key, tokens)
