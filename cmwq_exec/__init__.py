"""cmwq_exec: the Linux kernel's concurrency-managed workqueue as a Python executor backend.

Public API: :class:`CMWQExecutor`, :class:`WorkQueue`, :class:`Work`, :class:`DelayedWork`,
:class:`WQ`, :func:`blocking`, :func:`configure`, :func:`get_system`, and the pluggy markers
``hookimpl``/``hookspec``.
"""

from .blocking import blocking
from .detect import disable as undetect_blocking
from .detect import enable as detect_blocking
from .executor import CMWQExecutor, CMWQFuture
from .hookspecs import hookimpl, hookspec
from .system import configure, get_system
from .workqueue import WQ, DelayedWork, Work, WorkQueue

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
]
__version__ = "0.1.0"
