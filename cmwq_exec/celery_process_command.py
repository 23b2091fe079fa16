"""The command line of a child of the Celery supervisor (:mod:`cmwq_exec.celery_processes`).

Child *i* re-runs the parent's own ``celery ... worker`` command line with ``-n {name}.{i}@{host}``
(the parent being ``{name}@{host}``): ``--pidfile`` and ``--detach`` stay with the parent, an
embedded beat (``-B``) runs in child 0 only, and a ``--statedb`` file gets the child's index as a
suffix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from celery.utils.nodenames import nodesplit

__all__ = ["child_command", "child_nodename", "is_worker_command"]

#: options of ``celery`` (before the subcommand) that take a value, so ``worker`` after one is that value
_GLOBAL_WITH_VALUE = {"-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config",
                      "--workdir"}
#: worker options: dropped with their value, dropped alone, kept in child 0 only
_DROP_WITH_VALUE = {"-n", "--hostname", "--pidfile"}
_DROP_FLAGS = {"-D", "--detach"}
_BEAT_FLAGS = {"-B", "--beat"}
_STATEDB = {"-S", "--statedb"}


def _worker_position(argv: Sequence[str]) -> int:
    """Index of the ``worker`` subcommand in ``argv`` (a celery command line), or -1."""
    for i, arg in enumerate(argv):
        if arg == "worker" and (i == 0 or argv[i - 1] not in _GLOBAL_WITH_VALUE):
            return i
    return -1


def is_worker_command(argv: Sequence[str]) -> bool:
    """Is ``argv`` (``sys.argv``) the ``celery ... worker`` command line?"""
    if not argv:
        return False
    program = os.path.basename(argv[0])
    main = argv[0].replace("\\", "/").endswith("celery/__main__.py")  # python -m celery
    is_celery = program in ("celery", "celery.exe") or main
    return is_celery and _worker_position(argv) > 0


def child_command(orig_argv: Sequence[str], executable: str, nodename: str, index: int) -> list[str]:
    """The command line of child ``index``: ``orig_argv`` (``sys.orig_argv``, interpreter options
    included) run by ``executable``, with the worker's ``-n`` replaced by ``nodename``, no
    ``--pidfile`` or ``--detach``, ``-B`` only in child 0, and ``--statedb F`` as ``F.index``."""
    argv = list(orig_argv)
    start = _worker_position(argv)
    if start < 0:
        raise ValueError(f"not a celery worker command line: {argv!r}")
    out = [executable, *argv[1:start + 1]]
    rest = argv[start + 1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, value = arg.partition("=")
        if arg == "--":
            out.extend(rest[i:])
            break
        if name in _DROP_WITH_VALUE:
            i += 1 if eq else 2
            continue
        if arg.startswith("-n") and not arg.startswith("--") and len(arg) > 2:
            i += 1  # -nNAME
            continue
        if arg in _DROP_FLAGS or (arg in _BEAT_FLAGS and index != 0):
            i += 1
            continue
        if name in _STATEDB:
            if eq:
                out.append(f"{name}={value}.{index}")
                i += 1
            else:
                out.append(arg)
                if i + 1 < len(rest):
                    out.append(f"{rest[i + 1]}.{index}")
                i += 2
            continue
        out.append(arg)
        i += 1
    out += ["-n", nodename]
    return out


def child_nodename(nodename: str, index: int) -> str:
    """``name@host`` -> ``name.index@host``."""
    name, host = nodesplit(nodename)
    return f"{name}.{index}@{host}" if name else f"{host}.{index}"
