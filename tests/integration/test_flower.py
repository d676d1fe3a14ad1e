"""Flower, for real: a real worker, Flower started the way the Procfile starts it, its HTTP API.

What is checked is what an operator relies on: Flower never answers without the password, it
sees the worker, and an ``activities.upload`` task shows a summary of its batch, never the
events (identities, emails) themselves.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import pytest
import requests

from tests.harness import BROKER_URL, ROOT, QueueSet, WorkerProcess, event, publish_events
from worker.sandbox import Sandbox

#: Credentials the test's Flower is started with.
USER = "ops"
PASSWORD = f"pw-{uuid.uuid4().hex}"

#: How long a test waits for the worker, Flower or the sandbox.
DEADLINE = 60.0

#: Between two questions to Flower's HTTP API (see :func:`poll`).
POLL_INTERVAL = 0.2

T = TypeVar("T")


class FlowerProcess:
    """``python -m worker.flower`` (the Procfile's command) on a free port.

    A reader thread collects its output and wakes up :meth:`wait_for_log`: Flower says where it
    listens ("Visit me at ..."), which is how the test learns the port it was given.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.flower", "--port=0", "--address=127.0.0.1"],
            cwd=ROOT, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._output = bytearray()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self._output += line
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def log(self) -> str:
        with self._changed:
            return self._output.decode(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """Block until ``pattern`` matches the output, the process ends, or the deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = re.search(pattern, self._output.decode(errors="replace"))
                if found or not self._reader.is_alive():
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def stop(self) -> None:
        """SIGTERM (Flower exits cleanly on it), then SIGKILL to the group if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)
        self._reader.join(10)


def flower_env(queues: QueueSet, **extra: str) -> dict[str, str]:
    """This test's environment, without any FLOWER_* setting of the machine running it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    return {**base, "CELERY_BROKER_URL": BROKER_URL, **queues.env, **extra}


def poll(fetch: Callable[[], T | None], timeout: float) -> T | None:
    """Ask ``fetch`` until it returns something, or the deadline passes.

    Flower 2 offers its HTTP clients nothing to wait on (no long-poll, no websocket), so this
    asks again every :data:`POLL_INTERVAL`; the pause is ``threading.Event().wait``, bounded by
    the deadline, since there is no event to be woken by.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        result = fetch()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            return None
        pause.wait(POLL_INTERVAL)


def worker_name(worker: WorkerProcess) -> str:
    """The worker's node name, from the line it logs when ready (``name@host ready.``)."""
    found = re.search(r"(\S+@\S+) ready\.", worker.log())
    assert found, worker.log()[-3000:]
    return found.group(1)


@pytest.fixture
def flower(queues: QueueSet) -> Iterator[tuple[FlowerProcess, str]]:
    """A running Flower with the test's credentials, and its base URL."""
    process = FlowerProcess(flower_env(queues, FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}"))
    try:
        found = process.wait_for_log(r"Visit me at (http://127\.0\.0\.1:\d+)", DEADLINE)
        assert found, f"Flower did not start; its output:\n{process.log()[-5000:]}"
        yield process, found.group(1)
    finally:
        process.stop()


def test_flower_refuses_to_start_without_credentials(queues: QueueSet) -> None:
    for auth in (None, "", "admin", "admin:", ":secret"):
        extra = {} if auth is None else {"FLOWER_BASIC_AUTH": auth}
        result = subprocess.run(
            [sys.executable, "-m", "worker.flower", "--port=0", "--address=127.0.0.1"],
            cwd=ROOT, env=flower_env(queues, **extra), capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2, (auth, result.stdout, result.stderr)
        assert "refusing to start Flower" in result.stderr
        assert "FLOWER_BASIC_AUTH" in result.stderr
        assert "Visit me" not in result.stdout + result.stderr


def test_flower_shows_the_worker_and_batch_summaries_behind_a_password(
    start_worker: Callable[..., WorkerProcess],
    flower: tuple[FlowerProcess, str],
    queues: QueueSet,
    sandbox: Sandbox,
) -> None:
    process, url = flower
    worker = start_worker()
    name = worker_name(worker)
    auth = (USER, PASSWORD)

    # No password, a wrong one: refused, on the API and the pages.
    for path in ("/api/workers", "/api/tasks", "/"):
        assert requests.get(url + path, timeout=10).status_code == 401
    assert requests.get(url + "/api/workers", auth=(USER, "wrong"), timeout=10).status_code == 401

    # Flower learns of workers from their events: once it has this one's heartbeat, its event
    # consumer is in place and will see the tasks published next.
    def alive() -> bool | None:
        answer = requests.get(url + "/api/workers", params={"status": "1"}, auth=auth, timeout=10)
        answer.raise_for_status()
        return True if answer.json().get(name) else None

    assert poll(alive, DEADLINE), f"Flower never saw {name}; its output:\n{process.log()[-3000:]}"

    asset_id = f"flower-{uuid.uuid4().hex[:8]}"
    events = [event(f"f-{i}", asset_id, identity=f"customer-{i}@example.com") for i in range(3)]
    publish_events(queues.settings.queue, [events])
    assert sandbox.wait_until(lambda s: s.accepted_count() == 3, timeout=DEADLINE)

    def finished_tasks() -> list[dict[str, Any]] | None:
        answer = requests.get(url + "/api/tasks", params={"taskname": "activities.upload"}, auth=auth, timeout=10)
        answer.raise_for_status()
        ours = [task for task in answer.json().values() if asset_id in (task.get("args") or "")]
        return ours if ours and all(task.get("state") == "SUCCESS" for task in ours) else None

    tasks = poll(finished_tasks, DEADLINE)
    assert tasks, f"Flower never showed the upload task; its output:\n{process.log()[-3000:]}"
    assert len(tasks) == 1, tasks
    task = tasks[0]
    assert task["name"] == "activities.upload"
    assert task["worker"] == name
    assert task["args"] == f"asset_id={asset_id!r}, 3 events"
    assert task["kwargs"] == "{}"
    shown = repr(task)
    for private in ("customer-", "@example.com", "identity", "activity_params", "Purchase", "f-0"):
        assert private not in shown, f"{private!r} shown by Flower: {shown}"

    # The worker, through Flower's inspection of it (a broadcast to the worker, answered).
    answer = requests.get(
        url + "/api/workers", params={"refresh": "1", "workername": name}, auth=auth, timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert "activities.upload" in answer.json()[name]["registered"]
