"""``python -m worker.ops.health`` against a real worker: healthy while it consumes, not once it is killed.

The probe runs as a process of its own, as an orchestrator runs it, with the worker's settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest
from kombu import Connection

from tests.harness import (
    ROOT,
    TEST_BROKER_PASSWORD,
    QueueSet,
    WorkerProcess,
    event,
    publish_events,
    publish_raw,
)
from worker.ops import health

pytestmark = pytest.mark.timeout(180)


def name_of(worker: WorkerProcess) -> str:
    """The worker's node name, as its ``--hostname`` option expands."""
    assert worker.process is not None
    args = [str(arg) for arg in worker.process.args]  # type: ignore[union-attr]
    option = next(arg for arg in args if arg.startswith("--hostname="))
    return health.worker_name(option.split("=", 1)[1])


def probe(worker: WorkerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the health check with the worker's own environment (its queues, its broker)."""
    return subprocess.run([sys.executable, "-m", "worker.ops.health", *args], cwd=ROOT, env=worker.env,
                          capture_output=True, text=True, timeout=60)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert output.count("\n") == 1 and output.endswith("\n"), output
    assert TEST_BROKER_PASSWORD not in output
    return output.strip()


def test_healthy_while_consuming_and_not_once_killed(start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker(LOG_FORMAT="json")
    name = name_of(worker)

    healthy = probe(worker, "--hostname", name, "--timeout", "10", "--max-depth", "1000")
    stranger = probe(worker, "--hostname", f"nobody@{name.split('@', 1)[1]}", "--timeout", "1")
    worker.kill()
    killed = probe(worker, "--hostname", name, "--timeout", "2")

    assert healthy.returncode == 0, healthy.stderr
    assert one_line(healthy).startswith(f"ok: worker {name} answered; queue ")
    assert "has 1 consumer(s)" in healthy.stdout
    assert stranger.returncode == 1
    assert one_line(stranger).startswith(f"unhealthy: worker nobody@{name.split('@', 1)[1]} did not answer")
    assert killed.returncode == 1
    why = one_line(killed)
    assert "has no consumer" in why or f"worker {name} did not answer" in why, why


def test_json_logs_from_the_real_worker(start_worker: Callable[..., WorkerProcess], queues: QueueSet) -> None:
    worker = start_worker(LOG_FORMAT="json")
    publish_events(queues.settings.queue, [event("e-1")])
    publish_raw(queues.settings.queue, [b"{oops"])
    assert worker.wait_for_log("batch asset_id=asset-1", 30), worker.log()[-3000:]
    assert worker.wait_for_log("Dead-lettering an unreadable message", 30), worker.log()[-3000:]
    worker.kill()

    entries = [json.loads(text) for text in worker.log().splitlines() if text.startswith("{")]
    assert entries, worker.log()[-3000:]
    for entry in entries:
        assert {"ts", "level", "logger", "process", "message"} <= set(entry) and entry["ts"].endswith("Z")
    assert any(entry["message"].endswith(" ready.") for entry in entries)
    [unreadable] = [entry for entry in entries if entry["message"].startswith("Dead-lettering an unreadable")]
    assert (unreadable["level"], unreadable["logger"]) == ("WARNING", "worker.ingest.pipeline")
    [batch] = [entry for entry in entries if entry["message"].startswith("batch asset_id=asset-1")]
    assert batch["thread"] != "MainThread" and batch["task_name"] == "activities.upload"  # on the pool
    assert "customer-42" not in worker.log()


def test_max_depth_and_a_missing_worker(queues: QueueSet) -> None:
    settings = queues.settings
    publish_events(settings.queue, [event(f"e-{n}") for n in range(3)])
    with Connection(queues.broker_url, heartbeat=0) as connection:
        channel = connection.channel()
        channel.basic_qos(0, 1, False)  # one message in hand, two ready
        channel.basic_consume(settings.queue, callback=lambda message: None)
        connection.drain_events(timeout=10)

        deep = health.check(settings, hostname="nobody@nowhere", timeout=1, max_depth=1)
        absent = health.check(settings, hostname="nobody@nowhere", timeout=1, max_depth=2)

    assert not deep.ok
    assert str(deep) == f"unhealthy: queue {settings.queue!r} holds 2 ready messages, over --max-depth 1"
    assert not absent.ok and str(absent).startswith("unhealthy: worker nobody@nowhere did not answer within 1 s")
    unconsumed = health.check(settings, hostname="nobody@nowhere", timeout=1)
    assert str(unconsumed).startswith("unhealthy: worker nobody@nowhere did not answer within 1 s (queue ")
    assert "has no consumer" in str(unconsumed)


def test_no_queue_no_broker_and_bad_settings(queues: QueueSet, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for variable, value in queues.env.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("ACTIVITY_QUEUE", f"{queues.prefix}.never-declared")
    assert health.main(["--timeout", "1"]) == 1
    assert "there is no queue" in capsys.readouterr().err
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://someone:hunter2@127.0.0.1:1//")
    assert health.main(["--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("unhealthy: cannot reach the broker at amqp://someone:***@127.0.0.1:1//")
    assert "hunter2" not in err
    monkeypatch.setenv("LOG_FORMAT", "xml")
    assert health.main([]) == 2
    assert "LOG_FORMAT=xml" in capsys.readouterr().err
    assert health.worker_name("activities@%h").startswith("activities@") and "%" not in health.worker_name("w@%h")


def test_healthy_while_an_account_waits_out_an_outage_naming_it(start_worker: Callable[..., WorkerProcess],
                                                               queues: QueueSet, sandbox) -> None:
    """An account's uploads paused while its API is down: news for the operator, named in the line,
    but no reason to kill the worker (its events wait in RabbitMQ; the consumer goes on)."""
    sandbox.add_fault(status=503)
    worker = start_worker(UPLOAD_PROBE_INTERVAL_MAX="60", UPLOAD_RETRY_BACKOFF="30", UPLOAD_RETRY_BACKOFF_MAX="60")
    publish_events(queues.settings.queue, [[event(f"e{i}", asset_id=f"asset-{i % 3}") for i in range(30)]])
    publish_events(queues.settings.queue, [[event(f"f{i}", asset_id=f"asset-{i % 3}") for i in range(30)]])
    assert worker.wait_for_log("its API looks down", timeout=60), worker.log()[-3000:]
    name = name_of(worker)
    paused = probe(worker, "--hostname", name, "--timeout", "3")
    assert paused.returncode == 0, paused.stderr
    line = one_line(paused)
    assert "has 1 consumer(s)" in line and "account 'default' circuit open: its API is down" in line
    worker.kill()
    dead = probe(worker, "--hostname", name, "--timeout", "1")
    assert dead.returncode == 1 and "did not answer" in one_line(dead)
