"""The plugin manager: registering and unregistering, policy hooks (answers, fall-through, a plugin
that raises), event hooks, and pool selection."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import cannot_start_thread, fake_pool, wait_for

from cmwq_exec import WQ, Work, WorkQueue, blocking, hookimpl, plugin
from cmwq_exec.core import policy
from cmwq_exec.core.worker import current_worker

pytestmark = pytest.mark.timeout(60)

Register = Callable[..., str]


@pytest.fixture
def registered() -> Iterator[Register]:
    """``registered(obj)`` registers a plugin under a unique name for this test only."""
    names: list[str] = []

    def register(obj: object, name: str = "test-plugin") -> str:
        names.append(plugin.register(obj, name=f"{name}-{uuid.uuid4().hex[:8]}"))
        return names[-1]

    yield register
    for name in names:
        if plugin.get_plugin_manager().get_plugin(name) is not None:
            plugin.unregister(name=name)


def snapshot() -> dict[str, Any]:
    """What is in force: the policy callables and which event hooks are live."""
    state: dict[str, Any] = {name: getattr(plugin.current_policy, name) for name in plugin.POLICY_HOOKS}
    state["select_pool"] = plugin.current_policy.select_pool
    state.update({f"event:{name}": getattr(plugin.events, name) is not None for name in plugin.EVENT_HOOKS})
    return state


class Recorder:
    """Implements every event hook and records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def _record(self, hook: str, **kwargs: Any) -> None:
        with self.lock:
            self.calls.append((hook, kwargs))

    def of(self, hook: str) -> list[dict[str, Any]]:
        with self.lock:
            return [kwargs for name, kwargs in self.calls if name == hook]

    @hookimpl
    def cmwq_worker_created(self, pool: Any, worker: Any) -> None:
        self._record("worker_created", pool=pool, worker=worker)

    @hookimpl
    def cmwq_worker_destroyed(self, pool: Any, worker: Any, reason: str) -> None:
        self._record("worker_destroyed", pool=pool, worker=worker, reason=reason)

    @hookimpl
    def cmwq_worker_create_failed(self, pool: Any, error: BaseException) -> None:
        self._record("worker_create_failed", pool=pool, error=error)

    @hookimpl
    def cmwq_manager_ran(self, pool: Any, created: int, destroyed: int) -> None:
        self._record("manager_ran", pool=pool, created=created, destroyed=destroyed)

    @hookimpl
    def cmwq_mayday(self, pool: Any, workqueue: Any) -> None:
        self._record("mayday", pool=pool, workqueue=workqueue)

    @hookimpl
    def cmwq_work_rescued(self, pool: Any, workqueue: Any, work: Any) -> None:
        self._record("work_rescued", pool=pool, workqueue=workqueue, work=work)

    @hookimpl
    def cmwq_work_started(self, pool: Any, workqueue: Any, work: Any) -> None:
        self._record("work_started", pool=pool, workqueue=workqueue, work=work)

    @hookimpl
    def cmwq_work_finished(self, pool: Any, workqueue: Any, work: Any, error: BaseException | None) -> None:
        self._record("work_finished", pool=pool, workqueue=workqueue, work=work, error=error)


# -- registering ------------------------------------------------------------------------------------


def test_register_and_unregister_restore_what_was_in_force() -> None:
    plugin.get_plugin_manager()  # the entry-point plugins are loaded (the pools do it as they start)
    before = snapshot()

    class Observer:
        @hookimpl
        def cmwq_need_more_worker(self, pool: Any) -> None:
            return None

        @hookimpl
        def cmwq_work_started(self, pool: Any, workqueue: Any, work: Any) -> None:
            pass

    obj = Observer()
    name = plugin.register(obj, name=f"observer-{uuid.uuid4().hex[:8]}")
    try:
        assert plugin.get_plugin_manager().get_plugin(name) is obj
        assert plugin.current_policy.need_more_worker is not before["need_more_worker"]
        assert plugin.events.work_started is not None
        with pytest.raises(ValueError):
            plugin.register(obj, name="again")  # already registered
    finally:
        plugin.unregister(name=name)
    assert snapshot() == before
    name = plugin.register(obj, name=f"observer-{uuid.uuid4().hex[:8]}")
    plugin.unregister(obj)  # by object
    assert snapshot() == before


def test_only_the_defaults_cost_nothing() -> None:
    """With no policy plugin registered, the pools call the kernel's formulas directly."""
    pm = plugin.get_plugin_manager()
    policy_plugins = [p for name, p in pm.list_name_plugin() if name != "cmwq_exec.default_policy"
                      and any(hasattr(p, "cmwq_" + h) for h in plugin.POLICY_HOOKS)]
    if policy_plugins:
        pytest.skip(f"policy plugins installed: {policy_plugins}")
    for name in plugin.POLICY_HOOKS:
        assert getattr(plugin.current_policy, name) is getattr(policy, name)


def test_pools_follow_registration(registered: Register) -> None:
    import cmwq_exec

    pools = cmwq_exec.get_system().pools
    calls = []

    class Observer:
        @hookimpl
        def cmwq_keep_working(self, pool: Any) -> None:
            calls.append(pool)

    name = registered(Observer())
    assert all(p.keep_working is plugin.current_policy.keep_working for p in pools)
    wq = WorkQueue("observed")
    for _ in range(20):
        wq.queue_work(Work(int))
    wq.flush()
    assert calls and all(p in pools for p in calls)
    plugin.unregister(name=name)
    assert all(p.keep_working is plugin.current_policy.keep_working for p in pools)


# -- policy answers ---------------------------------------------------------------------------------


def test_policy_plugin_answer_wins_and_none_falls_through(registered: Register) -> None:
    class OnlyFakes:
        """Decides for fake pools only (never for the real ones these tests share)."""

        @hookimpl
        def cmwq_too_many_workers(self, pool: Any) -> bool | None:
            return getattr(pool, "verdict", None)

    registered(OnlyFakes())
    too_many = plugin.current_policy.too_many_workers
    assert too_many(fake_pool(verdict=True)) is True  # the default says False (no idle workers)
    assert too_many(fake_pool(nr_idle=5, nr_workers=5, verdict=False)) is False  # the default says True
    assert too_many(fake_pool()) is False  # None: the kernel's formula
    assert too_many(fake_pool(nr_idle=5, nr_workers=5)) is True


def test_last_registered_answers_first(registered: Register) -> None:
    class Says:
        def __init__(self, answer: bool | None) -> None:
            self.answer = answer

        @hookimpl
        def cmwq_need_to_manage_workers(self, pool: Any) -> bool | None:
            return self.answer if getattr(pool, "fake", False) else None

    registered(Says(True), "first")
    assert plugin.current_policy.need_to_manage_workers(fake_pool(fake=True)) is True
    registered(Says(False), "second")
    assert plugin.current_policy.need_to_manage_workers(fake_pool(fake=True)) is False
    registered(Says(None), "third")  # passes: the next one decides
    assert plugin.current_policy.need_to_manage_workers(fake_pool(fake=True)) is False


def test_raising_policy_plugin_is_logged_once_and_the_default_is_used(
        registered: Register, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        calls = 0

        @hookimpl
        def cmwq_need_more_worker(self, pool: Any) -> bool:
            Broken.calls += 1
            raise ZeroDivisionError("broken policy")

    name = registered(Broken(), "broken-policy")
    with caplog.at_level(logging.ERROR, logger="cmwq_exec.plugin"):
        assert plugin.current_policy.need_more_worker(fake_pool(pending=1)) is True  # the default's
        assert plugin.current_policy.need_more_worker(fake_pool()) is False
        wq = WorkQueue("with-broken-policy")
        done = []
        for i in range(200):
            wq.queue_work(Work(done.append, i))
        wq.flush()
        executor_wq = WorkQueue("with-broken-policy-unbound", WQ.UNBOUND)
        for i in range(200, 220):
            executor_wq.queue_work(Work(done.append, i))
        executor_wq.flush()
    assert sorted(done) == list(range(220))
    assert Broken.calls > 3
    reports = [r for r in caplog.records if name in r.getMessage()]
    assert len(reports) == 1, [r.getMessage() for r in reports]
    assert "cmwq_need_more_worker" in reports[0].getMessage()
    assert reports[0].exc_info is not None and reports[0].exc_info[0] is ZeroDivisionError


# -- events -----------------------------------------------------------------------------------------


def test_work_events(registered: Register) -> None:
    recorder = Recorder()
    registered(recorder, "recorder")
    wq = WorkQueue("events")

    def boom() -> None:
        raise RuntimeError("boom")

    ok, bad = Work(int), Work(boom)
    wq.queue_work(ok)
    wq.queue_work(bad)
    wq.flush()
    started = [c for c in recorder.of("work_started") if c["workqueue"] is wq]
    finished = [c for c in recorder.of("work_finished") if c["workqueue"] is wq]
    assert {id(c["work"]) for c in started} == {id(ok), id(bad)}
    by_work = {id(c["work"]): c for c in finished}
    assert by_work[id(ok)]["error"] is None
    assert isinstance(by_work[id(bad)]["error"], RuntimeError)
    assert all(c["pool"].cpu is not None for c in started)


def test_worker_lifecycle_events(reset_system: Callable[..., Any], registered: Register) -> None:
    recorder = Recorder()
    registered(recorder, "lifecycle")
    system = reset_system(idle_timeout=0.1)
    pool = system.unbound_pool
    wq = WorkQueue("lifecycle", WQ.UNBOUND)
    gate = threading.Event()
    started = []

    def hold() -> None:
        started.append(1)
        with blocking():
            assert gate.wait(30)

    try:
        for _ in range(6):
            wq.queue_work(Work(hold))
        wait_for("len(started) == 6", lambda: len(started) == 6)
    finally:
        gate.set()
    wq.flush()
    wait_for("reaping down to two idle workers", lambda: pool.nr_workers == 2)
    created = [c for c in recorder.of("worker_created") if c["pool"] is pool]
    destroyed = [c for c in recorder.of("worker_destroyed") if c["pool"] is pool]
    managed = [c for c in recorder.of("manager_ran") if c["pool"] is pool]
    assert len(created) >= 7  # the first worker and one per blocked work
    assert len(created) - len(destroyed) == 2
    assert {c["reason"] for c in destroyed} == {"idle"}
    # the manager reports each creation, and the idle timer each reaping, as the manager's two halves
    assert managed and all((c["created"] == 1 and c["destroyed"] == 0)
                           or (c["created"] == 0 and c["destroyed"] >= 1) for c in managed)
    assert sum(c["created"] for c in managed) >= 1
    assert sum(c["destroyed"] for c in managed) == len(destroyed)
    assert {id(c["worker"]) for c in destroyed} <= {id(c["worker"]) for c in created}


def test_creation_failure_mayday_and_rescue_events(reset_system: Callable[..., Any], registered: Register,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    registered(recorder, "mayday")
    system = reset_system(create_cooldown=0.05)
    wq = WorkQueue("mayday", WQ.UNBOUND | WQ.RESCUER)
    pool = system.unbound_pool
    wait_for("pool.nr_idle == 1 and not pool.managing", lambda: pool.nr_idle == 1 and not pool.managing)
    monkeypatch.setattr("cmwq_exec.core.worker.start_thread", cannot_start_thread)
    works = [Work(int) for _ in range(3)]
    for work in works:
        wq.queue_work(work)
    wait_for("works rescued", lambda: not any(w.pending for w in works))
    monkeypatch.undo()
    wq.flush()
    failed = recorder.of("worker_create_failed")
    assert failed and all(c["pool"] is pool for c in failed)
    assert all("can't start new thread" in str(c["error"]) for c in failed)
    assert any(c["workqueue"] is wq for c in recorder.of("mayday"))
    rescued = [c for c in recorder.of("work_rescued") if c["workqueue"] is wq]
    assert rescued and {id(c["work"]) for c in rescued} <= {id(w) for w in works}


def test_raising_event_hook_is_logged_once_and_others_still_run(registered: Register,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        @hookimpl
        def cmwq_work_started(self, pool: Any, workqueue: Any, work: Any) -> None:
            raise ValueError("broken event hook")

    recorder = Recorder()
    registered(recorder, "still-called")
    name = registered(Broken(), "broken-event")
    wq = WorkQueue("broken-events")
    done = []
    with caplog.at_level(logging.ERROR, logger="cmwq_exec.plugin"):
        for i in range(50):
            wq.queue_work(Work(done.append, i))
        wq.flush()
    assert sorted(done) == list(range(50))
    assert len([c for c in recorder.of("work_started") if c["workqueue"] is wq]) == 50
    reports = [r for r in caplog.records if name in r.getMessage()]
    assert len(reports) == 1


# -- choosing pools ---------------------------------------------------------------------------------


def test_select_pool_plugin_places_works(registered: Register) -> None:
    import cmwq_exec

    system = cmwq_exec.get_system()
    target = system.online_pools[-1]
    wq = WorkQueue("placed")

    class Place:
        @hookimpl
        def cmwq_select_pool(self, workqueue: Any, pools: list[Any], current_pool: Any) -> Any:
            assert current_pool in pools
            return target if workqueue is wq else None

    registered(Place())
    ran_on = []
    for _ in range(30):
        wq.queue_work(Work(lambda: ran_on.append(current_worker().pool)))  # type: ignore[union-attr]
    wq.flush()
    assert set(ran_on) == {target}


def test_select_pool_answer_outside_the_online_pools_is_ignored(registered: Register,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    wq = WorkQueue("misplaced")

    class Bad:
        @hookimpl
        def cmwq_select_pool(self, workqueue: Any, pools: list[Any], current_pool: Any) -> Any:
            return "not a pool" if workqueue is wq else None

    name = registered(Bad(), "bad-select")
    ran_on = []
    with caplog.at_level(logging.ERROR, logger="cmwq_exec.plugin"):
        for _ in range(10):
            wq.queue_work(Work(lambda: ran_on.append(current_worker().pool)))  # type: ignore[union-attr]
        wq.flush()
    assert len(ran_on) == 10 and all(p.cpu is not None for p in ran_on)
    assert len([r for r in caplog.records if name in r.getMessage()]) == 1
