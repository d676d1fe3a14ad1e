"""The project's Prometheus rule files (``deploy/prometheus/``) and their unit tests
(``tests/prometheus/``), read as text: each rule's name, expression and ``for:``, and copies
with other ``for:`` durations.

Read as text because the tests have no YAML library; the reading is checked against Prometheus'
own: :func:`read_rules` must find as many rules as ``promtool check rules`` does, and every
expression it finds must parse (tests/test_alert_rules.py). It expects the layout of these files:
``- alert: Name`` / ``- record: name`` lines starting each rule, ``expr:`` on one line or as a
``|`` block, and ``for:`` on a line of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.harness import ROOT

#: The rule files, and the unit-test file of each.
RULES_DIR = ROOT / "deploy" / "prometheus"
TESTS_DIR = ROOT / "tests" / "prometheus"
UNIT_TESTS = {RULES_DIR / "alerts.yml": TESTS_DIR / "alerts.test.yml",
              RULES_DIR / "rabbitmq-alerts.yml": TESTS_DIR / "rabbitmq-alerts.test.yml"}

_RULE = re.compile(r"^(?P<indent>\s*)- (?P<kind>alert|record): (?P<name>\S+)\s*$")
_EXPR = re.compile(r"^(?P<indent>\s*)expr: (?P<inline>.*)$")
_FOR = re.compile(r"^\s*for: (?P<duration>\d+[mh])\s*$")


@dataclass
class Rule:
    kind: str  #: "alert" or "record"
    name: str
    line: int  #: index of its ``- alert:`` / ``- record:`` line
    expr: str = ""
    for_line: int | None = None  #: index of its ``for:`` line, if it has one
    for_minutes: int = 0


def read_rules(path: Path) -> list[Rule]:
    """The rules of a rule file, in order."""
    lines = path.read_text().splitlines()
    rules: list[Rule] = []
    for index, line in enumerate(lines):
        if match := _RULE.match(line):
            rules.append(Rule(match["kind"], match["name"], index))
        elif rules and (match := _EXPR.match(line)):
            rules[-1].expr = _expression(lines, index, match)
        elif rules and (match := _FOR.match(line)):
            rules[-1].for_line, rules[-1].for_minutes = index, minutes(match["duration"])
    return rules


def _expression(lines: list[str], index: int, match: re.Match[str]) -> str:
    if match["inline"].strip() not in ("|", "|-", ">", ">-"):
        return match["inline"].strip()
    block = []
    for line in lines[index + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= len(match["indent"]):
            break
        block.append(line.strip())
    return "\n".join(block).strip()


def minutes(duration: str) -> int:
    """``15m`` -> 15, ``24h`` -> 1440 (the units these files use)."""
    return int(duration[:-1]) * (60 if duration.endswith("h") else 1)


def with_for(path: Path, durations: dict[str, str]) -> str:
    """The text of the rule file with the ``for:`` of each named alert set to its new duration
    (added to an alert that had none)."""
    lines = path.read_text().splitlines()
    by_name = {rule.name: rule for rule in read_rules(path)}
    for name, duration in sorted(durations.items(), key=lambda item: -by_name[item[0]].line):
        rule = by_name[name]
        if rule.for_line is not None:
            indent = lines[rule.for_line][: len(lines[rule.for_line]) - len(lines[rule.for_line].lstrip())]
            lines[rule.for_line] = f"{indent}for: {duration}"
        else:
            start = lines[rule.line]
            indent = " " * (len(start) - len(start.lstrip()) + 2)
            lines.insert(rule.line + 1, f"{indent}for: {duration}")
    return "\n".join(lines) + "\n"


def unit_test_pointing_at(test_file: Path, rules: Path, *, about: str | None = None) -> str:
    """The text of a unit-test file whose ``rule_files`` names ``rules`` instead of its own;
    with ``about``, only its test groups (``  - name: ...`` under ``tests:``) with a case of
    that alert."""
    text = test_file.read_text()
    own = re.findall(r"^\s*- (\S*deploy/prometheus/\S+\.yml)\s*$", text, re.MULTILINE)
    assert len(own) == 1, f"{test_file.name} should name exactly one rule file, not {own}"
    text = text.replace(own[0], str(rules))
    if about is None:
        return text
    head, groups = text.split("\ntests:\n")
    kept = [group for group in re.split(r"(?m)^(?=  - name: )", groups) if f"alertname: {about}\n" in group]
    assert kept, f"{test_file.name} has no case of {about}"
    return head + "\ntests:\n" + "".join(kept)
