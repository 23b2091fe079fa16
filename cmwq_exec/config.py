"""Tunables of the worker pools, with the kernel's defaults where the kernel has one."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass
class Config:
    """Settings read when the pools start (:func:`cmwq_exec.configure` changes them before that).

    Times are in seconds.
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
    #: Cap on worker threads of all pools together; reaching it counts as a failed creation.
    max_total_workers: int = 512
    #: Pin each per-CPU pool's workers to their CPU with sched_setaffinity.
    pin_workers: bool = True
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
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"{field.name} must be a positive number of seconds, got {value!r}")
            elif field.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                    raise ValueError(f"{field.name} must be an integer >= 2, got {value!r}")
            elif field.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{field.name} must be True or False, got {value!r}")


def from_environment(config: Config) -> Config:
    """Apply ``CMWQ_<FIELD>`` environment variables (e.g. ``CMWQ_PIN_WORKERS=0``)."""
    changes: dict[str, object] = {}
    for field in dataclasses.fields(config):
        raw = os.environ.get("CMWQ_" + field.name.upper())
        if raw is None:
            continue
        try:
            if field.type == "bool":
                changes[field.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif field.type == "int":
                changes[field.name] = int(raw)
            else:
                changes[field.name] = float(raw)
        except ValueError:
            raise ValueError(f"environment variable CMWQ_{field.name.upper()}={raw!r} is not a "
                             f"valid {field.type}") from None
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]
