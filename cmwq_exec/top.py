"""``cmwq-exec top``: a live view of a cmwq_exec process, read from its ``/metrics``.

In the spirit of the kernel's ``tools/workqueue/wq_monitor.py``: one row per
workqueue (works started in total, in flight, CPU time, CPU-intensive works,
concurrency-management wakeups, mayday calls, rescued works) and one row per
worker pool (runnable, idle and all workers, pending works, CPU online).

It reads the Prometheus text exposition that
:func:`cmwq_exec.metrics.start_http_server` serves, so it works on any process
that exports the ``cmwq_*`` metrics, local or not, and never touches the
process itself.  The default URL is ``http://127.0.0.1:9464/metrics``
(:data:`cmwq_exec.metrics.DEFAULT_PORT`).

``--json`` prints snapshots as JSON lines for scripts: one by default, one per
``--interval`` with ``--count N``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .metrics import DEFAULT_PORT

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}/metrics"

# sample name -> field of a workqueue row
_WQ_SAMPLES = {
    "cmwq_workqueue_works_started_total": "started",
    "cmwq_workqueue_works_completed_total": "completed",
    "cmwq_workqueue_inflight": "inflight",
    "cmwq_workqueue_cpu_seconds_total": "cpu_seconds",
    "cmwq_workqueue_cpu_intensive_total": "cpu_intensive",
    "cmwq_workqueue_cm_wakeups_total": "cm_wakeups",
    "cmwq_workqueue_mayday_total": "mayday",
    "cmwq_workqueue_rescued_total": "rescued",
    "cmwq_workqueue_queue_latency_seconds_sum": "_queue_latency_sum",
    "cmwq_workqueue_queue_latency_seconds_count": "_queue_latency_count",
    "cmwq_workqueue_execution_seconds_sum": "_execution_sum",
    "cmwq_workqueue_execution_seconds_count": "_execution_count",
}
_WQ_INT_FIELDS = ("started", "completed", "inflight", "cpu_intensive", "cm_wakeups", "mayday", "rescued")

# sample name -> field of a pool row
_POOL_SAMPLES = {
    "cmwq_pool_nr_running": "nr_running",
    "cmwq_pool_idle_workers": "idle",
    "cmwq_pool_workers": "workers",
    "cmwq_pool_pending_works": "pending",
    "cmwq_pool_online": "online",
    "cmwq_pool_cm_wakeups_total": "cm_wakeups",
    "cmwq_pool_cpu_intensive_total": "cpu_intensive",
    "cmwq_pool_mayday_total": "mayday",
}
_POOL_INT_FIELDS = ("nr_running", "idle", "workers", "pending", "cm_wakeups", "cpu_intensive", "mayday")


class TopError(Exception):
    """The metrics could not be read or understood; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``cmwq-exec top`` to ``parser``."""
    parser.add_argument(
        "--url", default=DEFAULT_URL,
        help=f"the /metrics URL of the process to watch (default: {DEFAULT_URL}, "
             "where cmwq_exec.metrics.start_http_server(DEFAULT_PORT) serves)")
    parser.add_argument(
        "--interval", type=_positive_float, default=1.0, metavar="SECONDS",
        help="seconds between refreshes (default: 1)")
    parser.add_argument(
        "--count", type=_positive_int, default=None, metavar="N",
        help="stop after N refreshes (default: run until interrupted; 1 with --json)")
    parser.add_argument(
        "--json", action="store_true",
        help="print snapshots as JSON, one object per line, instead of the live table")
    parser.add_argument(
        "--timeout", type=_positive_float, default=5.0, metavar="SECONDS",
        help="HTTP timeout for one read of the URL (default: 5)")


def main(argv: list[str] | None = None) -> int:
    """Run ``cmwq-exec top`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = argparse.ArgumentParser(
        prog="cmwq-exec top",
        description="Live view of a cmwq_exec process's workqueues and worker pools, "
                    "read from its Prometheus /metrics endpoint.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run ``top`` with parsed arguments (see :func:`add_arguments`); return the exit status.

    0 on success, 1 when the URL cannot be read or does not hold metrics,
    130 when interrupted.
    """
    try:
        if args.json:
            _run_json(args)
        else:
            _run_live(args)
    except TopError as exc:
        print(f"cmwq-exec top: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# -- reading ----------------------------------------------------------------------------------


def fetch(url: str, timeout: float = 5.0) -> str:
    """Return the body of ``url``; raise :class:`TopError` saying why it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        raise TopError(f"cannot read {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise TopError(
            f"cannot reach {url}: {exc.reason}. Is a cmwq_exec process serving metrics there "
            "(cmwq_exec.metrics.start_http_server)? Use --url to point elsewhere.") from exc
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        raise TopError(f"cannot read {url}: {exc}") from exc


def parse(text: str) -> dict[str, Any]:
    """Turn a Prometheus text exposition into a snapshot.

    Returns ``{"workqueues": [...], "pools": [...]}``: workqueue rows sorted by
    name with ``started``, ``completed``, ``inflight``, ``cpu_seconds``,
    ``cpu_intensive``, ``cm_wakeups``, ``mayday``, ``rescued`` and the mean
    ``queue_latency_avg`` / ``execution_avg`` in seconds (None without
    samples); pool rows in CPU order with ``nr_running``, ``idle``,
    ``workers``, ``pending``, ``online`` (bool), ``cm_wakeups``,
    ``cpu_intensive``, ``mayday``.  Other metrics are ignored.
    """
    workqueues: dict[str, dict[str, Any]] = {}
    pools: dict[str, dict[str, Any]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                field = _WQ_SAMPLES.get(sample.name)
                if field is not None:
                    name = sample.labels.get("workqueue", "")
                    workqueues.setdefault(name, {"workqueue": name})[field] = sample.value
                    continue
                field = _POOL_SAMPLES.get(sample.name)
                if field is not None:
                    name = sample.labels.get("pool", "")
                    pools.setdefault(name, {"pool": name})[field] = sample.value
    except ValueError as exc:
        raise TopError(f"not a Prometheus text exposition: {exc}") from exc

    wq_rows = []
    for name in sorted(workqueues):
        row = workqueues[name]
        for field in _WQ_INT_FIELDS:
            row[field] = int(row.get(field, 0))
        row["cpu_seconds"] = float(row.get("cpu_seconds", 0.0))
        for hist in ("queue_latency", "execution"):
            count = row.pop(f"_{hist}_count", 0)
            total = row.pop(f"_{hist}_sum", 0.0)
            row[f"{hist}_avg"] = total / count if count else None
        wq_rows.append(row)

    pool_rows = []
    for name in sorted(pools, key=_pool_order):
        row = pools[name]
        for field in _POOL_INT_FIELDS:
            row[field] = int(row.get(field, 0))
        row["online"] = bool(row.get("online", 0))
        pool_rows.append(row)
    return {"workqueues": wq_rows, "pools": pool_rows}


def snapshot(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """Fetch ``url`` and parse it; adds ``url`` and ``time`` (Unix seconds) to the snapshot."""
    taken = time.time()
    snap = parse(fetch(url, timeout))
    snap["url"] = url
    snap["time"] = taken
    return snap


def add_rates(snap: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Set each workqueue's ``completed_per_second`` from the previous snapshot (None for the first)."""
    before: dict[str, Any] = {}
    elapsed = 0.0
    if previous is not None:
        before = {row["workqueue"]: row for row in previous["workqueues"]}
        elapsed = snap["time"] - previous["time"]
    for row in snap["workqueues"]:
        old = before.get(row["workqueue"])
        if old is None or elapsed <= 0 or row["completed"] < old["completed"]:
            row["completed_per_second"] = None
        else:
            row["completed_per_second"] = (row["completed"] - old["completed"]) / elapsed


# -- output -----------------------------------------------------------------------------------


def _run_json(args: argparse.Namespace) -> None:
    count = args.count or 1
    previous = None
    for i in range(count):
        if i:
            time.sleep(args.interval)
        snap = snapshot(args.url, args.timeout)
        add_rates(snap, previous)
        print(json.dumps(snap, sort_keys=True), flush=True)
        previous = snap


def _run_live(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    snap = snapshot(args.url, args.timeout)  # the first read must work: fail clearly otherwise
    add_rates(snap, None)
    refreshes = 1
    if not console.is_terminal:  # piped: one complete frame after another, each ending in a newline
        console.print(render(snap, width=console.width))
        while args.count is None or refreshes < args.count:
            time.sleep(args.interval)
            new = snapshot(args.url, args.timeout)
            add_rates(new, snap)
            snap = new
            console.print(render(snap, width=console.width))
            refreshes += 1
        return
    with Live(render(snap, width=console.width), console=console, auto_refresh=False) as live:
        live.refresh()
        while args.count is None or refreshes < args.count:
            time.sleep(args.interval)
            try:
                new = snapshot(args.url, args.timeout)
            except TopError as exc:  # the process may come back: keep showing the last numbers
                live.update(render(snap, error=str(exc), width=console.width), refresh=True)
            else:
                add_rates(new, snap)
                snap = new
                live.update(render(snap, width=console.width), refresh=True)
            refreshes += 1


# Column headers: wq_monitor.py's, and shorter ones for terminals narrower than WIDE.
WIDE = 100
_WQ_COLUMNS = ("total", "infl", "done/s", "CPUtime", "CPUitsv", "CMW", "mayday", "rescued")
_WQ_COLUMNS_NARROW = ("total", "infl", "done/s", "CPUsec", "itsv", "CMW", "mday", "resc")
_POOL_COLUMNS = ("online", "running", "idle", "workers", "pending", "CMW", "CPUitsv", "mayday")
_POOL_COLUMNS_NARROW = ("on", "run", "idle", "wrk", "pend", "CMW", "itsv", "mday")
_NARROW_LEGEND = ("CPUsec: CPU seconds, itsv: CPU-intensive works, CMW: concurrency-management wakeups, "
                  "mday: mayday, resc: rescued, run: running, wrk: workers, pend: pending")


def render(snap: dict[str, Any], error: str | None = None, width: int | None = None) -> Any:
    """Build the rich renderable for one snapshot (two tables, and ``error`` if the last read failed).

    ``width`` is the terminal's: below :data:`WIDE` columns the tables use short headers and tight
    padding, with a legend, so that an 80-column terminal shows every column and whole headers.
    """
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    narrow = width is not None and width < WIDE
    tight: dict[str, Any] = {"padding": (0, 1), "pad_edge": False} if narrow else {}
    stamp = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    wqs = Table(title=f"cmwq workqueues — {snap['url']} at {stamp}", title_justify="left",
                box=box.SIMPLE_HEAD, **tight)
    # Long names wrap and never lose characters; the header itself never breaks.
    wqs.add_column("workqueue", overflow="fold", min_width=len("workqueue"))
    for column in _WQ_COLUMNS_NARROW if narrow else _WQ_COLUMNS:
        wqs.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    for row in snap["workqueues"]:
        rate = row.get("completed_per_second")
        wqs.add_row(
            row["workqueue"],
            str(row["started"]),
            str(row["inflight"]),
            "-" if rate is None else f"{rate:.1f}",
            f"{row['cpu_seconds']:.1f}",
            str(row["cpu_intensive"]),
            str(row["cm_wakeups"]),
            str(row["mayday"]),
            str(row["rescued"]),
        )
    pools = Table(title="cmwq worker pools", title_justify="left", box=box.SIMPLE_HEAD, **tight)
    pools.add_column("pool", overflow="fold", min_width=len("unbound"))
    for column in _POOL_COLUMNS_NARROW if narrow else _POOL_COLUMNS:
        pools.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    for row in snap["pools"]:
        pools.add_row(
            row["pool"],
            "yes" if row["online"] else "[red]no[/red]",
            str(row["nr_running"]),
            str(row["idle"]),
            str(row["workers"]),
            str(row["pending"]),
            str(row["cm_wakeups"]),
            str(row["cpu_intensive"]),
            str(row["mayday"]),
        )
    parts: list[Any] = [wqs, pools]
    if narrow:
        parts.append(Text(_NARROW_LEGEND, style="dim"))
    if not snap["workqueues"] and not snap["pools"]:
        parts.append(Text(f"no cmwq_* metrics at {snap['url']}", style="yellow"))
    if error is not None:
        parts.append(Text(error, style="bold red"))
    return Group(*parts)


# -- helpers ----------------------------------------------------------------------------------


def _pool_order(name: str) -> tuple[int, int, str]:
    """cpu0, cpu1, ..., cpu10, then anything else (the unbound pool) by name."""
    if name.startswith("cpu") and name[3:].isdigit():
        return (0, int(name[3:]), name)
    return (1, 0, name)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
