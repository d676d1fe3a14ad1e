"""The systemd units of ``deploy/systemd/``, as systemd reads them.

``systemd-analyze verify`` loads each unit (a worker instance, its health check and timer,
Flower) as systemd would and prints a warning for anything it would ignore or refuse; a unit
whose command does not exist is an error. The units name the command where a deployment puts it
(``/opt/netcore-activity/bin``), so the test verifies a copy that names this virtualenv's
command instead. ``systemd-analyze security --offline`` rates each service's sandboxing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from config.settings import Settings
from tests.harness import ROOT
from worker.broker.messages import MAX_BATCHES_PER_BUNDLE, Bundle, UploadBatch
from worker.runtime import Runtime

#: The units' directory, and where they expect the command.
UNITS = ROOT / "deploy" / "systemd"
INSTALLED_COMMAND = "/opt/netcore-activity/bin/netcore-activity"

#: The units systemd would load for one worker instance and Flower.
LOADED = ["netcore-activity-worker@9808.service", "netcore-activity-health@9808.service",
          "netcore-activity-health@9808.timer", "netcore-activity-flower.service"]

#: The worst exposure ``systemd-analyze security`` may rate a service (0 best, 10 worst; up to 2
#: "OK"): each rates 1.5 with systemd 252, and 2.0 without DynamicUser, ProtectSystem and PrivateUsers.
MAX_EXPOSURE = 1.5

#: Seconds the warm shutdown needs beyond the uploads running: the hand-off of the open batches.
HAND_OFF_MARGIN = 30.0


def systemd_analyze() -> str:
    """The tool, or fail on CI / skip elsewhere, saying why."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        message = "systemd-analyze is not installed (Debian: apt-get install systemd)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return tool


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    """The units, naming this virtualenv's command (``make install`` makes it)."""
    command = Path(sys.executable).parent / "netcore-activity"
    assert command.exists(), f"{command} is missing: run make install"
    for unit in [*UNITS.glob("*.service"), *UNITS.glob("*.timer")]:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_COMMAND, str(command)))
    return tmp_path


def test_systemd_analyze_verify_finds_nothing_to_say(rendered: Path) -> None:
    done = subprocess.run([systemd_analyze(), "verify", "--man=no", *LOADED], cwd=rendered,
                          capture_output=True, text=True, timeout=120)
    said = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and not said, said


def test_each_service_is_sandboxed(rendered: Path) -> None:
    for unit in [name for name in LOADED if name.endswith(".service")]:
        done = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", unit], cwd=rendered,
                              capture_output=True, text=True, timeout=120)
        rating = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
        assert rating, done.stdout + done.stderr
        assert float(rating.group(1)) <= MAX_EXPOSURE, f"{unit}: {rating.group(0)}"


def test_the_stop_timeout_covers_the_longest_upload_a_warm_shutdown_waits_for() -> None:
    """The worker's own bound on one attempt of a full bundle (a request per batch, each within
    UPLOAD_TIMEOUT and the connect timeout), with the default settings, plus the hand-off."""
    bundle = Bundle([UploadBatch(f"asset-{n}", ["{}"]) for n in range(MAX_BATCHES_PER_BUNDLE)])
    longest_upload = Runtime.attempt_bound(cast(Runtime, SimpleNamespace(settings=Settings())), bundle)
    unit = (UNITS / "netcore-activity-worker@.service").read_text()
    stop_timeout = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    assert stop_timeout and re.search(r"^KillMode=mixed$", unit, re.MULTILINE), "SIGTERM to the worker alone, then wait"
    assert int(stop_timeout.group(1)) >= longest_upload + HAND_OFF_MARGIN, (stop_timeout.group(0), longest_upload)


def test_the_health_check_asks_for_the_worker_instance_it_belongs_to() -> None:
    """The worker's --hostname and the health check's are the same name, and the instance name
    is the worker's metrics port."""
    worker = (UNITS / "netcore-activity-worker@.service").read_text()
    health = (UNITS / "netcore-activity-health@.service").read_text()
    worker_start = re.search(r"^ExecStart=\S+ worker (.*)$", worker, re.MULTILINE)
    health_start = re.search(r"^ExecStart=\S+ health (.*)$", health, re.MULTILINE)
    assert worker_start and health_start
    worker_name = re.search(r"--hostname=(\S+)", worker_start.group(1))
    assert worker_name and "%i" in worker_name.group(1)
    assert f"--hostname={worker_name.group(1)}" in health_start.group(1).split()
    assert "--metrics-port=%i" in worker_start.group(1).split()
