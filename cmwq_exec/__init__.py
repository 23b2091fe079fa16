"""cmwq_exec: the Linux kernel's concurrency-managed workqueue as a Python executor backend.

Public API: :class:`CMWQExecutor`, :class:`WorkQueue`, :class:`Work`, :class:`DelayedWork`,
:class:`WQ`, :func:`blocking`, :func:`waiting`, :func:`configure`, :func:`get_system`, and the pluggy markers
``hookimpl``/``hookspec``.
"""

from . import plugin as _plugin  # noqa: F401  (loads the entry-point plugins when the pools start)
from .blocking import blocking, waiting
from .core.system import configure, get_system
from .core.workqueue import WQ, DelayedWork, Work, WorkQueue
from .detect import disable as undetect_blocking
from .detect import enable as detect_blocking
from .executor import CMWQExecutor, CMWQFuture
from .hookspecs import hookimpl, hookspec

__all__ = [
    "WQ",
    "CMWQExecutor",
    "CMWQFuture",
    "DelayedWork",
    "Work",
    "WorkQueue",
    "blocking",
    "configure",
    "detect_blocking",
    "get_system",
    "hookimpl",
    "hookspec",
    "undetect_blocking",
    "waiting",
]
__version__ = "0.1.0"
