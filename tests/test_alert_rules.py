"""The alerting rules (``deploy/prometheus/``) load, and their promtool unit tests pass and pin them.

- ``promtool check rules`` loads each file, and the text reading of ``tests/rule_files.py`` finds
  every rule and every expression whole (each parses);
- ``promtool test rules`` passes ``tests/prometheus/*.test.yml``;
- every alert has a test case where it fires and one where it stays silent;
- every ``for:`` is pinned: made a minute shorter or longer, some case fails;
- every expression reads only what exists: the worker's metrics (``worker/ops/metrics.py``),
  Prometheus' ``up``, names recorded in the same file and, in ``rabbitmq-alerts.yml`` only, the
  RabbitMQ plugin's (checked against a real node in ``tests/integration/test_prometheus.py``);
- every dead-letter reason the worker writes has exactly one alert.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.promql import SCRAPE_SERIES, check_parse, exported_names, metric_names
from tests.promtool import check_rules, promtool
from tests.rule_files import RULES_DIR, UNIT_TESTS, read_rules, unit_test_pointing_at, with_for
from worker.deadletter import envelopes

#: One unit-test case: the alert it is about, and whether it expects none (``exp_alerts: []``).
CASE = re.compile(r"alertname: (\S+)\s*\n\s*exp_alerts:(\s*\[\])?")

#: The rule file whose alerts need RabbitMQ's exporter, and the prefix of that exporter's names.
RABBITMQ_RULES, RABBITMQ_PREFIX = RULES_DIR / "rabbitmq-alerts.yml", "rabbitmq_"

#: The recorded series the dead-letter alerts read.
DEAD_LETTERS_RECORD = "account_reason:netcore_activity_events_dead_lettered:increase10m"

rule_files = pytest.mark.parametrize("rules", list(UNIT_TESTS), ids=lambda path: path.name)


@rule_files
def test_the_rule_file_loads_and_is_read_whole(rules: Path, tmp_path: Path) -> None:
    found = read_rules(rules)
    assert check_rules(rules) == len(found)
    assert all(rule.expr for rule in found), [rule.name for rule in found if not rule.expr]
    check_parse({f"rule_{n}": rule.expr for n, rule in enumerate(found)}, tmp_path)


@rule_files
def test_the_unit_tests_pass(rules: Path) -> None:
    done = promtool("test", "rules", UNIT_TESTS[rules])
    assert done.returncode == 0, f"{done.stdout}{done.stderr}"


@rule_files
def test_every_alert_has_a_case_where_it_fires_and_one_where_it_is_silent(rules: Path) -> None:
    text = UNIT_TESTS[rules].read_text()
    cases = CASE.findall(text)
    assert len(cases) == text.count("alertname:"), "a case whose exp_alerts does not follow its alertname"
    alerts = {rule.name for rule in read_rules(rules) if rule.kind == "alert"}
    assert {name for name, silent in cases if not silent} == alerts
    assert {name for name, silent in cases if silent} == alerts


@rule_files
def test_every_for_duration_is_pinned_by_the_unit_tests(rules: Path, tmp_path: Path) -> None:
    changes: dict[str, Path] = {}  # what was changed -> the unit tests pointing at the changed rules
    for rule in (rule for rule in read_rules(rules) if rule.kind == "alert"):
        for minutes in (rule.for_minutes - 1, rule.for_minutes + 1):
            if minutes < 0:
                continue
            changed = tmp_path / f"{rule.name}-for-{minutes}m.yml"
            changed.write_text(with_for(rules, {rule.name: f"{minutes}m"}))
            assert check_rules(changed) == len(read_rules(rules))
            assert {r.name: r.for_minutes for r in read_rules(changed)}[rule.name] == minutes
            test = tmp_path / f"{rule.name}-for-{minutes}m.test.yml"
            test.write_text(unit_test_pointing_at(UNIT_TESTS[rules], changed, about=rule.name))
            changes[f"{rule.name} with for: {minutes}m (instead of {rule.for_minutes}m)"] = test
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        passed = dict(zip(changes, pool.map(lambda test: promtool("test", "rules", test).returncode == 0,
                                            changes.values())))
    unpinned = [change for change, ok in passed.items() if ok]
    assert not unpinned, f"no unit test fails with: {unpinned}"


@rule_files
def test_every_expression_reads_only_metrics_that_exist(rules: Path) -> None:
    found = read_rules(rules)
    known = exported_names() | SCRAPE_SERIES | {rule.name for rule in found if rule.kind == "record"}
    for rule in found:
        names = metric_names(rule.expr)
        rabbitmq = {name for name in names if name.startswith(RABBITMQ_PREFIX)}
        assert names - known - rabbitmq == set(), f"{rule.name} reads metrics nobody exports"
        if rules == RABBITMQ_RULES:
            assert rabbitmq, f"{rule.name} needs no RabbitMQ exporter: its place is alerts.yml"
        else:
            assert not rabbitmq, f"{rule.name} needs RabbitMQ's exporter: its place is {RABBITMQ_RULES.name}"


def test_every_dead_letter_reason_has_exactly_one_alert() -> None:
    covered: Counter[str] = Counter()
    for rule in read_rules(RULES_DIR / "alerts.yml"):
        if rule.kind == "alert" and DEAD_LETTERS_RECORD in metric_names(rule.expr):
            for matched in re.findall(r'reason=~?"([^"]+)"', rule.expr):
                covered.update(matched.split("|"))
    assert set(covered) == set(envelopes.REASONS)
    assert set(covered.values()) == {1}, covered


def test_metric_names_reads_what_an_expression_reads() -> None:
    """The reader the checks above rely on: metrics found, PromQL's own words and labels not."""
    expr = ('histogram_quantile(0.9, sum by (le, account) (rate(a_bucket{job=~"x|y", le!="+Inf"}[5m] offset 1h)))'
            ' / on (account) group_left(reason) max without (instance) (b) > bool 1e3'
            ' unless label_replace(c{name="d"}, "e", "$1", "f", "(.*)") and SUM BY (g) (h) or topk(3, i[1h:5m])')
    assert metric_names(expr) == {"a_bucket", "b", "c", "h", "i"}
    assert metric_names('netcore_activity_nonexistent_total{reason="x"} > 0') == {"netcore_activity_nonexistent_total"}
    with pytest.raises(ValueError):
        metric_names('{__name__="netcore_activity_events_received_total"}')
