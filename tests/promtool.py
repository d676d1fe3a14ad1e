"""Prometheus' own tools for the tests: ``promtool`` (rule checks, rule unit tests) and the server.

Debian's ``prometheus`` package installs both (``.ci/run`` installs it). A test that needs one
fails in CI (``CI`` set) when it is missing and is skipped elsewhere, saying why and how to get it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

#: How long one promtool command may take (a rule unit test evaluates a day of minutes in ~1 s).
PROMTOOL_TIMEOUT = 120.0


def require(tool: str) -> str:
    """The path of ``tool`` (``promtool`` or ``prometheus``); fail in CI, skip elsewhere, without it."""
    found = shutil.which(tool)
    if found is None:
        message = f"{tool} is not installed (Debian's prometheus package has it: apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``promtool args...``; return what it did (its exit code is the caller's to judge)."""
    return subprocess.run([require("promtool"), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT)


def check_rules(path: Path) -> int:
    """``promtool check rules path``: the number of rules it found; fails the test with promtool's
    output when the file does not load (YAML, PromQL, templates)."""
    done = promtool("check", "rules", path)
    assert done.returncode == 0, f"promtool check rules {path.name}:\n{done.stdout}{done.stderr}"
    found = [line for line in done.stdout.splitlines() if "SUCCESS:" in line and "rules found" in line]
    assert len(found) == 1, done.stdout
    return int(found[0].split("SUCCESS:")[1].split()[0])
