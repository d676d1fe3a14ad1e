"""The metric names a PromQL expression reads, and the names the worker's ``/metrics`` can hold.

Whether an expression *parses* is Prometheus' parser's to say (``promtool check rules``, see
:func:`check_parse`). Which metrics it reads is found here from PromQL's lexical structure:
every bare name that is not a keyword, an aggregation, a function (a name followed by ``(``), a
label name (inside ``{...}``, or in a ``by``/``without``/``on``/``ignoring``/``group_left``/
``group_right`` list) or part of a string, a duration or a number. A selector that hides its
name (``{__name__="..."}``) is refused: nothing could check it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from tests.promtool import check_rules
from worker.ops.metrics import Metrics

#: The series names each type of metric family exports (``_created`` left out: no query needs it).
SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}

#: Series Prometheus itself makes for every target it scrapes.
SCRAPE_SERIES = frozenset({"up"})

#: Names that are PromQL's own words, never metrics (PromQL reads them in any case).
KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "start", "end",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile",
})

#: Keywords followed by a list of label names in parentheses.
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

_TOKEN = re.compile(r"""
      (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<number>(?:0[xX][0-9a-fA-F]+|\d*\.?\d+(?:[eE][+-]?\d+)?)(?:[a-zA-Z]+\d*)*)
    | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<open>[({])
    | (?P<close>[)}])
    | (?P<other>\S)
""", re.VERBOSE)


def exported_names(metrics: Metrics | None = None) -> frozenset[str]:
    """Every series name a worker's ``/metrics`` may hold: each family registered in
    :class:`worker.ops.metrics.Metrics`, with the suffixes of its type."""
    registry = (metrics or Metrics()).registry
    return frozenset(family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type])


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` reads (see the module docstring)."""
    tokens = [(match.lastgroup, match.group()) for match in _TOKEN.finditer(expr)]
    names: set[str] = set()
    braces = 0
    label_list = False
    for index, (kind, text) in enumerate(tokens):
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "open":
            braces += text == "{"
        elif kind == "close":
            braces -= text == "}"
            label_list = label_list and text != ")"
        elif kind != "name" or label_list:
            continue
        elif braces:
            if text == "__name__":
                raise ValueError(f"a selector hides its metric's name in {{__name__=...}}: {expr}")
        elif text.lower() in GROUPING:
            label_list = following == "("
        elif text.lower() not in KEYWORDS and following != "(":
            names.add(text)
    return names


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` with each ``$name`` / ``${name}`` (a Grafana variable) replaced by its value;
    a variable without one raises KeyError, naming it."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], expr)


def check_parse(exprs: Mapping[str, str], directory: Path) -> None:
    """Have Prometheus' parser read every expression (as the recording rules of a generated rules
    file, through ``promtool check rules``); fail the test with its message when one does not
    parse. ``exprs``: a name for each (a metric name: letters, digits, ``_``) -> the expression."""
    rules = [{"record": name, "expr": expr} for name, expr in exprs.items()]
    path = directory / "parsed.rules.json"  # JSON is YAML: promtool reads it as a rules file
    path.write_text(json.dumps({"groups": [{"name": "parsed", "rules": rules}]}, indent=2))
    assert check_rules(path) == len(rules)
