"""The Grafana dashboard of the worker (``deploy/grafana/netcore-activity.json``): its panels and
every PromQL expression it holds (tests/test_dashboard.py checks them;
tests/integration/test_prometheus.py runs them against a real Prometheus)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tests.harness import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "netcore-activity.json"

#: A variable query: ``label_values(<selector>, <label>)``.
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel but the rows, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every PromQL expression, named ``panel_<id>_<refId>`` or ``variable_<name>``."""
    found = {f"panel_{panel['id']}_{target['refId']}": target["expr"]
             for panel in panels(dashboard) for target in panel["targets"]}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"variable {variable['name']}: not label_values(<selector>, <label>)"
            found[f"variable_{variable['name']}"] = match["selector"]
    return found
