"""The set of pools shared by every workqueue of the process (the kernel's per-CPU gcwqs).

Created on first use from the configuration (:func:`configure` changes it before that). One pool per
possible CPU, online while its CPU is usable (online and in the process's affinity mask), plus the
unbound pool. A forked child starts a fresh set on first use.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import threading
import weakref
from typing import Any

from . import plugin
from .config import Config, from_environment
from .pool import WorkerPool
from .watchdog import Watchdog

log = logging.getLogger("cmwq_exec.system")

_sched_getcpu: Any
try:
    # PyDLL keeps the GIL across the call: a CDLL call would release it and hand the GIL to a worker
    # on every submit.
    _sched_getcpu = ctypes.PyDLL(None).sched_getcpu
    _sched_getcpu.restype = ctypes.c_int
    _sched_getcpu.argtypes = []
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _sched_getcpu = None


def possible_cpus() -> list[int]:
    """CPUs that may ever be online (``/sys/devices/system/cpu/possible``)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            return parse_cpu_list(f.read())
    except OSError:
        return list(range(os.cpu_count() or 1))


def online_cpus() -> set[int]:
    try:
        with open("/sys/devices/system/cpu/online") as f:
            return set(parse_cpu_list(f.read()))
    except OSError:
        return set(range(os.cpu_count() or 1))


def process_affinity() -> set[int]:
    """The process's CPU mask: the main thread's (pinned workers have their own)."""
    try:
        return os.sched_getaffinity(os.getpid())
    except OSError:
        return set(range(os.cpu_count() or 1))


def usable_cpus() -> set[int]:
    """Online and allowed by the process's affinity mask."""
    return (online_cpus() & process_affinity()) or process_affinity()


def parse_cpu_list(text: str) -> list[int]:
    """Parse the kernel's cpu list format, e.g. ``0-3,5``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


class System:
    """Every pool and workqueue of the process."""

    def __init__(self, config: Config) -> None:
        self.config = config  # I
        self.lock = threading.Lock()  # nr_threads, workqueues, online_pools changes
        self.nr_threads = 0  # worker threads of all pools (the cap counts these)
        self.timing = False  # per-work timestamps for the histograms
        self.usable = usable_cpus()
        cpus = sorted(set(possible_cpus()) | self.usable)
        self.pools: list[WorkerPool] = [WorkerPool(self, cpu, i) for i, cpu in enumerate(cpus)]
        self.unbound_pool = WorkerPool(self, None, len(self.pools))
        self.pools.append(self.unbound_pool)
        self.cpu_pools = {pool.cpu: pool for pool in self.pools if pool.cpu is not None}
        for pool in self.cpu_pools.values():
            pool.online = pool.cpu in self.usable
        self.online_pools = [p for p in self.cpu_pools.values() if p.online]  # replaced, never mutated
        self._workqueues: weakref.WeakSet[Any] = weakref.WeakSet()
        self._unbound_started = False
        self.watchdog = Watchdog(self)
        self.hotplug: Any = None
        plugin.on_change(self._read_policy)
        plugin.get_plugin_manager()
        self._read_policy()

    def start(self) -> None:
        if self.config.detect_blocking:
            from .detect import enable

            enable()
        for pool in self.online_pools:
            pool.start()
        if self.config.hotplug:
            from .hotplug import HotplugMonitor

            self.hotplug = HotplugMonitor(self)
            self.hotplug.start()

    def start_unbound_pool(self) -> None:
        with self.lock:
            if self._unbound_started:
                return
            self._unbound_started = True
        self.unbound_pool.start()

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
        cpu = _sched_getcpu() if _sched_getcpu is not None else 0
        pool = self.cpu_pools.get(cpu)
        if pool is not None and pool.online:
            return pool
        return self.fallback_pool(cpu)

    def fallback_pool(self, cpu: int) -> WorkerPool:
        pool = self.cpu_pools.get(cpu)
        if pool is not None and pool.online:
            return pool
        pools = self.online_pools
        return pools[cpu % len(pools)] if pools else self.unbound_pool

    def bind_thread(self, pool: WorkerPool) -> None:
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
        from .hotplug import cpu_down

        cpu_down(self, cpu)

    def cpu_up(self, cpu: int) -> None:
        """Bring ``cpu``'s pool back (the trustee, if still draining, hands the pool back)."""
        from .hotplug import cpu_up

        cpu_up(self, cpu)


_system: System | None = None
_system_lock = threading.Lock()
_config = Config()


def configure(**options: Any) -> Config:
    """Change settings before the pools start (see :class:`cmwq_exec.config.Config`).

    ``CMWQ_<NAME>`` environment variables are applied first; keyword arguments win. Raises
    RuntimeError once the pools run, ValueError for an unknown name or a bad value.
    """
    global _config
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"configure(): unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    with _system_lock:
        if _system is not None:
            raise RuntimeError("configure() must be called before the first workqueue or executor "
                               "is created: the pools are already running")
        config = dataclasses.replace(_config, **options)
        config.validate()
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
            _system = system
            system.start()
        return _system


def _reset_for_tests(**options: Any) -> System:
    """Replace the process's pools by fresh ones (tests only: the old pools' threads stay parked)."""
    global _system, _config
    with _system_lock:
        old = _system
        _system = None
        _config = dataclasses.replace(Config(), **options)
    if old is not None and old.hotplug is not None:
        old.hotplug.stop()
    return get_system()


def _after_fork_in_child() -> None:
    global _system, _system_lock
    _system = None
    _system_lock = threading.Lock()
    from . import executor, worker, workqueue

    worker.current.worker = None  # forked from a worker: this thread is not one in the child
    worker.current.detected = None
    executor.after_fork()
    for wq in list(workqueue.all_workqueues):
        wq._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
