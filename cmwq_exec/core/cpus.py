"""The machine's CPUs as the pools see them: possible, online, allowed, and the caller's own."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

_sched_getcpu: Callable[[], int] | None
try:
    # PyDLL keeps the GIL across the call: a CDLL call would release it and hand the GIL to a worker
    # on every submit.
    _getcpu = ctypes.PyDLL(None).sched_getcpu
    _getcpu.restype = ctypes.c_int
    _getcpu.argtypes = []
    _sched_getcpu = _getcpu
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _sched_getcpu = None


def _cpu_unknown() -> int:
    return 0


#: The CPU the calling thread runs on (0 where that cannot be known). The C function itself where
#: there is one: it is called on every submit.
current_cpu: Callable[[], int] = _sched_getcpu if _sched_getcpu is not None else _cpu_unknown


def set_batch_policy() -> None:
    """Put the calling thread under SCHED_BATCH (Linux; a no-op elsewhere). Best effort: a
    sandbox that refuses ``sched_setscheduler`` leaves the thread as it was."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None or not hasattr(os, "sched_setscheduler"):
        return
    try:
        os.sched_setscheduler(0, batch, os.sched_param(0))
    except OSError:
        pass


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
