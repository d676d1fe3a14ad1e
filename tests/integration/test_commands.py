"""``netcore-activity`` against the machine's RabbitMQ (a vhost of the test's own) and the sandbox:
``check`` says what a worker would do and fails with one line when it could not start; ``worker``
runs a real worker with the operator's options, and ``health`` asks it.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import amqp
import pytest

from config.settings import redact_url
from tests.harness import ROOT, TEST_BROKER_PASSWORD, QueueSet, event, free_port, publish_events
from tests.integration.command_support import COMMAND, CommandWorker, command_env, deliver_one
from tests.integration.conftest import API_KEY, assert_no_secrets
from worker.sandbox import Sandbox

pytestmark = pytest.mark.timeout(180)

#: Seconds ``check`` may take against a broker nobody answers (its timeout is 3 s per node).
UNREACHABLE_DEADLINE = 15.0


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert COMMAND.exists(), f"{COMMAND} is missing: run make install"
    return subprocess.run([str(COMMAND), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def dead_url() -> str:
    """A broker URL on a port nobody listens on."""
    return f"amqp://guest:guest@127.0.0.1:{free_port()}//"


def test_check_says_what_the_worker_would_do_and_changes_nothing(queues: QueueSet, sandbox: Sandbox) -> None:
    publish_events(queues.settings.queue, [event(f"waiting-{n}") for n in range(3)])

    done = run("check", env=command_env(queues, sandbox, API_KEY))

    assert done.returncode == 0, done.stdout + done.stderr
    out, env = done.stdout, queues.env
    assert f"broker: {redact_url(queues.broker_url)} answered: RabbitMQ 3." in out
    assert f"would consume {env['ACTIVITY_QUEUE']} (producers' events, up to 30000 unacknowledged): 3 ready, " \
           "0 consumer(s)" in out
    assert f"would consume {env['ACTIVITY_UPLOAD_QUEUE']} (account default's upload tasks, up to 64 at once): " \
           "not there yet" in out
    assert f"would dead-letter to {env['ACTIVITY_DEAD_LETTER_QUEUE']}: 0 ready, 0 consumer(s)" in out
    assert f"accounts: default: would POST to {sandbox.url}/v1/activity/upload (127.0.0.1), key set and never " \
           "shown, for every asset_id of no other account" in out
    assert out.rstrip().endswith("ok: the worker would start with these settings (netcore-activity worker)")
    assert API_KEY not in out + done.stderr and TEST_BROKER_PASSWORD not in out + done.stderr
    with pytest.raises(amqp.exceptions.NotFound):  # only looked at: the worker declares its queues
        queues.depth(env["ACTIVITY_UPLOAD_QUEUE"])


def test_check_fails_over_to_the_next_broker_of_the_list(queues: QueueSet, sandbox: Sandbox) -> None:
    first = dead_url()
    env = command_env(queues, sandbox, API_KEY, CELERY_BROKER_URL=f"{first};{queues.broker_url}")

    done = run("check", env=env)

    assert done.returncode == 0, done.stderr
    assert re.search(rf"^broker: {re.escape(redact_url(queues.broker_url))} answered: RabbitMQ \S+ \(tried first: "
                     rf"{re.escape(redact_url(first))}: \[Errno 111\] Connection refused\)$", done.stdout,
                     re.MULTILINE), done.stdout


def test_check_fails_with_one_line_when_no_broker_answers(queues: QueueSet, sandbox: Sandbox) -> None:
    url = dead_url()
    began = time.monotonic()

    done = run("check", env=command_env(queues, sandbox, API_KEY, CELERY_BROKER_URL=url))

    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"check failed: broker: cannot reach the broker: {redact_url(url)}: "
                                        "[Errno 111] Connection refused"], done.stderr
    assert time.monotonic() - began < UNREACHABLE_DEADLINE


def test_check_says_the_broker_refused_a_wrong_password(queues: QueueSet, sandbox: Sandbox) -> None:
    wrong = queues.broker_url.replace(f":{TEST_BROKER_PASSWORD}@", ":not-the-password@")
    done = run("check", env=command_env(queues, sandbox, API_KEY, CELERY_BROKER_URL=wrong))
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1 and "the broker refused" in done.stderr
    assert "ACCESS_REFUSED" in done.stderr and "not-the-password" not in done.stderr


def test_check_lists_the_accounts_of_the_accounts_file(queues: QueueSet, sandbox: Sandbox, tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.toml"
    accounts.write_text('[accounts.brand-b]\napi_key_env = "B_KEY"\nregion = "eu"\nasset_ids = ["b-1", "b-2"]\n')
    env = command_env(queues, sandbox, API_KEY, NETCORE_ACCOUNTS_FILE=str(accounts), B_KEY="secret-b-key")

    done = run("check", env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "accounts: brand-b: would POST to https://apieu2.netcoresmartech.com/v1/activity/upload (region eu), " \
           "key set and never shown, for 2 asset_id(s)" in done.stdout
    assert f"would consume {queues.env['ACTIVITY_UPLOAD_QUEUE']}.brand-b (account brand-b's upload tasks" in done.stdout
    assert "secret-b-key" not in done.stdout + done.stderr


@pytest.mark.parametrize(("setting", "line"), [
    ({"ACTIVITY_BATCH_SIZE": "5000"}, "check failed: configuration error: ACTIVITY_BATCH_SIZE=5000: must be 1..1000"),
    ({"NETCORE_API_KEY": ""}, "check failed: configuration error: NETCORE_API_KEY is not set"),
    ({"NETCORE_ACCOUNTS_FILE": "/nonexistent/accounts.toml"},
     "check failed: configuration error: NETCORE_ACCOUNTS_FILE=/nonexistent/accounts.toml: cannot read it"),
])
def test_check_fails_with_one_line_for_a_bad_setting(queues: QueueSet, sandbox: Sandbox, setting: dict[str, str],
                                                     line: str) -> None:
    done = run("check", env=command_env(queues, sandbox, API_KEY, CELERY_BROKER_URL=dead_url(), **setting))
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(line), done.stderr


def test_worker_runs_with_the_operator_s_options_and_health_finds_it(queues: QueueSet, sandbox: Sandbox,
                                                                    tmp_path: Path) -> None:
    name = f"cmd-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = command_env(queues, sandbox, API_KEY)
    worker = CommandWorker(COMMAND, [f"--hostname={name}@%h", f"--metrics-port={port}"], env, ROOT)
    try:
        assert worker.wait_until_ready(), worker.output.text()[-3000:]
        assert re.search(rf"\] {name}@\S+ ready\.", worker.output.text()), worker.output.text()[-3000:]
        deliver_one(queues, sandbox)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert b"netcore_activity_events_received_total" in answer.read()

        health = run("health", f"--hostname={name}@%h", env=env)
        assert health.returncode == 0 and health.stdout.startswith(f"ok: worker {name}@"), health.stderr

        assert worker.terminate() == 0
    finally:
        worker.kill()
    assert_no_secrets(worker.output.text(), API_KEY)
