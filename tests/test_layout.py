"""The layout's rules, read from the code's own imports (every ``import`` of every module).

- ``worker.ingest`` (the consumer, on the event loop) and ``worker.upload`` (the uploads, on the
  threads) never import each other: they meet in RabbitMQ (and the runtime wires them);
- ``worker.deadletter`` needs only ``worker.broker`` and ``worker.events`` (and the core:
  ``worker.errors``, ``worker.clock``, ``config``), so the dead-letter command stays light;
- ``worker.ops`` (metrics, Sentry, logs...) is reached through hooks: the data path
  (``events``, ``broker``, ``ingest``, ``upload``, ``deadletter``) never imports it;
- ``worker.sandbox`` imports nothing of the worker: it checks the API's rules with its own code;
- ``worker.events`` and ``worker.broker`` stand on the core alone.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

#: The core every package may use.
CORE = {"worker.errors", "worker.clock", "config"}

#: package -> the worker packages (besides itself and the core) it may import.
ALLOWED: dict[str, set[str]] = {
    "worker.events": set(),
    "worker.broker": {"worker.events"},
    "worker.deadletter": {"worker.broker", "worker.events"},
    "worker.ingest": {"worker.broker", "worker.events", "worker.deadletter"},
    "worker.upload": {"worker.broker", "worker.events", "worker.deadletter"},
    "worker.sandbox": set(),
}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def package_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "worker" and len(parts) > 1 else parts[0]


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_its_rule_allows(package: str) -> None:
    wrong = []
    for path in modules(package):
        for name in imports_of(path):
            if not name.startswith(("worker", "config")) or name in ("worker",):
                continue
            target = package_of(name)
            if target == package or name in CORE or target in CORE or target in ALLOWED[package]:
                continue
            if package == "worker.sandbox" and target != package:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            elif target != package:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_data_path_never_imports_ops() -> None:
    data_path = ["worker.events", "worker.broker", "worker.ingest", "worker.upload", "worker.deadletter"]
    wrong = [f"{path.relative_to(ROOT)} imports {name}" for package in data_path for path in modules(package)
             for name in imports_of(path) if name == "worker.ops" or name.startswith("worker.ops.")]
    assert not wrong, "\n".join(wrong)


#: The most modules ``worker/`` keeps at its top (the rest lives in its packages).
MAX_TOP_LEVEL_MODULES = 8


def test_the_worker_package_keeps_at_most_eight_top_level_modules() -> None:
    top = sorted(path.name for path in (ROOT / "worker").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def module_graph() -> dict[str, set[str]]:
    """Every module of ``worker`` and ``config`` -> the modules of theirs it imports."""
    paths = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for package in ("worker", "config") for p in modules(package)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for imported in imports_of(path):
            while imported and imported not in paths:  # "worker.ops.metrics.Metrics" -> its module
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles_of(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (each found once, from the module where the search met it)."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(graph.get(name, ())):
            if target in path:
                found.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    return found


def test_no_module_imports_itself_through_others() -> None:
    circles = cycles_of(module_graph())
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_check_finds_a_circle() -> None:
    assert cycles_of({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_rules_can_catch_a_wrong_import(tmp_path: Path) -> None:
    """The checker sees a forbidden import (so the rules above are not vacuous)."""
    path = ROOT / "worker" / "ingest" / "pipeline.py"
    assert "worker.upload.delivery" not in imports_of(path)
    probe = ROOT / "worker" / "ingest" / "_layout_probe.py"
    probe.write_text("from ..upload import delivery\nimport worker.ops.metrics\n")
    try:
        found = imports_of(probe)
    finally:
        probe.unlink()
    assert {"worker.upload.delivery", "worker.ops.metrics"} <= found


def test_the_dead_letter_command_loads_no_celery_marshmallow_requests_or_prometheus() -> None:
    code = ("import sys, worker.dlq; heavy = ('celery', 'marshmallow', 'requests', 'prometheus_client');"
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
