"""The engine: per-CPU pools of concurrency-managed workers, workqueues, timers, hotplug.

Layered from the bottom (see pyproject.toml's import-linter contracts): ``lockdep`` (the lock
order); ``policy``, ``config``, ``cpus``, ``interrupts``; ``hooks`` (the policy and event objects
that the plugin layer fills) and ``pending``; ``timer``; ``worker``; ``pool``; ``watchdog``;
``hotplug`` (the trustee); ``system`` (every pool of the process); ``workqueue``. Nothing here
imports pluggy or any other third-party package.
"""
