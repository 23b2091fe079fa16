"""CPU hotplug: knowing which CPUs are usable, and the trustee that drains a pool whose CPU left.

Changes are learnt from kernel uevents on a ``NETLINK_KOBJECT_UEVENT`` socket (``offline@`` and
``online@`` for ``/devices/system/cpu/cpuN``), with polling of the online mask and the process's
affinity mask as a fallback and for affinity changes (``taskset``, cgroup cpusets), which send no
uevent. :meth:`System.cpu_down` and :meth:`System.cpu_up` are the explicit API; the monitor acts only
on changes it observes, so an explicit choice stands until the machine's CPUs change again.

The trustee (one thread per pool going down, states START, IN_CHARGE, BUTCHER, RELEASE, DONE) takes
the manager role, marks every worker ROGUE (unbound, out of ``nr_running``), drains the worklist with
those workers, new rogue ones and the rescuers, then destroys workers as they go idle. If the CPU
comes back meanwhile it rebinds the remaining workers and hands the pool back. Whoever reports the
CPU down never waits for any of it: like today's kernel, the pool just runs unbound meanwhile.
"""

from __future__ import annotations

import logging
import socket

from . import hooks, timer
from .cpus import usable_cpus
from .interfaces import SystemForHotplug
from .lockdep import assert_held
from .pool import WorkerPool
from .trustee import TRUSTEE_BUTCHER, TRUSTEE_DONE, TRUSTEE_IN_CHARGE, TRUSTEE_RELEASE, TRUSTEE_START
from .worker import ROGUE, set_thread_affinity, start_thread

log = logging.getLogger("cmwq_exec.hotplug")

NETLINK_KOBJECT_UEVENT = 15


def _pool_of(system: SystemForHotplug[WorkerPool], cpu: int) -> WorkerPool:
    if isinstance(cpu, bool) or not isinstance(cpu, int):
        raise TypeError(f"cpu must be an int, got {type(cpu).__name__}")
    pool = system.cpu_pools.get(cpu)
    if pool is None:
        raise ValueError(f"cpu {cpu} is not a possible CPU of this machine (have {sorted(system.cpu_pools)})")
    return pool


def _set_online(system: SystemForHotplug[WorkerPool], pool: WorkerPool, online: bool) -> bool:
    """Flip the pool's online state; returns False if it already was so."""
    with system.lock:
        with pool.lock:
            if pool.online == online:
                return False
            pool.online = online
        usable = set(system.usable)
        usable.add(pool.cpu) if online else usable.discard(pool.cpu)  # type: ignore[arg-type]
        system.usable = usable or system.usable
        system.online_pools = [p for p in system.cpu_pools.values() if p.online]
    return True


def _trustee_event(pool: WorkerPool, state: str) -> None:
    hook = hooks.events.trustee_state
    if hook is not None:
        hook(pool=pool, state=state)


def cpu_down(system: SystemForHotplug[WorkerPool], cpu: int) -> None:
    """``cpu`` is no longer usable: hand its pool to a trustee. Returns at once."""
    pool = _pool_of(system, cpu)
    if not _set_online(system, pool, False):
        return
    with pool.lock:
        # unbind at once (a few syscalls, no waiting): nothing stays pinned to the dead CPU while the
        # trustee starts; it re-applies this on every pass for workers that start meanwhile
        for worker in pool.workers:
            set_thread_affinity(worker, system.usable)
        if pool.trustee.state == TRUSTEE_RELEASE:
            pool.trustee.state = TRUSTEE_IN_CHARGE  # came back and goes again: keep draining
            pool.trustee.cond.notify_all()
            return
        if pool.trustee.state != TRUSTEE_DONE:
            return
        pool.trustee.state = TRUSTEE_START
    _trustee_event(pool, TRUSTEE_START)
    _start_trustee(pool)


def _start_trustee(pool: WorkerPool) -> None:
    """Start the trustee's thread; if it cannot be created, the timer thread tries again after
    ``create_cooldown`` (the pool runs unbound meanwhile: its workers were unbound above)."""
    try:
        start_thread(lambda: Trustee(pool).run(), f"cmwq/trustee:{pool.name}")
    except RuntimeError as exc:
        log.warning("pool %s: cannot start its trustee (will retry): %s", pool.name, exc)
        timer.add_timer(pool.system.config.create_cooldown, lambda: _start_trustee(pool))


def cpu_up(system: SystemForHotplug[WorkerPool], cpu: int) -> None:
    """``cpu`` is usable again: the trustee, if any, hands its pool back."""
    pool = _pool_of(system, cpu)
    if not _set_online(system, pool, True):
        return
    with pool.lock:
        if pool.trustee.state != TRUSTEE_DONE:
            pool.trustee.state = TRUSTEE_RELEASE
            pool.trustee.cond.notify_all()
            return
        need_worker = pool.nr_workers == 0
    if need_worker:
        pool.manager.start()


class Trustee:
    """Governs a pool whose CPU went down until it is drained (or the CPU is back)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool  # I

    def run(self) -> None:
        pool = self.pool
        system = pool.system
        cooldown = system.config.trustee_cooldown
        with pool.lock:
            while pool.managing:  # claim the manager role
                pool.trustee.cond.wait()
            pool.managing = True
            for worker in pool.workers:
                pool.worker_set_flags(worker, ROGUE, wakeup=False)
                set_thread_affinity(worker, system.usable)
            assert pool.nr_running == 0
            if pool.idle_timer is not None:  # the trustee reaps as it sees fit
                pool.idle_timer.cancel()
                pool.idle_timer = None
            if pool.trustee.state == TRUSTEE_START:
                pool.trustee.state = TRUSTEE_IN_CHARGE
        _trustee_event(pool, TRUSTEE_IN_CHARGE)
        with pool.lock:
            while pool.trustee.state != TRUSTEE_RELEASE:
                if pool.worklist:
                    self.drain_pass()
                else:
                    if pool.trustee.state == TRUSTEE_IN_CHARGE:
                        pool.trustee.state = TRUSTEE_BUTCHER
                        with pool.unlocked:
                            _trustee_event(pool, TRUSTEE_BUTCHER)
                        continue
                    for worker in [w for w in pool.idle if not w.woken]:
                        pool.manager.destroy_worker(worker, "trustee")
                    if pool.nr_workers == 0:
                        break
                for worker in pool.workers:  # a worker that bound itself meanwhile
                    set_thread_affinity(worker, system.usable)
                pool.trustee.cond.wait(cooldown)
            released = pool.trustee.state == TRUSTEE_RELEASE
            if released:
                for worker in list(pool.workers):
                    pool.worker_clr_flags(worker, ROGUE)
                    pinned = pool.cpu is not None and system.config.pin_workers
                    set_thread_affinity(worker, {pool.cpu} if pinned else system.usable)  # type: ignore[arg-type]
            pool.managing = False
            pool.trustee.state = TRUSTEE_DONE
            need_worker = pool.online and pool.nr_idle == 0
            if pool.online and pool.worklist and pool.need_more_worker(pool):
                pool.wake_up_worker()
        if released:
            _trustee_event(pool, TRUSTEE_RELEASE)
        _trustee_event(pool, TRUSTEE_DONE)
        if need_worker:
            pool.manager.start()

    def drain_pass(self) -> None:
        """Wake an idle worker per pending work, create a rogue one if none is idle, call the
        rescuers. P: held (dropped while creating)."""
        pool = self.pool
        assert_held(pool.lock)
        left = len(pool.worklist)
        for idle in reversed(list(pool.idle)):
            if left <= 0:
                break
            if not idle.woken:
                pool.wake_worker(idle)
                left -= 1
        pool.mayday.send()
        if left > 0 and not pool.idle and pool.manager.add_worker(rogue=True):
            pool.wake_up_worker()


class HotplugMonitor:
    """Watches for CPUs becoming usable or unusable and takes pools down and up accordingly.

    It has no thread: the timer thread serves its uevent socket (:func:`timer.watch`) and its
    polling timer, so :meth:`sync` always runs there, one call at a time."""

    def __init__(self, system: SystemForHotplug[WorkerPool]) -> None:
        self.system = system  # I
        self.stopping = False  # set once by stop(); read by the timer thread, which then stops
        self.sock: socket.socket | None = None  # X: the timer thread (set by start() before it serves it)
        self.poll_timer: timer.Timer | None = None  # X: likewise
        self.seen = set(system.usable)  # X: the timer thread; the usable CPUs at the last look

    def start(self) -> None:
        """Open the uevent socket and start polling; RuntimeError if the timer thread cannot be
        started (the caller tries again later)."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
            sock.bind((0, 1))  # port id chosen by the kernel; group 1: kernel uevents
            sock.setblocking(False)
        except (OSError, AttributeError) as exc:
            log.debug("no uevent socket (%s): polling only", exc)
            sock = None
        try:
            if sock is not None:
                timer.watch(sock, self.on_uevent)
            self.sock = sock
            self.poll_timer = timer.add_timer(self.system.config.hotplug_poll_interval, self.poll)
        except BaseException:
            if sock is not None:
                timer.unwatch(sock)
                sock.close()
            self.sock = None
            raise

    def stop(self) -> None:
        self.stopping = True
        poll_timer, sock = self.poll_timer, self.sock
        if poll_timer is not None:
            poll_timer.cancel()
        if sock is not None:
            timer.unwatch(sock)
            try:
                sock.close()
            except OSError:
                pass

    def on_uevent(self) -> None:
        """The uevent socket is readable (on the timer thread): any uevent, re-read the masks."""
        sock = self.sock
        if sock is None or self.stopping:
            return
        try:
            while sock.recv(65536):  # drain what came at once: one re-read covers it all
                pass
        except BlockingIOError:
            pass
        except OSError as exc:
            log.debug("uevent socket failed (%s): polling only", exc)
            timer.unwatch(sock)
            self.sock = None
        self.resync()

    def poll(self) -> None:
        """The polling timer (affinity changes send no uevent; a lost uevent is caught here)."""
        if self.stopping:
            return
        try:
            self.resync()
        finally:
            if not self.stopping:
                self.poll_timer = timer.add_timer(self.system.config.hotplug_poll_interval, self.poll)

    def resync(self) -> None:
        try:
            self.sync(usable_cpus())
        except Exception:
            log.exception("cpu hotplug: re-reading the usable CPUs failed")

    def sync(self, usable: set[int]) -> None:
        """Follow what changed since the last look: a CPU that became unusable goes down, one that
        became usable comes up. CPUs that did not change keep whatever the explicit API said."""
        system = self.system
        seen, self.seen = self.seen, set(usable)
        for cpu in sorted(seen - usable):
            if cpu in system.cpu_pools:
                cpu_down(system, cpu)
        for cpu in sorted(usable - seen):
            if cpu in system.cpu_pools:
                cpu_up(system, cpu)
