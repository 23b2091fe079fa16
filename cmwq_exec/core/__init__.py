"""The engine: per-CPU pools of concurrency-managed workers, workqueues, timers, hotplug.

Layered from the bottom (see pyproject.toml's import-linter contracts): ``lockdep`` (the lock
order, and the legend of who may touch each field of the core: ``I``, ``P``, ``W``, ...);
``policy``, ``config``, ``cpus``, ``interrupts``, ``pending``, ``trustee`` (a pool's trustee state)
and ``poolwatch`` (the watchdog's state of a pool); ``hooks`` (the policy and event objects that the
plugin layer fills) and ``interfaces`` (the typed seams); ``timer``; ``worker``; ``pool`` with its
parts ``manager``, ``pacing`` and ``mayday``; ``watchdog``; ``hotplug`` (the trustee); ``system``
(every pool of the process); ``workqueue``. Nothing here imports pluggy or any other third-party
package.
"""
