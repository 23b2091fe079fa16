"""The metrics, their documentation and the Grafana dashboard agree.

Every family :class:`cmwq_exec.metrics.CMWQCollector` (the pools and workqueues) and
:class:`cmwq_exec.metrics.TaskPoolCollector` (the Celery pool) export is in a metric table of
docs/observability.md, and the tables name nothing else; every family of the pools and workqueues
is charted by some panel of ``grafana/dashboards/cmwq_exec.json``. (``tests/test_prometheus_real.py``
runs every panel's query against a real Prometheus; this one needs nothing outside the process.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmwq_exec import metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "cmwq_exec.json"
OBSERVABILITY = ROOT / "docs" / "observability.md"


def exported(celery: bool = True) -> dict[str, str]:
    """{sample name a query uses: family type} of every family the collectors describe (the Celery
    pool's too unless ``celery`` is false)."""
    names = {}
    families = list(metrics.CMWQCollector(system=_NoSystem()).describe())
    if celery:
        families += metrics.TaskPoolCollector(dict).describe()
    for family in families:
        suffix = {"counter": "_total", "histogram": "_bucket"}.get(family.type, "")
        names[family.name + suffix] = family.type
    return names


class _NoSystem:
    pools: list[Any] = []
    workqueues: list[Any] = []


def documented() -> set[str]:
    """The metric names of the tables in docs/observability.md, as queries use them."""
    names = set()
    for match in re.finditer(r"^\| `(cmwq_\w+)(?:\{[^}]*\})?` \| (\w+) \|", OBSERVABILITY.read_text(), re.M):
        name, kind = match.groups()
        names.add(name + "_bucket" if kind == "histogram" else name)
    return names


def charted() -> str:
    """Every query of every panel of the dashboard, rows included, as one text."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    return "\n".join(target["expr"] for panel in walk(dashboard["panels"])
                     for target in panel.get("targets", []))


def test_every_exported_family_is_documented_and_nothing_else():
    assert documented() == set(exported())


def test_every_family_of_the_pools_and_workqueues_is_charted():
    queries = charted()
    missing = [name for name in exported(celery=False) if not re.search(rf"\b{name}\b", queries)]
    assert not missing, f"no dashboard panel queries {missing}"
