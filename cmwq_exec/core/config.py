"""Tunables of the worker pools, with the kernel's defaults where the kernel has one."""

from __future__ import annotations

import dataclasses
import math
import os


@dataclasses.dataclass
class Config:
    """Settings read when the pools start (:func:`cmwq_exec.configure` changes them before that).

    Times are finite numbers of seconds > 0, counts integers >= 2; :meth:`validate` checks it.
    """

    #: Idle workers beyond the ratio are reaped after this long. The kernel keeps them 300 s; a
    #: userspace thread costs a stack and a slot in the process's thread limit, and re-creating one
    #: costs ~100 us, so 10 s (Tokio's choice) keeps bursts cheap and quiet periods lean.
    idle_timeout: float = 10.0
    #: Call the rescuers if a worker could not be created within this (MAYDAY_INITIAL_TIMEOUT).
    mayday_initial_timeout: float = 0.010
    #: ... and again every this much while it still cannot (MAYDAY_INTERVAL).
    mayday_interval: float = 0.100
    #: Pause after a failed worker creation before the next try (CREATE_COOLDOWN).
    create_cooldown: float = 1.0
    #: A pool creates its first this many workers as soon as its last runner sleeps (and the
    #: last idle worker starts working). Beyond them it paces creation: see ``create_interval``.
    unpaced_workers: int = 96
    #: Beyond ``unpaced_workers``, a pool whose workers all sleep with works waiting creates one
    #: more only after this long without a work finishing (a runner coming back takes the works
    #: instead). Bursts of short blocking works then use a fraction of the threads; works that
    #: block long still get a worker each, one per interval.
    create_interval: float = 0.0001
    #: ... and not while at least half of its busy workers went to sleep within twice the pool's
    #: average sleep, capped at this: those sleepers are due back and will take the waiting works.
    #: Works that wait for each other wait at most this long for a worker: a sleeper older than
    #: that window with none back since ends the hold (see WorkerPool.sleepers_due).
    create_hold_max: float = 0.050
    #: Cap on worker threads of all pools together; reaching it counts as a failed creation.
    max_total_workers: int = 512
    #: Pin each per-CPU pool's workers to their CPU with sched_setaffinity.
    pin_workers: bool = True
    #: Run workers (and rescuers) under SCHED_BATCH (Linux): a woken worker then waits for the
    #: running thread's turn to end instead of preempting it. The thread that woke it nearly
    #: always holds the GIL and lets go of it soon (a submitter about to wait for its result), so
    #: a preempting worker would only find the GIL taken and sleep again: two more thread
    #: switches per hand-off. Threads and processes started from a work inherit the policy.
    batch_workers: bool = True
    #: Watchdog period: a pool with pending work that started none for this long is examined.
    watchdog_tick: float = 0.010
    #: A worker that burned this much CPU in one work is CPU-intensive (wq_cpu_intensive_thresh_us).
    cpu_intensive_thresh: float = 0.010
    #: Warn (with stacks) when a pool has had pending work and made no progress for this long.
    stall_timeout: float = 30.0
    #: How the trustee paces its draining passes (TRUSTEE_COOLDOWN).
    trustee_cooldown: float = 0.100
    #: Poll the online and affinity masks this often (uevents make CPU changes immediate).
    hotplug_poll_interval: float = 1.0
    #: Listen for CPU hotplug (uevents and polling).
    hotplug: bool = True
    #: Detect blocking stdlib calls in workers without annotations (cmwq_exec.detect).
    detect_blocking: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not allowed."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            problem = _problem(field.type, value)
            if problem is not None:
                raise ValueError(f"{field.name} {problem}, got {value!r}")


def _problem(kind: object, value: object) -> str | None:
    """What is wrong with ``value`` for a field of type ``kind`` (as written in the class), or None."""
    if kind == "float":
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not 0 < value < math.inf):  # NaN fails the comparison too
            return "must be a finite number of seconds > 0"
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            return "must be an integer >= 2"
    elif kind == "bool" and not isinstance(value, bool):
        return "must be True or False"
    return None


_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def _parse(kind: object, raw: str) -> object:
    """``raw`` (an environment variable's value) as a value for a field of type ``kind``; ValueError
    saying what is allowed if it is not one."""
    text = raw.strip()
    if kind == "bool":
        value = _BOOLS.get(text.lower())
        if value is None:
            raise ValueError("use 1/0, true/false, yes/no or on/off")
        return value
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError("use an integer") from None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise ValueError("use a finite number of seconds")
    return seconds


def from_environment(config: Config) -> Config:
    """``config`` with the ``CMWQ_<FIELD>`` environment variables applied (e.g. ``CMWQ_PIN_WORKERS=0``).

    Booleans are 1/0, true/false, yes/no or on/off (any case). Raises ValueError naming the variable
    for a value that does not parse or is not allowed for its field.
    """
    changes: dict[str, object] = {}
    for field in dataclasses.fields(config):
        name = "CMWQ_" + field.name.upper()
        raw = os.environ.get(name)
        if raw is None:
            continue
        try:
            value = _parse(field.type, raw)
        except ValueError as exc:
            raise ValueError(f"environment variable {name}={raw!r} is not a valid {field.type}: "
                             f"{exc}") from None
        problem = _problem(field.type, value)
        if problem is not None:
            raise ValueError(f"environment variable {name}={raw!r}: {field.name} {problem}")
        changes[field.name] = value
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]
