"""A bad setting stops the real worker process at start-up, naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kombu import Connection, Queue

from tests.harness import ROOT, QueueSet


def run_worker(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NETCORE_", "ACTIVITY_", "UPLOAD_"))}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--loglevel=INFO"],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACTIVITY_BATCH_SIZE": "5000"}, "ACTIVITY_BATCH_SIZE=5000: must be 1..1000"),
        ({"ACTIVITY_BATCH_WAIT": "soon"}, "ACTIVITY_BATCH_WAIT=soon: must be a number"),
        ({"UPLOAD_MAX_RETRIES": "-1"}, "UPLOAD_MAX_RETRIES=-1: must be 0..100"),
        ({"NETCORE_REGION": "mars"}, "NETCORE_REGION=mars: must be one of us, in, eu"),
        ({"NETCORE_API_URL": "ftp://x"}, "NETCORE_API_URL=ftp://x: must be an http"),
        ({"NETCORE_API_KEY": ""}, "NETCORE_API_KEY is not set"),
    ],
    ids=["batch-size", "batch-wait", "retries", "region", "api-url", "no-key"],
)
def test_bad_setting_stops_the_worker(env: dict[str, str], message: str) -> None:
    result = run_worker(**{"NETCORE_API_KEY": "k-123", **env})
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"configuration error: {message}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.quorum
def test_a_classic_task_queue_in_a_cluster_stops_the_worker_saying_who_declared_it(
    queues: QueueSet, worker_env: dict[str, str]
) -> None:
    # a Celery producer configured with nothing but the broker URL declared Celery's queue first
    with Connection(queues.settings.broker_url) as connection:
        Queue(queues.settings.task_queue, durable=True)(connection.default_channel).declare()
    result = run_worker(**worker_env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"queue {queues.settings.task_queue!r} already exists with other arguments" in result.stderr
    assert 'task_default_queue_type="quorum"' in result.stderr
    assert "Traceback" not in result.stderr
