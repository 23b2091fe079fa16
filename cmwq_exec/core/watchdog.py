"""Watchdog: finding blocked and CPU-hogging workers without annotations, and warning of stalls.

Python gives no scheduler hook, so a worker that blocks in code that did not say so (a C extension,
a database driver, a plain ``time.sleep``) still counts as running and its pool waits behind it. Like
Go's sysmon and Linux's CPU-intensive tick, the watchdog looks at pools that have pending works,
every ``watchdog_tick`` (10 ms), on the single timer thread (so it costs nothing while no work waits),
after an eighth of a tick when a rule fired, or when a worker started a new work since the last
look while the process is not saturated, and after four ticks while it is saturated (see below:
then no rule adds a runner, and each look takes the GIL from a worker that computes). For
each worker that has run the same work across two looks it reads the thread's CPU clock:

* burned (almost) none and is not runnable (``/proc`` state R would mean other processes had the
  CPU): the worker is **blocked**. It leaves ``nr_running`` (flag STUCK), which
  wakes another worker if it was the last runner, and it stays out, taking further works while works
  are pending, until it goes idle or is seen burning CPU again; so every detection adds one runner
  for as long as the backlog lasts, and un-annotated blocking ramps up concurrency quickly.
* burned more than ``cpu_intensive_thresh`` (10 ms) in the work: a **CPU hog**, counted in
  ``cpu_intensive`` as Linux's ``wq_cpu_intensive_thresh_us`` does; it leaves ``nr_running`` until
  the work ends so the pool's other works are not stuck behind it.

(A rule per pool, "a pool that started no work for a tick", misses a blocked runner while other
runners still start works; judging each worker on its own work finds it.)

Growth is rate-limited by the process's CPU use: while the process already burns ~a full core
(``saturation``, per core the interpreter can use: one with the GIL), a thread that burned no CPU may
just be waiting for the GIL and another runner could not run anyway, so neither rule adds runners.
That keeps GIL contention from feeding on itself.

A pool with pending works that started none for ``stall_timeout`` (30 s) gets one warning with the
stacks of its busy workers (and the ``cmwq_stall`` event), per stall.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any

from . import hooks, timer
from .interfaces import SystemForWatchdog
from .lockdep import assert_held, make_lock
from .pool import WorkerPool
from .worker import CPU_INTENSIVE, HOG_SEEN, IDLE, NOT_RUNNING, STUCK, Worker, thread_cpu_ns

log = logging.getLogger("cmwq_exec.watchdog")

#: A worker that burned less than this share of a look's interval was blocked all along.
BLOCKED_SHARE = 0.02
#: After a look that found a new work or acted, the next look comes this much of a tick later.
QUICK_LOOK = 1 / 8
#: While the process is saturated (and no rule fired), the next look comes this many ticks later:
#: no rule can add a runner then, and each look takes the GIL from a worker that computes.
SATURATED_LOOK = 4
#: Cores the process can keep busy with Python code: one while the GIL exists.
_PARALLEL_CORES = 1 if getattr(sys, "_is_gil_enabled", lambda: True)() else None
#: The process counts as saturated at this share of those cores.
SATURATION = 0.85

#: A worker's ``cpu_sample``: (work_seq, CPU ns at the first look at that work, CPU ns now, when).
_Sample = tuple[int, int, int, float]
#: A worker as step 1 of a look saw it: (worker, flags, work_seq, cpu_sample).
_Candidate = tuple[Worker, int, int, _Sample | None]
#: A judged worker: the candidate, the sample to keep, and the verdict (None: nothing to do).
_Judged = tuple[Worker, int, int, _Sample | None, _Sample, str | None]
#: An event to send once the lock is dropped: the hook and its arguments.
_Event = tuple[Any, dict[str, Any]]

# What a look found a worker doing (see Watchdog.check).
_RUNNING_AGAIN = "running again"  # a STUCK worker burns CPU again: it counts as running
_BLOCKED = "blocked"  # no CPU burned and not runnable: leave nr_running (STUCK)
_HOG = "cpu hog"  # burned more than cpu_intensive_thresh in this work: CPU_INTENSIVE


def _runnable(worker: Any) -> bool:
    """Is the thread runnable (state R) rather than asleep? A thread that burned no CPU because other
    processes had the CPU is not blocked. (A thread waiting for the GIL sleeps on a futex, state S:
    that case is what the saturation rule covers.) Costs one /proc read, only for candidates."""
    try:
        with open(f"/proc/self/task/{worker.native_id}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] == b"R"


class Watchdog:
    """One for the whole system; per-pool state lives on the pools."""

    def __init__(self, system: SystemForWatchdog) -> None:
        self.system = system  # I
        self.lock = make_lock("watchdog")  # I: the D of the fields below
        self.load_at = time.monotonic()  # D: start of the current CPU-load window
        self.load_cpu = time.process_time()  # D: the process's CPU time then
        self.load = 0.0  # D: cores the process used over the last window
        cores = _PARALLEL_CORES or max(1, len(system.usable))
        self.saturation = SATURATION * cores  # I

    def arm(self, pool: WorkerPool) -> None:
        """Start looking at ``pool`` (it has pending works). P: held."""
        assert_held(pool.lock)
        timer.add_timer(self.system.config.watchdog_tick, lambda: self.check(pool))
        pool.watch.started = pool.nr_started
        pool.watch.progress_at = time.monotonic()
        pool.watchdog_armed = True  # last: armed only once the timer is set

    def cpu_load(self, now: float) -> float:
        """Cores used by the process, measured over windows of at least half a tick."""
        with self.lock:
            elapsed = now - self.load_at
            if elapsed >= self.system.config.watchdog_tick / 2:
                cpu = time.process_time()
                self.load = (cpu - self.load_cpu) / elapsed
                self.load_at, self.load_cpu = now, cpu
            return self.load

    def check(self, pool: WorkerPool) -> None:
        """One look at ``pool`` (timer thread), in three steps so that the slow reads (thread CPU
        clocks, ``/proc``) and the hooks run without the pool lock:

        1. under the lock, note progress and snapshot each worker running a work: its flags, its
           ``work_seq`` and its ``cpu_sample``;
        2. without it, read the clocks and ``/proc`` and judge each worker;
        3. under the lock again, apply each judgement only if the worker is still on the same work
           (``work_seq``) in the same state (``flags``) it was judged in; a sample is kept if the
           worker is still on that work and nobody replaced the sample meanwhile. Then re-arm.
        """
        config = self.system.config
        tick = config.watchdog_tick
        now = time.monotonic()
        saturated = self.cpu_load(now) >= self.saturation
        candidates = self._snapshot(pool, now)
        if candidates is None:
            return
        judged, soon = self._judge(candidates, now, saturated)
        stall: float | None = None
        with pool.lock:
            events = self._apply(pool, judged, saturated)
            watch = pool.watch
            stalled_for = now - watch.progress_at
            if stalled_for >= config.stall_timeout and not watch.stall_warned:
                watch.stall_warned = True
                stall = stalled_for
                busy = [w for w in pool.workers if not w.flags & IDLE and w.thread is not None]
            timer.add_timer(tick * (QUICK_LOOK if soon else SATURATED_LOOK if saturated else 1),
                            lambda: self.check(pool))
        for hook, kwargs in events:
            hook(**kwargs)
        if stall is not None:
            self.warn_stall(pool, stall, busy)

    @staticmethod
    def _snapshot(pool: WorkerPool, now: float) -> list[_Candidate] | None:
        """Step 1 of :meth:`check`, under the pool lock: note progress, make up a lost wakeup, and
        snapshot each worker running a work. None if nothing is pending (the watchdog disarms)."""
        with pool.lock:
            if not pool.worklist:
                pool.watchdog_armed = False
                return None
            watch = pool.watch
            if pool.nr_started != watch.started:
                watch.started = pool.nr_started
                watch.progress_at = now
                watch.stall_warned = False
            # works pending and nobody running: a wakeup was lost (an interruption between the
            # append and the wake of a submit); make it up
            pool.kick()
            return [(worker, worker.flags, worker.work_seq, worker.cpu_sample)
                    for worker in pool.workers
                    if not worker.flags & IDLE
                    # not running a work, or it said it sleeps:
                    and not worker.flags & (NOT_RUNNING & ~(STUCK | CPU_INTENSIVE))]

    def _judge(self, candidates: list[_Candidate], now: float,
               saturated: bool) -> tuple[list[_Judged], bool]:
        """Step 2 of :meth:`check`, without the lock: read each candidate's CPU clock (and
        ``/proc``) and judge it. Returns the judgements and whether to look again soon."""
        config = self.system.config
        tick = config.watchdog_tick
        thresh_ns = config.cpu_intensive_thresh * 1e9
        soon = False
        judged: list[_Judged] = []
        for worker, flags, seq, sample in candidates:
            ns = thread_cpu_ns(worker)
            if ns is None:
                continue
            if not sample or sample[0] != seq:
                judged.append((worker, flags, seq, sample, (seq, ns, ns, now), None))
                # a new work: look again soon to judge it, unless the process is saturated; then no
                # rule can add a runner, and a stream of short CPU-bound works would have the look
                # take the GIL from the worker every eighth of a tick
                soon = soon or not saturated
                continue
            _, first_ns, last_ns, last_at = sample
            interval = now - last_at
            if interval < tick * QUICK_LOOK:
                continue
            verdict = None
            burned = ns - last_ns
            if flags & STUCK:
                if burned > interval * 1e9 / 2:
                    verdict = _RUNNING_AGAIN
            elif burned < interval * 1e9 * BLOCKED_SHARE:
                if not saturated and not _runnable(worker):
                    verdict = _BLOCKED
                    soon = True
            elif ns - first_ns >= thresh_ns and not flags & HOG_SEEN:
                verdict = _HOG
                soon = soon or not saturated
            judged.append((worker, flags, seq, sample, (seq, first_ns, ns, now), verdict))
        return judged, soon

    @staticmethod
    def _apply(pool: WorkerPool, judged: list[_Judged], saturated: bool) -> list[_Event]:
        """Step 3 of :meth:`check`: apply each judgement to a worker still on the same work in the
        same state. Returns the events to send once the lock is dropped. P: held."""
        assert_held(pool.lock)
        events: list[_Event] = []
        for worker, flags, seq, sample, new_sample, verdict in judged:
            if worker.work_seq != seq:
                continue  # on to another work: the next look judges that one
            if worker.cpu_sample is sample:
                worker.cpu_sample = new_sample
            if verdict is None or worker.flags != flags:
                continue
            if verdict == _RUNNING_AGAIN:
                pool.worker_clr_flags(worker, STUCK)  # running again: count it again
            elif verdict == _BLOCKED:
                pool.worker_set_flags(worker, STUCK, wakeup=True)
                if hooks.events.worker_blocked is not None:
                    events.append((hooks.events.worker_blocked,
                                   {"pool": pool, "worker": worker, "work": worker.current_work}))
            else:
                worker.flags |= HOG_SEEN
                pool.watch.cpu_intensive += 1
                if worker.current_pwq is not None:
                    worker.current_pwq.nr_cpu_intensive += 1
                if not saturated:
                    pool.worker_set_flags(worker, CPU_INTENSIVE, wakeup=True)
                if hooks.events.cpu_intensive is not None:
                    events.append((hooks.events.cpu_intensive,
                                   {"pool": pool, "worker": worker, "work": worker.current_work}))
        return events

    def warn_stall(self, pool: WorkerPool, seconds: float, busy: list[Any]) -> None:
        frames = sys._current_frames()
        stacks: dict[int, str] = {}
        for worker in busy:
            ident = worker.thread.ident
            frame = frames.get(ident)
            if frame is not None:
                stacks[ident] = "".join(traceback.format_stack(frame))
        log.warning(
            "cmwq_exec pool %s has had pending works and started none for %.1f s "
            "(workers=%d idle=%d running=%d pending=%d); stacks of its busy workers:\n%s",
            pool.name, seconds, pool.nr_workers, pool.nr_idle, pool.nr_running, len(pool.worklist),
            "\n".join(f"--- thread {ident}\n{stack}" for ident, stack in stacks.items()) or "(none)")
        hook = hooks.events.stall
        if hook is not None:
            hook(pool=pool, seconds=seconds, stacks=stacks)
