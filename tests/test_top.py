"""``cmwq-exec top`` read against a real exporter serving a real workload."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_for
from prometheus_client import CollectorRegistry

from cmwq_exec import Work, WorkQueue, blocking, metrics, top


@pytest.fixture
def url() -> Iterator[str]:
    """A metrics server of this process, on a free loopback port."""
    registry = CollectorRegistry()
    server, thread = metrics.start_http_server(0, registry=registry)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def held_works() -> Iterator[tuple[str, int, threading.Event]]:
    """A workqueue with 3 works started and blocked (in blocking()) until the event is set."""
    name = f"top_test_{uuid.uuid4().hex[:8]}"
    wq = WorkQueue(name)
    release = threading.Event()
    started = threading.Semaphore(0)

    def work() -> None:
        started.release()
        with blocking():
            release.wait(30)

    for _ in range(3):
        assert wq.queue_work(Work(work))
    for _ in range(3):
        assert started.acquire(timeout=30), "a work did not start"
    try:
        yield name, 3, release
    finally:
        release.set()
        wq.flush()
        wq.destroy()


def _json_lines(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _row(snapshot: dict, name: str) -> dict:
    rows = [row for row in snapshot["workqueues"] if row["workqueue"] == name]
    assert len(rows) == 1, snapshot["workqueues"]
    return rows[0]


def test_json_snapshot_shows_works_in_flight(url: str, held_works, capsys) -> None:
    name, n, _release = held_works
    assert top.main(["--url", url, "--json", "--count", "1"]) == 0
    [snapshot] = _json_lines(capsys)
    row = _row(snapshot, name)
    assert row["started"] == n
    assert row["inflight"] == n
    assert row["completed"] == 0
    assert row["completed_per_second"] is None  # no previous snapshot
    # Three works blocked at once on the per-CPU pools: their workers exist and are busy, not idle.
    pools = {pool["pool"]: pool for pool in snapshot["pools"]}
    assert "unbound" in pools
    assert all(pool["online"] for pool in pools.values())
    busy = sum(pool["workers"] - pool["idle"] for name_, pool in pools.items() if name_ != "unbound")
    assert busy >= n


def test_json_snapshot_after_completion(url: str, held_works, capsys) -> None:
    name, n, release = held_works
    release.set()

    def reported_done() -> dict[str, Any] | None:
        assert top.main(["--url", url, "--json"]) == 0
        [snapshot] = _json_lines(capsys)
        row = _row(snapshot, name)
        return row if row["completed"] == n else None

    row = wait_for("the exporter to report the works done", reported_done, 30, interval=0.05)
    assert (row["started"], row["completed"], row["inflight"]) == (n, n, 0)
    assert row["execution_avg"] is None or row["execution_avg"] >= 0


def test_json_count_prints_one_snapshot_per_refresh_with_rates(url: str, held_works, capsys) -> None:
    assert top.main(["--url", url, "--json", "--count", "3", "--interval", "0.05"]) == 0
    snapshots = _json_lines(capsys)
    assert len(snapshots) == 3
    assert snapshots[0]["time"] < snapshots[1]["time"] < snapshots[2]["time"]
    name = held_works[0]
    assert _row(snapshots[0], name)["completed_per_second"] is None
    assert _row(snapshots[2], name)["completed_per_second"] == 0.0  # all held: none completes


def test_table_view_lists_workqueues_and_pools(url: str, held_works, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # rich sizes the table to the terminal; names fold below ~90
    name = held_works[0]
    assert top.main(["--url", url, "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert "cmwq workqueues" in out and "cmwq worker pools" in out
    assert name in out
    assert "unbound" in out


def test_unreachable_url_is_a_clear_error(capsys) -> None:
    # Port 1 on loopback: nothing listens there (tcpmux is not run on test machines).
    assert top.main(["--url", "http://127.0.0.1:1/metrics", "--json"]) == 1
    err = capsys.readouterr().err
    assert "cmwq-exec top: cannot reach http://127.0.0.1:1/metrics" in err
    assert "start_http_server" in err


@pytest.mark.parametrize("argv", [["--interval", "0"], ["--interval", "x"], ["--count", "0"]])
def test_bad_arguments_are_usage_errors(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        top.main(argv)
    assert exc.value.code == 2
    assert "cmwq-exec top" in capsys.readouterr().err


def test_parse_ignores_other_metrics_and_rejects_garbage() -> None:
    text = (
        "# TYPE process_open_fds gauge\nprocess_open_fds 7.0\n"
        "# TYPE cmwq_pool_workers gauge\ncmwq_pool_workers{pool=\"cpu10\"} 3.0\n"
        "cmwq_pool_workers{pool=\"cpu2\"} 2.0\ncmwq_pool_workers{pool=\"unbound\"} 1.0\n"
    )
    snapshot = top.parse(text)
    assert [pool["pool"] for pool in snapshot["pools"]] == ["cpu2", "cpu10", "unbound"]
    assert snapshot["pools"][0]["workers"] == 2 and snapshot["pools"][0]["online"] is False
    assert snapshot["workqueues"] == []
    with pytest.raises(top.TopError):
        top.parse("this is { not prometheus\n")


def _render_text(snap: dict[str, Any], width: int) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(top.render(snap, width=width))
    console.file.close()
    return console.export_text()


def _snap() -> dict[str, Any]:
    return {"url": "http://127.0.0.1:9464/metrics", "time": 0.0,
            "workqueues": [{"workqueue": "a_rather_long_workqueue_name", "started": 123456, "inflight": 12,
                            "completed_per_second": 1234.5, "cpu_seconds": 12.3, "cpu_intensive": 3,
                            "cm_wakeups": 4567, "mayday": 0, "rescued": 0}],
            "pools": [{"pool": name, "online": True, "nr_running": 1, "idle": 2, "workers": 40, "pending": 3,
                       "cm_wakeups": 100, "cpu_intensive": 1, "mayday": 0} for name in ("cpu0", "unbound")]}


@pytest.mark.parametrize("width", [80, 120])
def test_the_table_fits_the_terminal_with_whole_headers(width: int) -> None:
    text = _render_text(_snap(), width)
    lines = text.splitlines()
    assert all(len(line.rstrip()) <= width for line in lines)
    headers = [line.split() for line in lines if line.split()[:1] in (["workqueue"], ["pool"])]
    assert len(headers) == 2
    wanted = (top._WQ_COLUMNS_NARROW, top._POOL_COLUMNS_NARROW) if width < top.WIDE else (
        top._WQ_COLUMNS, top._POOL_COLUMNS)
    assert headers[0][1:] == list(wanted[0]) and headers[1][1:] == list(wanted[1])
    assert "unbound" in text and "123456" in text and "4567" in text
    rule = next(i for i, line in enumerate(lines) if "───" in line)
    block = lines[rule + 1:lines.index(next(line for line in lines[rule:] if not line.strip()), rule)]
    assert "".join(line.split()[0] for line in block) == "a_rather_long_workqueue_name"  # folded, never cut


def test_piped_output_is_complete_frames_ending_in_a_newline(url: str, held_works, capsys,
                                                             monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert top.main(["--url", url, "--count", "2", "--interval", "0.1"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    assert out.count("cmwq worker pools") == 2
    assert all(len(line.rstrip()) <= 80 for line in out.splitlines())
