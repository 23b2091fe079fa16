"""The set of pools shared by every workqueue of the process (the kernel's per-CPU gcwqs).

Created on first use from the configuration (:func:`configure` changes it before that). One pool per
possible CPU, online while its CPU is usable (online and in the process's affinity mask), plus the
unbound pool. A forked child starts a fresh set on first use.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import weakref
from typing import Any

from . import hooks, hotplug, timer
from .config import Config, from_environment
from .cpus import current_cpu, possible_cpus, usable_cpus
from .interfaces import Placed
from .lockdep import make_lock
from .pool import WorkerPool
from .watchdog import Watchdog

log = logging.getLogger("cmwq_exec.system")

class System:
    """Every pool and workqueue of the process."""

    def __init__(self, config: Config) -> None:
        self.config = config  # I
        self.lock = make_lock("system")  # I: the S of the fields below
        self.threads_lock = make_lock("threads")  # I: the N of nr_threads (a leaf: taken under a pool lock)
        self.nr_threads = 0  # N: worker threads of all pools (the cap counts these)
        self.stopped = False  # S: shutdown() ran
        # I, then set once by enable_timing; read racily (a work that misses it is not timed)
        self.timing = False
        # S: replaced, never mutated; read without it (a stale set only binds a thread wider)
        self.usable = usable_cpus()
        cpus = sorted(set(possible_cpus()) | self.usable)
        self.pools: list[WorkerPool] = [WorkerPool(self, cpu, i) for i, cpu in enumerate(cpus)]  # I
        self.unbound_pool = WorkerPool(self, None, len(self.pools))  # I
        self.pools.append(self.unbound_pool)
        self.cpu_pools = {pool.cpu: pool for pool in self.pools if pool.cpu is not None}  # I
        for pool in self.cpu_pools.values():
            pool.online = pool.cpu in self.usable
        self.online_pools = [p for p in self.cpu_pools.values() if p.online]  # S: replaced, never mutated
        self._workqueues: weakref.WeakSet[Any] = weakref.WeakSet()  # S
        self._unbound_started = False  # S
        self.watchdog = Watchdog(self)  # I
        self.hotplug: Any = None  # S: the monitor, once started
        hooks.on_policy_change(self._read_policy)
        self._read_policy()

    def start(self) -> None:
        # The timer thread first: mayday, retries of worker creation and delayed works all need
        # it, and once running it cannot die, so no later caller can meet its creation failing.
        timer.start()
        hooks.system_starting(self.config)  # plugins load, blocking detection starts if asked
        # Every online pool makes its first worker now, in the caller's thread, as the kernel
        # does: a work queued just before the interpreter exits must find one (Python 3.12+
        # refuses to start threads at exit, and the timer thread would be too late).
        for pool in self.online_pools:
            pool.manager.start()
        if self.config.hotplug:
            self.start_hotplug()

    def start_hotplug(self) -> None:
        """Start the hotplug monitor; if the timer thread cannot be created, try again later (the pools
        work meanwhile; only CPU changes go unnoticed)."""
        with self.lock:
            if self.stopped or self.hotplug is not None:
                return
            monitor = hotplug.HotplugMonitor(self)
            try:
                monitor.start()
            except RuntimeError as exc:
                log.warning("cpu hotplug monitor not started (will retry): %s", exc)
                timer.add_timer(self.config.create_cooldown, self.start_hotplug)
                return
            self.hotplug = monitor

    def shutdown(self, wait: bool = True) -> None:
        """Stop every thread of these pools: with ``wait``, first wait for every work queued so
        far; then refuse works on every workqueue, stop the rescuers and the hotplug monitor, and
        let every worker exit (idle ones now, busy ones when their work ends). For tests and
        embedders that replace the pools; the process's pools otherwise live as long as it does."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            hotplug, self.hotplug = self.hotplug, None
            workqueues = list(self._workqueues)
        if hotplug is not None:
            hotplug.stop()
        rescuers = [wq.shutdown(wait) for wq in workqueues]
        for pool in self.pools:
            pool.shutdown()
        timer.shutdown(5.0 if wait else 0.0)
        if wait:
            threads = [w.thread for pool in self.pools for w in list(pool.workers)]
            threads += rescuers
            for thread in threads:
                if thread is not None and thread is not threading.current_thread():
                    thread.join(5.0)

    def start_unbound_pool(self) -> None:
        with self.lock:
            if self._unbound_started:
                return
            self._unbound_started = True
        self.unbound_pool.manager.start()

    def _read_policy(self) -> None:
        for pool in self.pools:
            pool.read_policy()

    # -- workqueues -------------------------------------------------------------------------------

    def add_workqueue(self, wq: Any) -> None:
        with self.lock:
            self._workqueues.add(wq)

    def remove_workqueue(self, wq: Any) -> None:
        with self.lock:
            self._workqueues.discard(wq)

    @property
    def workqueues(self) -> list[Any]:
        with self.lock:
            return sorted(self._workqueues, key=lambda wq: wq.name)

    # -- placement --------------------------------------------------------------------------------

    def local_pool(self) -> WorkerPool:
        """The pool of the CPU the calling thread runs on (another online one if that is down)."""
        return self.usable_pool(current_cpu())

    def usable_pool(self, cpu: int) -> WorkerPool:
        """``cpu``'s pool while it is online, else another online one (the unbound pool if none is)."""
        pool = self.cpu_pools.get(cpu)
        if pool is not None and pool.online:
            return pool
        pools = self.online_pools
        return pools[cpu % len(pools)] if pools else self.unbound_pool

    def adopt_idle_worker(self, pool: WorkerPool) -> Any:
        """An idle worker that another pool can spare, taken off that pool for ``pool``, or None.
        No pool lock held (each pool's lock is taken on its own, so no lock order arises).

        A thread is not tied to its CPU the way a kthread is: a pool about to create a worker
        takes a spare idle one instead and binds it to its own CPU. A process whose submitting
        thread moves between CPUs then keeps one set of threads, not one per CPU it happened to
        submit from."""
        for donor in self.pools:
            if donor is pool:
                continue
            with donor.lock:
                worker = donor.manager.give_idle_worker()
            if worker is not None:
                return worker
        return None

    def bind_thread(self, pool: Placed) -> None:
        """Bind the calling thread to ``pool``'s CPU, or to every usable CPU if the pool is unbound
        or offline. Best effort: a CPU going down meanwhile is the trustee's business."""
        if pool.cpu is not None and pool.online and self.config.pin_workers:
            cpus = {pool.cpu}
        else:
            cpus = self.usable
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass

    def enable_timing(self) -> None:
        """Record queue latency, run time and CPU time per work (feeds the histograms). Costs about
        a microsecond per work; off until a metrics collector asks for it."""
        self.timing = True

    # -- hotplug ----------------------------------------------------------------------------------

    def cpu_down(self, cpu: int) -> None:
        """Take ``cpu``'s pool down: a trustee drains it with unbound workers. Returns at once."""
        hotplug.cpu_down(self, cpu)

    def cpu_up(self, cpu: int) -> None:
        """Bring ``cpu``'s pool back (the trustee, if still draining, hands the pool back)."""
        hotplug.cpu_up(self, cpu)


_system: System | None = None
_system_lock = make_lock("system-registry")
_config = Config()


def configure(**options: Any) -> Config:
    """Change settings before the pools start (see :class:`cmwq_exec.core.config.Config`).

    When the pools start, ``CMWQ_<NAME>`` environment variables are applied over these values:
    the environment wins, so an operator can change a setting without changing code. Raises
    ValueError for an unknown name or a bad value, RuntimeError once the pools run.
    """
    global _config
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"configure(): unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    with _system_lock:
        config = dataclasses.replace(_config, **options)
        config.validate()  # a bad value is reported as such, running pools or not
        if _system is not None:
            raise RuntimeError("configure() must be called before the first workqueue or executor "
                               "is created: the pools are already running")
        _config = config
        return config


def get_system() -> System:
    """The process's pools, started on first use."""
    global _system
    system = _system
    if system is not None:
        return system
    with _system_lock:
        if _system is None:
            config = from_environment(_config)
            config.validate()
            system = System(config)
            try:
                system.start()
            except BaseException:
                system.shutdown(wait=False)  # a thread could not be started: try again next time
                raise
            _system = system
        return _system


def _reset_for_tests(**options: Any) -> System:
    """Replace the process's pools by fresh ones (tests): the old ones are shut down first."""
    global _system, _config
    with _system_lock:
        old = _system
        _system = None
        _config = dataclasses.replace(Config(), **options)
    if old is not None:
        old.shutdown(wait=False)  # a test may have left a work blocked: never wait for it here
    return get_system()


def _after_fork_in_child() -> None:
    global _system, _system_lock
    _system = None  # the parent's threads are gone: a fresh system starts on first use
    _system_lock = make_lock("system-registry")


os.register_at_fork(after_in_child=_after_fork_in_child)
