"""The status directory of a Celery supervisor (:mod:`cmwq_exec.celery_processes`).

The supervisor and its children talk through files in one directory per supervisor: each child
process writes its metrics port and its ledger there (:mod:`cmwq_exec.celery_process_ledger`), and
the recycling files of :mod:`cmwq_exec.celery_process_recycle`. The directory is named by the
supervisor's pid, so a supervisor that finds one whose supervisor is gone (killed before it could
clean up) removes it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

__all__ = ["STATUS_DIR_PREFIX", "remove_stale_status_dirs"]

#: The supervisor's status directory is ``<tmp>/cmwq-children-<pid>-<random>``.
STATUS_DIR_PREFIX = "cmwq-children-"


def remove_stale_status_dirs(tmp: str | None = None) -> list[str]:
    """Remove the status directories of supervisors that are gone (killed before they could
    clean up) from ``tmp`` (the temporary directory by default); return their paths. Only this
    user's directories whose supervisor pid no longer runs are touched."""
    tmp = tempfile.gettempdir() if tmp is None else tmp
    removed: list[str] = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(STATUS_DIR_PREFIX):
            continue
        pid_text = name[len(STATUS_DIR_PREFIX):].partition("-")[0]
        if not pid_text.isdigit():
            continue
        path = os.path.join(tmp, name)
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
            continue  # its supervisor still runs (or the pid was reused: kept, to be safe)
        except ProcessLookupError:
            pass
        except OSError:
            continue  # not ours to judge (another user's process)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
