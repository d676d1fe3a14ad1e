"""``netcore-activity``, the console command (``worker/ops/cli.py``) as ``make install`` installs it
in ``.venv``: its version, its usage, each subcommand under its own name, what ``worker`` hands
Celery, and what the dead-letter command loads.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import pytest

import worker
from tests.harness import ROOT
from worker.ops import cli

#: The command ``make install`` puts beside this interpreter.
COMMAND = Path(sys.executable).parent / "netcore-activity"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert COMMAND.exists(), f"{COMMAND} is missing: run make install"
    return subprocess.run([str(COMMAND), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_version_is_the_package_s_and_the_changelog_s_latest_release() -> None:
    done = run("--version")
    assert (done.returncode, done.stdout) == (0, f"netcore-activity {worker.__version__}\n"), done.stderr
    assert importlib.metadata.version("netcore-activity-worker") == worker.__version__  # pyproject reads it there
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(),
                          re.MULTILINE)
    assert releases and releases[0] == worker.__version__, releases


def test_the_usage_lists_every_subcommand_and_an_unknown_one_is_refused() -> None:
    done = run()
    assert done.returncode == 2
    for name in ("worker", "check", "dlq", "health", "flower", "sandbox"):
        assert re.search(rf"^  {name} +\S", done.stderr, re.MULTILINE), done.stderr
    refused = run("frobnicate")
    assert refused.returncode == 2 and "unknown command 'frobnicate'" in refused.stderr
    assert run("--help").returncode == 0


@pytest.mark.parametrize("name", ["check", "dlq", "health", "sandbox"])
def test_each_subcommand_has_its_help_under_its_own_name(name: str) -> None:
    done = run(name, "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: netcore-activity {name} "), done.stdout


def test_worker_is_celery_s_worker_with_this_app() -> None:
    done = run("worker", "--help")
    assert done.returncode == 0 and "--hostname" in done.stdout and "--concurrency" in done.stdout, done.stderr


class Exec(Exception):
    """What ``os.execve`` was asked to run (the test stops there)."""

    def __init__(self, path: str, argv: list[str], env: Mapping[str, str]) -> None:
        super().__init__(path)
        self.argv, self.env = argv, env


def catch_exec(path: str, argv: list[str], env: Mapping[str, str]) -> NoReturn:
    raise Exec(path, argv, env)


def test_worker_hands_celery_the_operator_s_options_after_its_defaults(monkeypatch: Any) -> None:
    monkeypatch.setattr(os, "execve", catch_exec)
    with pytest.raises(Exec) as ran:
        cli.main(["worker", "--hostname=activities-2@%h", "--metrics-port", "9809", "-c", "1"])
    argv = ran.value.argv
    assert argv[:6] == [sys.executable, "-m", "celery", "-A", "worker.app", "worker"]
    # Celery takes an option's last value: the operator's --hostname wins over the default
    assert argv[6:] == ["--loglevel=INFO", "--hostname=activities@%h", "--hostname=activities-2@%h", "-c", "1"]
    assert ran.value.env["METRICS_PORT"] == "9809"

    with pytest.raises(Exec) as ran:
        cli.main(["worker", "--metrics-port=0"])
    assert ran.value.env["METRICS_PORT"] == "0" and "--metrics-port=0" not in ran.value.argv


def test_worker_refuses_a_metrics_port_that_is_not_one(capsys: Any) -> None:
    assert cli.main(["worker", "--metrics-port", "98o8"]) == 2
    assert "--metrics-port '98o8': must be a port number" in capsys.readouterr().err


def test_the_dead_letter_command_loads_no_celery() -> None:
    """``netcore-activity dlq`` stays as light as ``python -m worker.dlq``: each subcommand's module
    is imported only when it runs."""
    code = ("import sys\nfrom worker.ops import cli\ntry:\n    cli.main(['dlq', 'count', '--help'])\n"
            "except SystemExit:\n    pass\nheavy = ('celery', 'marshmallow', 'requests', 'prometheus_client')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
