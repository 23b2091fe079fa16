"""The policy predicates against the kernel's formulas (reference: cmwq-2009-patch.txt, "Policy
functions"), on fake pools: each predicate only reads the pool's counters."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from helpers import fake_pool
from hypothesis import given, settings
from hypothesis import strategies as st

from cmwq_exec import plugin
from cmwq_exec.core import policy
from cmwq_exec.core.policy import (
    MAX_IDLE_WORKERS_RATIO,
    keep_working,
    may_start_working,
    need_more_worker,
    need_to_create_worker,
    need_to_manage_workers,
    too_many_workers,
)

# -- a direct transcription of the C, for the property tests ----------------------------------------


def c_need_more_worker(gcwq: Any) -> bool:
    # return !list_empty(&gcwq->worklist) && !atomic_read(nr_running);
    return (len(gcwq.worklist) != 0) and not gcwq.nr_running


def c_may_start_working(gcwq: Any) -> bool:
    # return gcwq->nr_idle;   (an int converted to bool)
    return gcwq.nr_idle != 0


def c_keep_working(gcwq: Any) -> bool:
    # return !list_empty(&gcwq->worklist) && atomic_read(nr_running) <= 1;
    return (len(gcwq.worklist) != 0) and gcwq.nr_running <= 1


def c_need_to_create_worker(gcwq: Any) -> bool:
    return c_need_more_worker(gcwq) and not c_may_start_working(gcwq)


def c_need_to_manage_workers(gcwq: Any) -> bool:
    # return need_to_create_worker(gcwq) || gcwq->flags & GCWQ_MANAGE_WORKERS;
    return c_need_to_create_worker(gcwq) or bool(gcwq.manage_requested)


def c_too_many_workers(gcwq: Any) -> bool:
    managing = 1 if gcwq.managing else 0
    nr_idle = gcwq.nr_idle + managing  # manager is considered idle
    nr_busy = gcwq.nr_workers - nr_idle
    return nr_idle > 2 and (nr_idle - 2) * 4 >= nr_busy


PAIRS = [
    (need_more_worker, c_need_more_worker),
    (may_start_working, c_may_start_working),
    (keep_working, c_keep_working),
    (need_to_create_worker, c_need_to_create_worker),
    (need_to_manage_workers, c_need_to_manage_workers),
    (too_many_workers, c_too_many_workers),
]


# -- each predicate, case by case -------------------------------------------------------------------


@pytest.mark.parametrize(("pending", "nr_running", "expected"), [
    (0, 0, False),  # nothing to do
    (1, 0, True),  # work and nobody running: wake someone
    (5, 0, True),
    (1, 1, False),  # a runner will take it
    (3, 2, False),
])
def test_need_more_worker(pending: int, nr_running: int, expected: bool) -> None:
    assert need_more_worker(fake_pool(pending, nr_running)) is expected


@pytest.mark.parametrize(("nr_idle", "expected"), [(0, False), (1, True), (7, True)])
def test_may_start_working_only_if_an_idle_worker_stays_behind(nr_idle: int, expected: bool) -> None:
    assert may_start_working(fake_pool(nr_idle=nr_idle)) is expected


@pytest.mark.parametrize(("pending", "nr_running", "expected"), [
    (0, 1, False),  # nothing left
    (1, 0, True),
    (1, 1, True),  # the only runner keeps going (batching)
    (1, 2, False),  # another runner exists: stop and let concurrency management decide
    (9, 5, False),
])
def test_keep_working(pending: int, nr_running: int, expected: bool) -> None:
    assert keep_working(fake_pool(pending, nr_running)) is expected


@pytest.mark.parametrize(("pending", "nr_running", "nr_idle", "expected"), [
    (1, 0, 0, True),  # work, nobody running, nobody idle: create
    (1, 0, 1, False),  # an idle worker can be woken
    (1, 1, 0, False),  # someone runs: no need
    (0, 0, 0, False),  # no work
])
def test_need_to_create_worker(pending: int, nr_running: int, nr_idle: int, expected: bool) -> None:
    assert need_to_create_worker(fake_pool(pending, nr_running, nr_idle)) is expected


@pytest.mark.parametrize(("pending", "nr_running", "nr_idle", "manage_requested", "expected"), [
    (1, 0, 0, False, True),  # must create
    (0, 0, 0, True, True),  # asked for (GCWQ_MANAGE_WORKERS), even with nothing pending
    (0, 1, 3, True, True),
    (1, 0, 1, False, False),
    (0, 0, 0, False, False),
])
def test_need_to_manage_workers(pending: int, nr_running: int, nr_idle: int, manage_requested: bool,
                                expected: bool) -> None:
    pool = fake_pool(pending, nr_running, nr_idle, manage_requested=manage_requested)
    assert need_to_manage_workers(pool) is expected


def test_max_idle_workers_ratio_is_the_kernels() -> None:
    assert MAX_IDLE_WORKERS_RATIO == 4


@pytest.mark.parametrize(("nr_idle", "nr_busy", "managing", "expected"), [
    # two idle workers are always kept
    (0, 0, False, False),
    (2, 0, False, False),
    (2, 100, False, False),
    # a third idle one goes only while (idle - 2) * 4 >= busy
    (3, 0, False, True),
    (3, 4, False, True),  # boundary: 1 * 4 >= 4
    (3, 5, False, False),  # 1 * 4 < 5
    (4, 8, False, True),  # 2 * 4 >= 8
    (4, 9, False, False),
    (10, 32, False, True),
    (10, 33, False, False),
    # the manager counts as idle (and not as busy)
    (2, 4, True, True),  # idle 3, busy 4: boundary
    (2, 5, True, False),  # idle 3, busy 5
    (1, 0, True, False),  # idle 2 with the manager
    (2, 0, True, True),  # idle 3 with the manager
])
def test_too_many_workers_boundaries(nr_idle: int, nr_busy: int, managing: bool, expected: bool) -> None:
    # nr_workers counts the manager (a worker holding the role is neither idle nor busy for the pool)
    pool = fake_pool(nr_idle=nr_idle, nr_workers=nr_idle + nr_busy + managing, managing=managing)
    assert too_many_workers(pool) is expected


def test_too_many_workers_counts_the_manager_as_idle() -> None:
    # Same counters; only the manager flag differs. Without it the manager is one of the 5 busy.
    assert not too_many_workers(fake_pool(nr_idle=2, nr_workers=7, managing=False))
    assert too_many_workers(fake_pool(nr_idle=2, nr_workers=7, managing=True))


@pytest.mark.parametrize("name", [f.__name__ for f, _ in PAIRS])
def test_predicates_return_bools(name: str) -> None:
    fn = getattr(policy, name)
    for pool in (fake_pool(), fake_pool(3, 0, 0), fake_pool(1, 1, 5, managing=True, manage_requested=True)):
        assert type(fn(pool)) is bool


# -- property: the module is the kernel's formulas, on any counters --------------------------------

counts = st.integers(min_value=0, max_value=64)


@st.composite
def consistent_pools(draw: st.DrawFn) -> SimpleNamespace:
    """Counters a real pool can have: workers = idle + busy (+ manager), running <= busy."""
    nr_idle = draw(counts)
    nr_busy = draw(counts)
    managing = draw(st.booleans())
    nr_running = draw(st.integers(min_value=0, max_value=nr_busy))
    return fake_pool(draw(st.integers(0, 5)), nr_running, nr_idle, nr_idle + nr_busy + managing, managing,
                     draw(st.booleans()))


@st.composite
def any_pools(draw: st.DrawFn) -> SimpleNamespace:
    """Arbitrary counters (the predicates must agree with the C even on nonsense)."""
    return fake_pool(draw(st.integers(0, 5)), draw(counts), draw(counts), draw(counts), draw(st.booleans()),
                     draw(st.booleans()))


@settings(max_examples=400, deadline=None)
@given(pool=st.one_of(consistent_pools(), any_pools()))
def test_policy_matches_the_kernel(pool: SimpleNamespace) -> None:
    for fn, c_fn in PAIRS:
        assert fn(pool) == c_fn(pool), (fn.__name__, pool)


@settings(max_examples=200, deadline=None)
@given(pool=consistent_pools())
def test_policy_relations(pool: SimpleNamespace) -> None:
    """Relations the pool's loop relies on."""
    if need_to_create_worker(pool):
        assert need_more_worker(pool) and not may_start_working(pool)
        assert need_to_manage_workers(pool)
    if need_more_worker(pool):
        assert keep_working(pool)  # whoever is woken for a pending work keeps at it
    if too_many_workers(pool):
        assert pool.nr_idle + pool.managing > 2


# -- the default plugin is the same formulas ----------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(pool=any_pools())
def test_default_policy_plugin_answers_with_the_formulas(pool: SimpleNamespace) -> None:
    plugin_obj = plugin.DefaultPolicy()
    for fn, _ in PAIRS:
        assert getattr(plugin_obj, "cmwq_" + fn.__name__)(pool) == fn(pool)


def test_every_policy_hook_has_a_default() -> None:
    for name in plugin.POLICY_HOOKS:
        assert hasattr(plugin.DefaultPolicy, "cmwq_" + name)
        assert callable(getattr(policy, name))


def test_the_core_and_the_hookspecs_name_the_same_hooks() -> None:
    """The core's list of policy functions and events (core/hooks.py) is the hookspecs' list."""
    from cmwq_exec import hookspecs
    from cmwq_exec.core import hooks

    specs = {name[len("cmwq_"):] for name in dir(hookspecs) if name.startswith("cmwq_")}
    assert specs == set(hooks.POLICY_NAMES) | set(hooks.EVENT_NAMES) | {"select_pool"}
    assert set(vars(hooks.Policy())) == set(hooks.POLICY_NAMES) | {"select_pool"}
    assert set(vars(hooks.Events())) == set(hooks.EVENT_NAMES)
