"""Watchdog: blocking and CPU-hog detection without annotations, and stall warnings.

(placeholder until the watchdog lands)
"""

from __future__ import annotations

from typing import Any


class Watchdog:
    def __init__(self, system: Any) -> None:
        self.system = system

    def arm(self, pool: Any) -> None:
        pool.watchdog_armed = True
