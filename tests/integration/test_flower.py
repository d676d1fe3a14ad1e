"""Flower, for real: a real worker, Flower started the way the Procfile starts it, its HTTP API.

What is checked is what an operator relies on: Flower never answers without the password, it
sees the worker, and an ``activities.upload`` task shows a summary of its batch, never the
events (identities, emails) themselves.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.harness import ROOT, QueueSet, WorkerProcess, event, publish_events
from tests.integration.flower_support import (
    DEADLINE,
    PASSWORD,
    USER,
    FlowerProcess,
    flower_env,
    poll,
    running_flower,
    worker_name,
)
from worker.sandbox import Sandbox


@pytest.fixture
def flower(queues: QueueSet) -> Iterator[tuple[FlowerProcess, str]]:
    """A running Flower with the test's credentials, and its base URL."""
    with running_flower(queues) as running:
        yield running


def test_flower_refuses_to_start_without_credentials(queues: QueueSet) -> None:
    for auth in (None, "", "admin", "admin:", ":secret"):
        extra = {} if auth is None else {"FLOWER_BASIC_AUTH": auth}
        result = subprocess.run(
            [sys.executable, "-m", "worker.ops.flower", "--port=0", "--address=127.0.0.1"],
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
    events = [event(f"ev-{i}", asset_id, identity=f"customer-{i}@example.com") for i in range(3)]
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
    assert task["args"] == f"account='default', asset_id={asset_id!r}, 3 events"
    assert task["kwargs"] == "{}"
    shown = repr(task)
    for private in ("customer-", "@example.com", "identity", "activity_params", "Purchase", "ev-0"):
        assert private not in shown, f"{private!r} shown by Flower: {shown}"

    # The worker, through Flower's inspection of it (a broadcast to the worker, answered).
    answer = requests.get(
        url + "/api/workers", params={"refresh": "1", "workername": name}, auth=auth, timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert "activities.upload" in answer.json()[name]["registered"]
