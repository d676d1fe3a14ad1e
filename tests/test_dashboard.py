"""The Grafana dashboard (``deploy/grafana/netcore-activity.json``) asks only what the worker answers.

Every query of every panel, and of the variables, names only metrics the worker exports (the
families registered in ``worker/ops/metrics.py``'s ``Metrics``, with the suffixes of their type;
``up`` is Prometheus' own), and parses as PromQL in Prometheus' own parser (``promtool check
rules`` on a rules file made of them, Grafana's variables replaced by values of their kind).
Every panel reads the data source, job and workers chosen at the top.
``tests/integration/test_prometheus.py`` runs every query against a real Prometheus scraping a
real worker.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.dashboard import load, panels, queries
from tests.promql import SCRAPE_SERIES, check_parse, exported_names, metric_names, substitute

#: What Grafana puts in place of its variables, as far as Prometheus' parser is concerned.
VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "job": "netcore-activity", "instance": ".*"}

#: The data source every panel and query reads: the dashboard's variable.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: The matchers that narrow every selector to the chosen job and workers.
SCOPE = ('job=~"$job"', 'instance=~"$instance"')


def test_every_query_names_only_metrics_the_worker_exports() -> None:
    known = exported_names() | SCRAPE_SERIES
    for name, expr in queries(load()).items():
        names = metric_names(expr)
        assert names, f"{name} reads no metric: {expr}"
        assert names <= known, f"{name} reads {sorted(names - known)}, which the worker does not export"


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    check_parse({name: substitute(expr, VARIABLES) for name, expr in queries(load()).items()}, tmp_path)


def test_every_panel_reads_the_chosen_data_source_job_and_workers() -> None:
    dashboard = load()
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "job", "instance"]
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    assert dashboard["templating"]["list"][0]["query"] == "prometheus"
    for panel in panels(dashboard):
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            for metric in metric_names(target["expr"]):
                for selector in re.finditer(rf"\b{re.escape(metric)}\b(\{{[^}}]*\}})?", target["expr"]):
                    matchers = selector.group(1) or ""
                    assert all(m in matchers for m in SCOPE), f"{panel['title']!r}: {selector.group()}"


def test_the_ids_are_unique() -> None:
    dashboard = load()
    ids = [panel["id"] for panel in dashboard["panels"]] + [p["id"] for p in panels(dashboard)
                                                           if p not in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
