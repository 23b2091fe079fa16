"""Tunables of the worker pools, with the kernel's defaults where the kernel has one.

A value that is not allowed raises :class:`SettingError` naming the option or variable, the value and
what is allowed; the pools refuse to start with one. Each time has a range written next to it: its
minimum keeps a timer that fires again and again from spinning (``hotplug_poll_interval=1e-9`` kept
an idle process at 80 % of a CPU), its maximum, where it has one, keeps a guarantee that depends on it
(the rescuers of ``mayday_*``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any


class SettingError(ValueError):
    """A setting's value is not allowed: a ``configure()`` option, a core ``CMWQ_<NAME>`` variable,
    or a plugin's own variable. The message names it, its value and what is allowed.

    Raised when the pools start (or a plugin is loaded), it propagates and stops the program: a
    plugin that finds its own setting invalid raises it (``from cmwq_exec.plugin import
    SettingError``) instead of a plain exception, which would only disable that plugin."""


def _seconds(default: float, low: float, high: float = math.inf) -> Any:
    """A time setting: ``default`` seconds, allowed from ``low`` to ``high`` (both included)."""
    return dataclasses.field(default=default, metadata={"seconds": (low, high)})


@dataclasses.dataclass
class Config:
    """Settings read when the pools start (:func:`cmwq_exec.configure` changes them before that).

    Times are numbers of seconds within the range given with each, counts integers >= 2;
    :meth:`validate` checks it.
    """

    #: Idle workers beyond the ratio are reaped after this long. The kernel keeps them 300 s; a
    #: userspace thread costs a stack and a slot in the process's thread limit, and re-creating one
    #: costs ~100 us, so 10 s (Tokio's choice) keeps bursts cheap and quiet periods lean.
    #: From 1 ms (the tests reap that fast); no maximum: a long one keeps idle workers for good.
    idle_timeout: float = _seconds(10.0, 0.001)
    #: Call the rescuers if a worker could not be created within this (MAYDAY_INITIAL_TIMEOUT).
    #: From 1 ms to 60 s: past a minute the rescuers no longer guarantee progress in any useful time.
    mayday_initial_timeout: float = _seconds(0.010, 0.001, 60.0)
    #: ... and again every this much while it still cannot (MAYDAY_INTERVAL).
    #: From 1 ms (it repeats while no worker can be created) to 60 s, as above.
    mayday_interval: float = _seconds(0.100, 0.001, 60.0)
    #: Pause after a failed worker creation before the next try (CREATE_COOLDOWN).
    #: From 1 ms: the manager retries at this pace for as long as creations fail.
    create_cooldown: float = _seconds(1.0, 0.001)
    #: A pool creates its first this many workers as soon as its last runner sleeps (and the
    #: last idle worker starts working). Beyond them it paces creation: see ``create_interval``.
    unpaced_workers: int = 96
    #: Beyond ``unpaced_workers``, a pool whose workers all sleep with works waiting creates one
    #: more only after this long without a work finishing (a runner coming back takes the works
    #: instead). Bursts of short blocking works then use a fraction of the threads; works that
    #: block long still get a worker each, one per interval.
    #: From 1 µs (shorter paces nothing) to 60 s: a work waiting for a later one waits up to one
    #: interval per worker it needs.
    create_interval: float = _seconds(0.0001, 0.000001, 60.0)
    #: ... and not while at least half of its busy workers went to sleep within twice the pool's
    #: average sleep, capped at this: those sleepers are due back and will take the waiting works.
    #: Works that wait for each other wait at most this long for a worker: a sleeper older than
    #: that window with none back since ends the hold (see core/pacing.py, sleepers_due).
    #: From 1 ns (which turns the hold off) to 60 s, for the same reason as create_interval.
    create_hold_max: float = _seconds(0.050, 1e-9, 60.0)
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
    #: From 1 ms: it ticks for as long as a pool has pending works.
    watchdog_tick: float = _seconds(0.010, 0.001)
    #: A worker that burned this much CPU in one work is CPU-intensive (wq_cpu_intensive_thresh_us).
    #: From 100 µs: below, nearly every work of Python code would count as CPU-intensive.
    cpu_intensive_thresh: float = _seconds(0.010, 0.0001)
    #: Warn (with stacks) when a pool has had pending work and made no progress for this long.
    #: From 100 ms: each warning dumps stacks, and a stall is looked for at every watchdog tick.
    stall_timeout: float = _seconds(30.0, 0.1)
    #: How the trustee paces its draining passes (TRUSTEE_COOLDOWN).
    #: From 1 ms: the trustee passes at this pace until the pool is drained.
    trustee_cooldown: float = _seconds(0.100, 0.001)
    #: Poll the online and affinity masks this often (uevents make CPU changes immediate).
    #: From 10 ms: polling only backs the uevents up, and an idle process polling every 10 ms spends
    #: ~3 % of a CPU on it (1 ms: ~8 %; 1e-9: ~80 %).
    hotplug_poll_interval: float = _seconds(1.0, 0.01)
    #: Listen for CPU hotplug (uevents and polling).
    hotplug: bool = True
    #: Detect blocking stdlib calls in workers without annotations (cmwq_exec.detect).
    detect_blocking: bool = False

    def validate(self) -> None:
        """Raise SettingError naming the first field whose value is not allowed, and its range."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            problem = _problem(field, value)
            if problem is not None:
                raise SettingError(f"{field.name} {problem}, got {value!r}")


def _range_text(low: float, high: float) -> str:
    if high == math.inf:
        return f"a finite number of seconds >= {low:g}"
    return f"a number of seconds from {low:g} to {high:g}"


def _problem(field: dataclasses.Field[Any], value: object) -> str | None:
    """What is wrong with ``value`` for ``field``, or None."""
    kind = field.type
    if kind == "float":
        low, high = field.metadata["seconds"]
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not low <= value <= high or value == math.inf):  # NaN fails the comparison too
            return f"must be {_range_text(low, high)}"
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

    Booleans are 1/0, true/false, yes/no or on/off (any case). Raises SettingError naming the
    variable for a value that does not parse or is not allowed for its field.
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
            raise SettingError(f"environment variable {name}={raw!r} is not a valid {field.type}: "
                               f"{exc}") from None
        problem = _problem(field, value)
        if problem is not None:
            raise SettingError(f"environment variable {name}={raw!r}: {field.name} {problem}")
        changes[field.name] = value
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]
