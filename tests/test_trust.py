"""What a user must be able to trust: nothing submitted is lost, leaked or wedged, whatever faults occur.

Each test pins one promise of README's "Forward progress" section: queued calls finish at exit,
dropped executors free their threads, a failed thread creation or a Ctrl-C leaves the pools working,
one lock order holds under hotplug churn, the timer thread survives any delay, a misbehaving plugin
cannot stop a pool, nested waits never deadlock, fork is safe, cancel and flush never poll, slow
reads stay out of the pool lock, and a CMWQExecutor keeps ThreadPoolExecutor's attributes.
"""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import helpers
import pytest
from helpers import log_messages, registered, wait_for

import cmwq_exec
from cmwq_exec import CMWQExecutor, DelayedWork, Work, WorkQueue, blocking, hookimpl
from cmwq_exec.core import lockdep
from cmwq_exec.core import system as _system

pytestmark = pytest.mark.timeout(180)


def run_python(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter without the installed plugins (their hooks are not under test here)."""
    return helpers.run_python(code, timeout, CMWQ_EXEC_DISABLE_PLUGIN_AUTOLOAD="1", **env)


# -- 1. nothing submitted is lost at interpreter exit ---------------------------------------------

EXIT_CASES = {
    "dropped executor": """
        def start():
            ex = CMWQExecutor(max_workers=2)
            return [ex.submit(slow, i) for i in range(5)]
        futs = start()
    """,
    "shutdown(wait=False) then del": """
        ex = CMWQExecutor(max_workers=2)
        futs = [ex.submit(slow, i) for i in range(5)]
        ex.shutdown(wait=False)
        del ex
    """,
    "one-liners": """
        for i in range(5):
            CMWQExecutor().submit(slow, i)
    """,
    "plain workqueue": """
        wq = cmwq_exec.WorkQueue("exit", max_active=1)
        for i in range(5):
            wq.queue_work(cmwq_exec.Work(slow, i))
    """,
}


@pytest.mark.parametrize("case", sorted(EXIT_CASES))
def test_queued_calls_run_at_interpreter_exit(case: str) -> None:
    code = """
        import sys, time
        import cmwq_exec
        from cmwq_exec import CMWQExecutor
        def slow(i):
            time.sleep(0.05)
            sys.stdout.write(f"ran {i}\\n")  # one write: calls that run at once do not interleave
            sys.stdout.flush()
    """ + EXIT_CASES[case]
    proc = run_python(textwrap.dedent(code).replace("\n        ", "\n"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")[:-1]) == [f"ran {i}" for i in range(5)], proc.stdout


# -- 2. dropped executors free their threads; the system has a lifecycle ---------------------------

def test_dropped_executors_free_their_rescuers_and_workqueues(fresh_system: Any) -> None:
    system = fresh_system()
    CMWQExecutor().submit(int).result(timeout=10)  # the pools' own threads exist before we count
    gc.collect()
    threads_before = threading.active_count()
    wqs_before = len(system.workqueues)
    for i in range(300):
        assert CMWQExecutor(max_workers=2).submit(pow, 2, i).result(timeout=10) == 2 ** i
    gc.collect()
    # every rescuer exits once its executor is gone and its calls are done
    wait_for("the dropped executors' rescuers to exit",
             lambda: threading.active_count() <= threads_before + 2, timeout=30)
    assert len(system.workqueues) <= wqs_before + 1


def test_shutdown_without_wait_stops_the_rescuer_once_drained(make_executor: Any,
                                                              release: Any) -> None:
    gate = release(threading.Event())
    executor = make_executor()
    rescuer = executor.workqueue._rescuer.thread
    future = executor.submit(gate.wait, 30)
    executor.shutdown(wait=False)
    time.sleep(0.05)
    assert rescuer.is_alive(), "the rescuer must stay while a call is in flight"
    gate.set()
    assert future.result(timeout=10) is True
    wait_for("the rescuer to exit", lambda: not rescuer.is_alive())


def test_system_shutdown_frees_its_threads(fresh_system: Any) -> None:
    def threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("cmwq"))

    fresh_system(hotplug=True)
    CMWQExecutor().submit(int).result(timeout=10)
    first = threads()
    for _ in range(5):
        fresh_system(hotplug=True)
        CMWQExecutor().submit(int).result(timeout=10)
    wait_for("the replaced systems' threads to exit", lambda: threads() <= first + 1, timeout=30)


def test_a_shut_down_system_refuses_works_with_a_clear_error(fresh_system: Any) -> None:
    fresh_system()
    wq = WorkQueue("old")
    fresh_system()
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.queue_work(Work(int))


# -- 3. no exception leaves a lock held or an invariant broken -------------------------------------

@pytest.mark.parametrize("nth", range(1, 8))
def test_a_failed_thread_start_never_wedges_and_never_runs_a_refused_call(nth: int) -> None:
    """The nth Thread.start() of the process raises once (the timer, a worker, the hotplug monitor,
    a rescuer...): the call that saw it either raised and never ran, or ran once; afterwards
    submits, delayed works and the pools all work."""
    proc = run_python(f"""
        import threading, time
        import cmwq_exec
        from cmwq_exec import CMWQExecutor, DelayedWork, WorkQueue
        real_start = threading.Thread.start
        count = [0]
        def start(self):
            count[0] += 1
            if count[0] == {nth}:
                raise RuntimeError("can't start new thread (injected)")
            return real_start(self)
        threading.Thread.start = start
        ran, accepted = [], 0
        for i in range(20):
            try:
                ex = CMWQExecutor(max_workers=4)
                ex.submit(ran.append, i).result(timeout=10)
                accepted += 1
            except RuntimeError as exc:
                assert "injected" in str(exc), exc
        assert sorted(ran) == sorted(set(ran)) and len(ran) == accepted, (ran, accepted)
        assert accepted >= 19, accepted
        fired = threading.Event()
        wq = WorkQueue("after")
        assert wq.queue_delayed_work(DelayedWork(fired.set), 0.01)
        assert fired.wait(10), "delayed works stopped running"
        print("ok", accepted)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout


@pytest.mark.skipif(lockdep.ENABLED, reason="debug mode: CheckedLock.__enter__ is a Python function, "
                    "so a Ctrl-C raised as it returns keeps the lock (plain locks' is C)")
def test_ctrl_c_in_a_submit_loop_never_wedges_the_pools() -> None:
    """KeyboardInterrupt lands anywhere in tight submit and queue loops, 40 times over: each time the
    process can still submit, cancel, flush and shut down.

    The handler raises once per run. Python swallows an exception raised inside a weakref callback
    ("Exception ignored in"), so the loop also ends when the interrupt has been raised but did not
    reach it; it never waits for a second signal."""
    proc = run_python("""
        import faulthandler, random, signal, threading, time
        import cmwq_exec
        from cmwq_exec import CMWQExecutor, Work, WorkQueue
        faulthandler.dump_traceback_later(100, exit=True)
        armed = interrupted = False

        def interrupt(signum, frame):
            global armed, interrupted
            if armed:
                armed, interrupted = False, True
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupt)
        main = threading.main_thread().ident

        def ctrl_c(delay):
            global armed
            time.sleep(delay)
            armed = True
            while armed:
                signal.pthread_kill(main, signal.SIGINT)
                time.sleep(0.005)

        wq = WorkQueue("ki", max_active=2)
        for run in range(40):
            ex = CMWQExecutor(max_workers=(None, 2)[run % 2])
            works = [Work(int) for _ in range(8)]
            interrupted = False
            try:
                threading.Thread(target=ctrl_c, args=(random.uniform(0.001, 0.02),)).start()
                while not interrupted:
                    ex.submit(int)
                    for w in works:
                        wq.queue_work(w)
                        w.cancel()
            except KeyboardInterrupt:
                pass
            assert ex.submit(pow, 2, 5).result(timeout=10) == 32
            for w in works:
                w.cancel()
            wq.flush()
            ex.shutdown()
        for pool in cmwq_exec.get_system().pools:
            with pool.lock:
                pool.check_invariants()
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n", proc.stdout + proc.stderr


# -- 4. one lock order, checked --------------------------------------------------------------------

def test_the_lock_checker_refuses_an_inverted_order() -> None:
    pool, system = lockdep.CheckedLock("pool"), lockdep.CheckedLock("system")
    before = len(lockdep.violations)
    with system, pool:
        pass  # the documented order
    with pool, pytest.raises(lockdep.LockOrderError, match="taking 'system'.*holding 'pool'"):
        system.acquire()
    assert not system.locked()
    with pool:
        assert system.acquire(blocking=False)  # a try-lock cannot deadlock
        system.release()
    cond = threading.Condition(lockdep.CheckedLock("flush"))
    with cond:
        cond.wait(0.001)  # a Condition over a checked lock keeps the bookkeeping right
    with lockdep.CheckedLock("pool"):
        pass
    del lockdep.violations[before:]


def test_hotplug_churn_with_napping_works_never_deadlocks(fresh_system: Any) -> None:
    """cpu_down/cpu_up in a loop while works that nap in blocking() flow, with workers reaped and
    trustees paced as fast as the settings allow, and the GIL handed over every microsecond so
    that threads interleave inside short critical sections. It deadlocked within a few hundred
    cycles when destroy_worker took System.lock under a pool lock and cpu_up the other way."""
    import random

    system = fresh_system(idle_timeout=0.001, trustee_cooldown=0.001)
    if len(system.cpu_pools) < 2:
        pytest.skip("needs two CPUs")
    cpu = max(system.cpu_pools)
    wq = WorkQueue("churn")
    done: list[int] = []
    queued = [0]
    stop = threading.Event()

    def nap(i: int) -> None:
        with blocking():
            time.sleep(0.0005)
        done.append(i)

    def feed() -> None:
        while not stop.is_set():
            for _ in range(8):
                wq.queue_work_on(cpu, Work(nap, queued[0]))
                queued[0] += 1
            time.sleep(0.002)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    feeder = threading.Thread(target=feed, daemon=True)
    cycles = 0
    try:
        feeder.start()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            flipped = threading.Event()

            def flip(flipped: threading.Event = flipped) -> None:
                system.cpu_down(cpu)
                system.cpu_up(cpu)
                flipped.set()

            threading.Thread(target=flip, daemon=True).start()
            assert flipped.wait(20), f"cpu_down/cpu_up deadlocked after {cycles} cycles"
            cycles += 1
            time.sleep(random.uniform(0, 0.003))
    finally:
        sys.setswitchinterval(switch)
        stop.set()
        feeder.join(10)
    flushed = threading.Event()
    threading.Thread(target=lambda: (wq.flush(), flushed.set()), daemon=True).start()
    assert flushed.wait(60), f"the works never finished after {cycles} cycles: deadlock"
    assert cycles > 100 and len(done) == queued[0] > 100, (cycles, len(done), queued[0])


# -- 5. the timer thread cannot die ----------------------------------------------------------------

def test_a_delay_must_be_finite_and_a_huge_one_is_clamped(fresh_system: Any) -> None:
    fresh_system()
    wq = WorkQueue("delays")
    for bad in (float("inf"), float("nan"), -1, "1", True):
        with pytest.raises(ValueError, match=r"queue_delayed_work\(work, delay\): delay must be"):
            wq.queue_delayed_work(DelayedWork(int), bad)
    huge = DelayedWork(int)
    assert wq.queue_delayed_work(huge, 1e12)
    fired = threading.Event()
    assert wq.queue_delayed_work(DelayedWork(fired.set), 0.01)
    assert fired.wait(10), "the timer thread died"
    assert huge.cancel() and not huge.pending


def test_configure_refuses_non_finite_values_and_bad_environment() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        cmwq_exec.configure(idle_timeout=float("nan"))
    proc = run_python("import cmwq_exec; cmwq_exec.get_system()", CMWQ_HOTPLUG="garbage")
    assert proc.returncode != 0 and "CMWQ_HOTPLUG" in proc.stderr, proc.stderr


# -- 6. a misbehaving plugin never wedges a pool ---------------------------------------------------

@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("hook", ["cmwq_work_started", "cmwq_work_finished", "cmwq_keep_working"])
def test_a_hook_raising_any_base_exception_is_skipped(make_executor: Any, hook: str,
                                                     exc: type[BaseException]) -> None:
    def raising(**kwargs: Any) -> None:
        raise exc("from a plugin")

    plugin = type("Raising", (), {hook: staticmethod(hookimpl(raising))})()
    executor = make_executor()
    with registered(plugin, "raising"):
        futures = [executor.submit(pow, 2, i) for i in range(50)]
        assert [f.result(timeout=10) for f in futures] == [2 ** i for i in range(50)]
    assert [executor.submit(pow, 3, i).result(timeout=10) for i in range(5)] == [1, 3, 9, 27, 81]


def test_a_worker_whose_loop_raises_is_replaced_and_accounted(fresh_system: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The last line of defence: should a worker's own loop ever raise (a bug; hooks and works
    cannot make it), the pool takes it out of its counts and runs its works on another worker."""
    from cmwq_exec.core.worker import Worker

    system = fresh_system()
    pool = system.unbound_pool
    wq = WorkQueue("crash", cmwq_exec.WQ.UNBOUND)
    wq.queue_work(Work(int))
    wq.flush()
    real = Worker.work_until_idle
    crashed = threading.Event()

    def once(self: Worker) -> None:
        if not crashed.is_set():
            crashed.set()
            raise RuntimeError("injected into the worker loop")
        real(self)

    monkeypatch.setattr(Worker, "work_until_idle", once)
    done = threading.Event()
    with log_messages("cmwq_exec.pool") as messages:
        assert wq.queue_work(Work(done.set))
        assert done.wait(10), "the works of a crashed worker's pool stopped"
    assert crashed.is_set() and any("injected into the worker loop" in m for m in messages), messages
    monkeypatch.undo()
    wq.flush()
    with pool.lock:
        pool.check_invariants()
    assert system.nr_threads == sum(p.nr_workers for p in system.pools)


# -- 7. nested waits never deadlock, at any depth --------------------------------------------------

@pytest.mark.parametrize(("max_workers", "depth"), [(1, 65), (1, 200), (4, 300)])
def test_nested_submit_and_wait_never_deadlocks(make_executor: Any, max_workers: int,
                                                depth: int) -> None:
    executor = make_executor(max_workers=max_workers)

    def chain(n: int) -> int:
        return 0 if n == 0 else 1 + executor.submit(chain, n - 1).result(timeout=60)

    assert executor.submit(chain, depth).result(timeout=120) == depth


def test_waiting_with_futures_wait_gives_the_slot_up(make_executor: Any) -> None:
    from concurrent.futures import wait

    executor = make_executor(max_workers=1)

    def outer() -> int:
        inner = [executor.submit(pow, 2, i) for i in range(3)]
        wait(inner, timeout=30)
        return sum(f.result(timeout=0) for f in inner)

    assert executor.submit(outer).result(timeout=60) == 7


# -- 8. fork is safe -------------------------------------------------------------------------------

def test_fork_while_threads_submit_never_hangs_the_child() -> None:
    proc = run_python("""
        import os, sys, threading, time, warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, on purpose
        sys.setswitchinterval(1e-6)  # threads are preempted inside short critical sections
        from cmwq_exec import CMWQExecutor
        ex = CMWQExecutor()
        stop = threading.Event()
        def submitter():
            while not stop.is_set():
                f = ex.submit(int, "1")
                f.result(timeout=10)
                f.add_done_callback(lambda f: None)
        threads = [threading.Thread(target=submitter, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        hung = 0
        for _ in range(100):
            pid = os.fork()
            if pid == 0:
                # many futures: whichever of the parent's locks was held at the fork, one of
                # them meets it (each future's state lock is one of a set, chosen by address)
                futures = [ex.submit(pow, 2, i) for i in range(300)]
                for f in futures:
                    f.add_done_callback(lambda f: None)
                ok = [f.result(timeout=10) for f in futures] == [2 ** i for i in range(300)]
                os._exit(0 if ok else 1)
            deadline = time.monotonic() + 15
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0, status
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.002)
        stop.set()
        print("hung", hung)
    """, timeout=170)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hung 0\n", proc.stdout


# -- 9. cancel and flush never spin or poll --------------------------------------------------------

def test_flush_of_a_delayed_work_whose_workqueue_was_destroyed(fresh_system: Any) -> None:
    fresh_system()
    wq = WorkQueue("gone")
    work = DelayedWork(int)
    assert wq.queue_delayed_work(work, 60)
    wq.destroy()
    with log_messages("cmwq_exec.workqueue") as messages:
        work.flush()  # returns: the work is cancelled visibly, not left pending
    assert not work.pending
    assert any("destroyed" in message for message in messages), messages
    assert not work.cancel()
    other = WorkQueue("other")
    assert other.queue_work(work)
    work.flush()


def test_cancel_and_flush_wait_without_timeouts_or_spinning(make_executor: Any, monkeypatch: Any,
                                                            release: Any) -> None:
    """Every state a pending work can be in, cancelled and flushed while workers run: no wait
    with a timeout, no sleep(0)."""
    from cmwq_exec.core import pending
    from cmwq_exec.core import work as work_module

    waits: list[Any] = []
    real_wait = threading.Condition.wait

    def recording_wait(self: Any, timeout: Any = None) -> Any:
        if self is pending.work_flush.cond or getattr(self, "_cmwq_flush", False):
            waits.append(timeout)
        return real_wait(self, timeout)

    spins: list[float] = []
    real_sleep = time.sleep

    def no_spin(seconds: float) -> None:
        if seconds == 0:
            spins.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(threading.Condition, "wait", recording_wait)
    monkeypatch.setattr(work_module.time, "sleep", no_spin)
    gate = release(threading.Event())
    limited = WorkQueue("limited", max_active=1)
    limited._flush_cond._cmwq_flush = True
    blocker = Work(lambda: gate.wait(30))
    assert limited.queue_work(blocker)
    inactive = Work(int)
    assert limited.queue_work(inactive)
    delayed = DelayedWork(int)
    assert limited.queue_delayed_work(delayed, 30)
    assert inactive.cancel() and delayed.cancel()
    assert not inactive.pending and not delayed.pending
    flusher = threading.Thread(target=blocker.flush)
    flusher.start()
    wait_for("the flusher to wait for the running work", lambda: pending.work_flush.waiters >= 1)
    gate.set()
    flusher.join(10)
    assert not flusher.is_alive()
    limited.flush()
    assert waits and all(timeout is None for timeout in waits), waits
    assert not spins, "cancel spun with sleep(0)"


# -- 10. slow work stays out of the pool lock ------------------------------------------------------

def test_a_rescue_scans_the_worklist_once_not_once_per_work() -> None:
    from cmwq_exec.core.worker import Rescuer

    reads = [0]
    foreign_pwq = SimpleNamespace(wq=object())

    class Foreign:
        @property
        def _pwq(self) -> Any:
            reads[0] += 1
            return foreign_pwq

    wq = SimpleNamespace(name="mine")
    mine_pwq = SimpleNamespace(wq=wq, nr_rescued=0)
    own = [SimpleNamespace(_pwq=mine_pwq, _where=None) for _ in range(200)]
    foreign = [Foreign() for _ in range(2000)]
    from collections import deque

    pool = SimpleNamespace(lock=threading.Lock(), worklist=deque(foreign[:1000] + own + foreign[1000:]),
                           system=SimpleNamespace(bind_thread=lambda pool: None), online=True,
                           need_to_create_worker=lambda pool: True, need_more_worker=lambda pool: False,
                           name="fake")
    rescuer = Rescuer.__new__(Rescuer)
    ran: list[Any] = []
    rescuer.worker = SimpleNamespace(pool=None, process_one_work=ran.append)
    rescuer.rescue(wq, pool)
    assert ran == own
    assert list(pool.worklist) == foreign
    # each foreign entry looked at twice (the pass that puts the workqueue's works first, the last
    # search that finds none of them left), not once per work (that would be 400,000 reads)
    assert reads[0] <= 2 * len(foreign) + 1, reads[0]


# -- 11. a ThreadPoolExecutor's attributes, with their meaning -------------------------------------

def test_cmwq_executor_keeps_every_thread_pool_executor_attribute(make_executor: Any) -> None:
    with ThreadPoolExecutor() as tpe:
        expected = set(vars(tpe))
    executor = make_executor(max_workers=3)
    missing = {name for name in expected if not hasattr(executor, name)}
    assert not missing, missing
    assert executor._broken is False and executor._shutdown is False
    assert executor._max_workers == 3
    assert executor._work_queue.qsize() == 0 and executor._work_queue.empty()
    executor.submit(int).result(timeout=10)
    assert executor._threads and all(isinstance(t, threading.Thread) for t in executor._threads)

    def fail() -> None:
        raise ValueError("init")

    broken = make_executor(initializer=fail)
    broken.submit(int).exception(timeout=10)
    assert isinstance(broken._broken, str) and "initializer" in broken._broken
    executor.shutdown()
    assert executor._shutdown is True


def test_the_pending_view_counts_calls_not_yet_started(make_executor: Any, release: Any) -> None:
    gate = release(threading.Event())
    executor = make_executor(max_workers=1)
    running = executor.submit(gate.wait, 30)
    queued = [executor.submit(int) for _ in range(3)]
    wait_for("the first call to start", lambda: executor._work_queue.qsize() == 3)
    gate.set()
    assert running.result(timeout=10) and all(f.result(timeout=10) == 0 for f in queued)
    assert executor._work_queue.empty()


def test_lockdep_saw_no_violation() -> None:
    """With CMWQ_LOCKDEP=1 (CI runs the suite so once), no test so far took a lock out of order."""
    assert lockdep.violations == []


@pytest.fixture(autouse=True)
def _no_leftover_interrupt_handler() -> Any:
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


_ = _system
