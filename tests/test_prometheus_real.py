"""A real Prometheus scrapes a real cmwq_exec workload; every dashboard query must return data.

The workload runs in a subprocess (its own pools, its own exporter on a free
port).  Prometheus (Debian's ``prometheus`` binary; ``.ci/install-prometheus.sh``
installs it) runs on another free port with its own config and a temporary
TSDB, scraping every second.  Each ``expr`` of each panel of
``grafana/dashboards/cmwq_exec.json``, with Grafana's variables substituted,
is then run through ``/api/v1/query`` until it returns a sample (or a
deadline passes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import in_ci, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "cmwq_exec.json"
SCRAPE_INTERVAL = 1.0

# Grafana's built-in interval variables, as Grafana would set them for a 1 s scrape
# ($__rate_interval is at least four scrape intervals).
GRAFANA_BUILTINS = {
    "__rate_interval": "4s",
    "__interval": "1s",
    "__range": "1m",
}

WORKLOAD = textwrap.dedent(
    """
    import sys, threading, time
    from cmwq_exec import CMWQExecutor, WorkQueue, Work, WQ, blocking, metrics

    server, _ = metrics.start_http_server(0)
    print(server.server_port, flush=True)

    def sleeper():
        with blocking():
            time.sleep(0.005)

    def spinner():
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            pass

    stop = threading.Event()
    # The test closes our stdin when it is done; the deadline bounds us if it never does.
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    deadline = time.monotonic() + float(sys.argv[1])

    wq = WorkQueue("prom_test_wq", WQ.RESCUER)
    unbound = WorkQueue("prom_test_unbound", WQ.UNBOUND)
    executor = CMWQExecutor(name="prom_test_executor")
    while not stop.is_set() and time.monotonic() < deadline:
        works = [Work(sleeper) for _ in range(4)] + [Work(spinner) for _ in range(2)]
        for work in works:
            wq.queue_work(work)
        unbound.queue_work(Work(sleeper))
        futures = [executor.submit(sleeper) for _ in range(4)]
        for future in futures:
            future.result()
        wq.flush()
        unbound.flush()
        stop.wait(0.02)
    executor.shutdown()
    """
)


# -- helpers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if in_ci():
            pytest.fail("the prometheus binary is missing in CI: .ci/install-prometheus.sh should install it")
        pytest.skip("the prometheus binary is not installed (run .ci/install-prometheus.sh)")
    return binary


def answering(predicate: Callable[[], Any]) -> Callable[[], Any]:
    """``predicate`` for :func:`wait_for`, with a server not up yet (connection refused, a reply
    cut short) counted as "not yet"; each new error is printed (pytest shows it if the wait fails)."""
    seen: list[str] = []

    def call() -> Any:
        try:
            return predicate()
        except (OSError, ValueError) as exc:
            if not seen or seen[-1] != repr(exc):
                seen.append(repr(exc))
                print(f"not yet: {exc!r}")
            return None
    return call


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """Run an instant query; return its result vector (raise on a PromQL error)."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body = json.loads(http_get(url))
    except urllib.error.HTTPError as exc:  # 400 for a bad query: say which and why
        raise AssertionError(f"query {expr!r} failed: {exc.read().decode()}") from exc
    assert body["status"] == "success", body
    return body["data"]["result"]


def substitute(expr: str) -> str:
    """Replace Grafana's variables: the interval built-ins by durations, every other ($pool,
    $workqueue, $instance, in $x, ${x} or [[x]] form) by ".*" (the dashboard's "All" value)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        return GRAFANA_BUILTINS.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", replace, expr)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows included."""
    dashboard = json.loads(DASHBOARD.read_text())

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    exprs = []
    for panel in walk(dashboard["panels"]):
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    return exprs


def variable_queries() -> list[tuple[str, str]]:
    """The dashboard's label_values(metric, label) variables as PromQL: group by (label) (metric)."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        text = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text.strip())
        assert match, f"variable {variable['name']}: unexpected query {text!r}"
        queries.append((variable["name"], f"group by ({match.group(2)}) ({match.group(1)})"))
    return queries


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def workload(tmp_path: Path) -> Iterator[int]:
    """A subprocess running a cmwq_exec workload with metrics on a free port; yields the port."""
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, CMWQ_EXEC_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), "180"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(tmp_path / "workload.err").open("w"),
        env=env, text=True,
    )
    try:
        line = proc.stdout.readline()  # the port, printed first; EOF if it died
        if not line.strip().isdigit():
            proc.wait(timeout=10)
            pytest.fail(f"workload did not start: {line!r}\n{(tmp_path / 'workload.err').read_text()}")
        yield int(line)
        assert proc.poll() is None, f"workload died:\n{(tmp_path / 'workload.err').read_text()}"
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            proc.kill()
            proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path, workload: int) -> Iterator[str]:
    """A real Prometheus on a free loopback port scraping ``workload``; yields its base URL."""
    binary = prometheus_binary()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(textwrap.dedent(f"""\
        global:
          scrape_interval: {SCRAPE_INTERVAL:g}s
          evaluation_interval: {SCRAPE_INTERVAL:g}s
        scrape_configs:
          - job_name: cmwq_exec
            static_configs:
              - targets: ["127.0.0.1:{workload}"]
        """))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                log_text = (tmp_path / "prometheus.log").read_text()
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{log_text}")
            return http_get(f"{base}/-/ready", timeout=1).startswith(b"Prometheus")

        wait_for("prometheus to be ready", answering(ready), 60, interval=0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# -- tests --------------------------------------------------------------------------------------


def test_substitute_replaces_every_grafana_variable() -> None:
    expr = 'rate(x{a=~"$pool", b=~"${workqueue}", c=~"[[instance]]"}[$__rate_interval])'
    assert substitute(expr) == 'rate(x{a=~".*", b=~".*", c=~".*"}[4s])'


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    exprs = "\n".join(expr for _title, expr in dashboard_exprs())
    for needed in ("cmwq_pool_nr_running", "cmwq_pool_idle_workers", "cmwq_pool_workers",
                   "cmwq_pool_pending_works", "cmwq_workqueue_works_completed_total",
                   "cmwq_workqueue_queue_latency_seconds_bucket", "cmwq_workqueue_execution_seconds_bucket",
                   "cmwq_workqueue_mayday_total", "cmwq_workqueue_rescued_total",
                   "cmwq_workqueue_cpu_intensive_total", "cmwq_pool_online",
                   "cmwq_pool_creations_paced_total", "cmwq_pool_workers_adopted_total",
                   "cmwq_pool_sleep_seconds_avg"):
        assert needed in exprs, needed
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (instance, workqueue, le) " \
               "(rate(cmwq_workqueue_queue_latency_seconds_bucket" in exprs


def test_every_dashboard_query_returns_data_from_a_real_prometheus(prometheus: str) -> None:
    # First: Prometheus scraped the workload successfully, more than once (rate() needs two samples).
    wait_for("a successful scrape of the workload",
             answering(lambda: query(prometheus, 'up{job="cmwq_exec"} == 1')), 60, interval=0.2)
    samples = 'count_over_time(cmwq_pool_workers{pool="unbound"}[1m]) >= 5'
    wait_for("several samples of the workload", answering(lambda: query(prometheus, samples)), 60,
             interval=0.2)

    exprs = dashboard_exprs() + variable_queries()
    assert len(exprs) >= 15
    deadline = time.monotonic() + 60
    empty = []
    for title, expr in exprs:
        promql = substitute(expr)
        assert "$" not in promql and "[[" not in promql, promql
        try:
            wait_for(f"{title}: {promql}", answering(lambda q=promql: query(prometheus, q)),
                     max(0.0, deadline - time.monotonic()), interval=0.2)
        except AssertionError:
            empty.append(f"{title}: {promql}")
    assert not empty, "queries without data:\n" + "\n".join(empty)

    # And the numbers are the workload's: both named workqueues completed works.
    completed = query(prometheus, 'cmwq_workqueue_works_completed_total{workqueue=~"prom_test_.*"} > 0')
    assert {r["metric"]["workqueue"] for r in completed} >= {"prom_test_wq", "prom_test_unbound"}
