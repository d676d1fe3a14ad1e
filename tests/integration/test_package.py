"""``pip install .`` in a fresh virtualenv gives a working ``netcore-activity``, away from the checkout.

The source tree is copied to a temporary directory (a build writes there) and installed with the
lock's versions (``-c requirements.txt``), pip fetching what it needs from the package index (the
build backend included). Every command then runs from another directory, without the checkout
on its path: what works, works from the installed package alone, ``config`` and all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import worker
from tests.harness import ROOT, QueueSet
from tests.integration.command_support import CommandWorker, command_env, deliver_one
from tests.integration.conftest import API_KEY
from worker.sandbox import Sandbox

pytestmark = pytest.mark.timeout(900)

#: Seconds the install may take (about 20 with pip's cache warm; downloads make it longer).
INSTALL_TIMEOUT = 600

#: What the copy of the source tree leaves out: virtualenvs, caches, builds, the broker's data.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv*", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                                    ".rabbitmq", "bench-results", "build", "*.egg-info")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the project installed from a copy of its source tree; its bin/."""
    base = tmp_path_factory.mktemp("package")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-c", str(ROOT / "requirements.txt"),
                           str(source)], cwd=base, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv / "bin"


def test_the_command_says_its_version(installed: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(installed / "netcore-activity"), "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"netcore-activity {worker.__version__}\n"), done.stderr


def test_the_installed_package_checks_runs_a_worker_and_reads_dead_letters(
        installed: Path, queues: QueueSet, sandbox: Sandbox, tmp_path: Path) -> None:
    env = command_env(queues, sandbox, API_KEY)
    where = subprocess.run([str(installed / "python"), "-c", "import worker, config; print(worker.__file__, "
                            "config.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0 and str(ROOT) not in where.stdout, where.stdout + where.stderr

    check = subprocess.run([str(installed / "netcore-activity"), "check"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr

    running = CommandWorker(installed / "netcore-activity", ["--hostname=package-test@%h"], env, tmp_path)
    try:
        assert running.wait_until_ready(), running.output.text()[-3000:]
        deliver_one(queues, sandbox)
        assert running.terminate() == 0
    finally:
        running.kill()

    # the contract's name for the dead-letter command
    dlq = subprocess.run([str(installed / "python"), "-m", "worker.dlq", "count", "--json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert dlq.returncode == 0 and json.loads(dlq.stdout)["total"] == 0, dlq.stdout + dlq.stderr
