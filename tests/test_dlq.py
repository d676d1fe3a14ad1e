"""The dead-letter command against a real RabbitMQ: counting, listing, replaying, crashing.

Each test gets queues of its own (``test-<uuid>.*``), deleted afterwards. Every event carries
a unique id (``activity_params.event_id``), so each test can keep a ledger: the ids replayed
plus the ids left must be the ids put in. Nothing sleeps: queues are read with ``basic_get``,
and after a crash with ``drain_events`` under a timeout until the broker has put every
unacknowledged dead letter back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import amqp
import pytest
from kombu import Connection

from config.settings import Settings
from worker import deadletter, dlq, jsonutil
from worker.__main__ import main as worker_main
from worker.publisher import Publisher

pytestmark = pytest.mark.timeout(60)

#: The repository root, to run a crashing replay from.
ROOT = Path(__file__).resolve().parents[1]

#: When every dead letter of these tests failed.
FAILED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)

#: Seconds to wait for the broker to return a crashed run's unacknowledged dead letters.
REQUEUE_TIMEOUT = 10.0


def queue_env(prefix: str) -> dict[str, str]:
    """The environment naming this test's own queues (and the broker, if the runner set one)."""
    env = {
        "ACTIVITY_QUEUE": f"{prefix}.activities",
        "ACTIVITY_DEAD_LETTER_QUEUE": f"{prefix}.dead",
        "ACTIVITY_TASK_QUEUE": f"{prefix}.tasks",
        "ACTIVITY_UPLOAD_QUEUE": f"{prefix}.upload",
    }
    if os.environ.get("CELERY_BROKER_URL"):
        env["CELERY_BROKER_URL"] = os.environ["CELERY_BROKER_URL"]
    return env


@pytest.fixture
def env() -> dict[str, str]:
    return queue_env(f"test-{uuid.uuid4().hex}")


@pytest.fixture(scope="module")
def broker() -> None:
    """Checked once: without a broker, fail on CI and skip elsewhere, saying why."""
    settings = Settings.from_env(queue_env("test-probe"), require_api=False)
    try:
        with Connection(settings.broker_url, connect_timeout=3, heartbeat=0) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        why = f"RabbitMQ is not reachable at {settings.broker_url_redacted}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def settings(broker: None, env: dict[str, str]) -> Iterator[Settings]:
    """Settings for fresh, empty, durable queues; they are deleted after the test."""
    settings = Settings.from_env(env, require_api=False)
    connection = Connection(settings.broker_url, connect_timeout=3, heartbeat=0)
    channel = connection.channel()
    for queue in (settings.queue, settings.dead_letter_queue):
        channel.queue_declare(queue, durable=True, auto_delete=False)
    try:
        yield settings
    finally:
        channel = connection.channel()
        for queue in (settings.queue, settings.dead_letter_queue, settings.task_queue, settings.upload_queue):
            channel.queue_delete(queue)
        connection.release()


def event(asset_id: str) -> dict[str, Any]:
    return {
        "activity_name": "Purchase",
        "asset_id": asset_id,
        "timestamp": "2024-05-01T11:59:00Z",
        "identity": "customer-1",
        "activity_source": "web",
        "activity_params": {"event_id": uuid.uuid4().hex, "currency": "INR"},
    }


def dead(reason: str, asset_id: str = "asset-1", replays: int = 0) -> dict[str, Any]:
    """A dead letter of one event with a unique id."""
    return deadletter.envelope(
        reason=reason, error=f"failed: {reason}", failed_at=FAILED_AT, event=event(asset_id),
        details={"status": 400}, asset_id=asset_id, attempts=1, replays=replays,
    )


def unparseable() -> dict[str, Any]:
    """A dead letter of a body that could not be parsed: ``raw`` only, no event."""
    return deadletter.envelope(
        reason=deadletter.MALFORMED, error="not JSON", failed_at=FAILED_AT, raw=f"{{broken {uuid.uuid4().hex}"
    )


def id_of(body: dict[str, Any]) -> str:
    """The unique id of an event, of an envelope, or of a raw-only envelope."""
    if "activity_params" in body:
        return str(body["activity_params"]["event_id"])
    return id_of(body["event"]) if body.get("event") is not None else str(body["raw"])


def fill(settings: Settings, envelopes: list[dict[str, Any]]) -> set[str]:
    """Put the envelopes in the dead-letter queue (confirmed) and return their ids."""
    publisher = Publisher(settings.broker_url)
    try:
        publisher.publish([deadletter.message(settings.dead_letter_queue, body) for body in envelopes])
    finally:
        publisher.close()
    return {id_of(body) for body in envelopes}


def ready(settings: Settings, queue: str) -> int:
    with Connection(settings.broker_url, heartbeat=0) as connection:
        return int(connection.channel().queue_declare(queue, passive=True).message_count)


def take(settings: Settings, queue: str) -> list[amqp.Message]:
    """Remove and return every message ready in ``queue``."""
    messages = []
    with Connection(settings.broker_url, heartbeat=0) as connection:
        channel = connection.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            messages.append(message)
    return messages


def ids(messages: Iterable[amqp.Message]) -> list[str]:
    return [id_of(jsonutil.loads(message.body)) for message in messages]


def take_until_accounted(settings: Settings, queue: str, accounted: set[str], expected: set[str]) -> set[str]:
    """Consume ``queue`` until its ids and ``accounted`` cover ``expected``; return its ids.

    After a crash the broker returns the dead connection's unacknowledged messages on its
    own schedule; a consumer sees each as it comes back. A timeout means a loss.
    """
    seen: set[str] = set()
    with Connection(settings.broker_url, heartbeat=0) as connection:
        channel = connection.channel()
        channel.basic_consume(queue, no_ack=True, callback=lambda message: seen.add(ids([message])[0]))
        while not expected <= accounted | seen:
            try:
                connection.drain_events(timeout=REQUEUE_TIMEOUT)
            except TimeoutError:
                break
    return seen


def test_count_by_reason_and_asset_id(settings: Settings) -> None:
    fill(settings, [dead("invalid", "asset-1") for _ in range(3)] + [dead("rejected", "asset-2") for _ in range(2)])
    fill(settings, [unparseable()])

    counts = dlq.count(settings)

    assert counts.total == 6 and counts.not_replayable == 1
    assert counts.by_reason == {"invalid": 3, "rejected": 2, "malformed": 1}
    assert counts.by_asset_id == {"asset-1": 3, "asset-2": 2, dlq.NO_ASSET: 1}
    assert ready(settings, settings.dead_letter_queue) == 6


def test_list_leaves_the_queue_intact_and_in_order(settings: Settings) -> None:
    envelopes = [dead("invalid", "asset-1"), dead("rejected", "asset-2"), unparseable(), dead("invalid", "asset-2")]
    put = fill(settings, envelopes)
    before = ready(settings, settings.dead_letter_queue)

    listed = dlq.read(settings)

    assert listed == envelopes
    assert ready(settings, settings.dead_letter_queue) == before == 4
    assert dlq.read(settings) == envelopes  # a second pass sees the same, in the same order
    assert dlq.read(settings, reasons=["invalid"]) == [envelopes[0], envelopes[3]]
    assert dlq.read(settings, asset_ids=["asset-2"]) == [envelopes[1], envelopes[3]]
    assert dlq.read(settings, reasons=["invalid", "rejected"], asset_ids=["asset-2"], limit=1) == [envelopes[1]]
    assert set(ids(take(settings, settings.dead_letter_queue))) == put


@pytest.mark.parametrize("group_size", [1, 3, dlq.GROUP_SIZE])
def test_replay_by_reason_moves_exactly_those_events(settings: Settings, group_size: int) -> None:
    chosen = [dead("retries_exhausted", f"asset-{n % 3}") for n in range(10)]
    others = [dead("invalid", f"asset-{n % 3}") for n in range(7)]
    put = fill(settings, [body for pair in zip(chosen, others) for body in pair] + chosen[7:])

    report = dlq.replay(settings, reasons=["retries_exhausted"], group_size=group_size)

    replayed = take(settings, settings.queue)
    left = take(settings, settings.dead_letter_queue)
    assert report == dlq.ReplayReport(replayed=10, left=7, not_replayable=0)
    assert sorted(ids(replayed)) == sorted(id_of(body) for body in chosen)
    assert sorted(ids(left)) == sorted(id_of(body) for body in others)
    assert set(ids(replayed)) | set(ids(left)) == put and len(replayed) + len(left) == len(put)
    by_id = {id_of(body["event"]): body["event"] for body in chosen}
    for message in replayed:  # the body a producer sends: the event, unchanged, as JSON
        assert json.loads(message.body) == by_id[id_of(json.loads(message.body))]
        assert message.properties["delivery_mode"] == 2
        assert message.properties["content_type"] == "application/json"


def test_replay_of_a_whole_prefix_and_with_a_limit(settings: Settings) -> None:
    bodies = [dead("rejected") for _ in range(9)]
    put = fill(settings, bodies)

    first = dlq.replay(settings, limit=4, group_size=3)
    rest = dlq.replay(settings, group_size=3)

    assert (first.replayed, first.left, rest.replayed, rest.left) == (4, 5, 5, 0)
    replayed = ids(take(settings, settings.queue))
    assert replayed == [id_of(body) for body in bodies] and set(replayed) == put
    assert ready(settings, settings.dead_letter_queue) == 0


def test_replay_by_asset_id(settings: Settings) -> None:
    mine = [dead(reason, "asset-A") for reason in ("invalid", "rejected", "unauthorized")]
    theirs = [dead(reason, "asset-B") for reason in ("invalid", "rejected")]
    put = fill(settings, theirs[:1] + mine + theirs[1:])

    report = dlq.replay(settings, asset_ids=["asset-A"])

    replayed, left = ids(take(settings, settings.queue)), ids(take(settings, settings.dead_letter_queue))
    assert (report.replayed, report.left) == (3, 2)
    assert set(replayed) == {id_of(body) for body in mine}
    assert set(left) == {id_of(body) for body in theirs}
    assert set(replayed) | set(left) == put


def test_dry_run_changes_nothing(settings: Settings) -> None:
    envelopes = [dead("invalid"), unparseable(), dead("rejected"), dead("invalid")]
    fill(settings, envelopes)
    shown: list[dict[str, Any]] = []

    report = dlq.replay(settings, reasons=["invalid", "malformed"], dry_run=True, on_replay=shown.append)

    assert report == dlq.ReplayReport(replayed=2, left=2, not_replayable=1, dry_run=True)
    assert str(report) == "would replay 2, left 2, not replayable 1"
    assert shown == [envelopes[0], envelopes[3]]
    assert ready(settings, settings.queue) == 0
    assert dlq.read(settings) == envelopes


def test_raw_only_envelopes_are_never_replayed(settings: Settings) -> None:
    raw = [unparseable() for _ in range(3)]
    events = [dead("malformed"), dead("invalid")]
    fill(settings, [raw[0], events[0], raw[1], raw[2], events[1]])

    report = dlq.replay(settings)

    assert report == dlq.ReplayReport(replayed=2, left=3, not_replayable=3)
    assert set(ids(take(settings, settings.queue))) == {id_of(body) for body in events}
    assert set(ids(take(settings, settings.dead_letter_queue))) == {id_of(body) for body in raw}


def test_replayed_events_carry_x_replays(settings: Settings) -> None:
    fresh, again = dead("retries_exhausted"), dead("retries_exhausted", replays=2)
    fill(settings, [fresh, again])

    dlq.replay(settings)

    headers = {ids([m])[0]: m.headers for m in take(settings, settings.queue)}
    assert headers[id_of(fresh)][dlq.REPLAYS_HEADER] == 1
    assert headers[id_of(again)][dlq.REPLAYS_HEADER] == 3


def test_main_prints_counts_lists_and_replays(
    settings: Settings, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bodies = [dead("invalid", "asset-1"), dead("rejected", "asset-2"), unparseable()]
    fill(settings, bodies)

    assert dlq.main(["count"]) == 0
    table = capsys.readouterr().out
    assert "dead letters: 3 (not replayable: 1)" in table and "invalid" in table and "asset-2" in table
    assert dlq.main(["count", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_reason"] == {"invalid": 1, "rejected": 1, "malformed": 1}
    assert dlq.main(["show", "--reason", "rejected"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [bodies[1]]
    assert dlq.main(["replay", "--asset-id", "asset-1", "--dry-run"]) == 0
    shown, summary = capsys.readouterr().out.splitlines()
    assert (json.loads(shown), summary) == (bodies[0], "would replay 1, left 2, not replayable 0")
    assert dlq.main(["replay"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "replayed 2, left 1, not replayable 1\n"
    assert ":guest@" not in captured.err
    assert worker_main(["dlq", "count", "--json"]) == 0  # python -m worker dlq ...
    assert json.loads(capsys.readouterr().out)["by_reason"] == {"malformed": 1}
    assert worker_main(["nope"]) == 2


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("count", "list", "show", "replay"):
        with pytest.raises(SystemExit) as exit_:
            dlq.main([command, "--help"])
        assert exit_.value.code == 0
        assert "--json" in capsys.readouterr().out or command != "count"


def test_a_missing_dead_letter_queue_is_an_error_not_created(
    settings: Settings, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    other = Settings.from_env({**env, "ACTIVITY_DEAD_LETTER_QUEUE": f"{settings.dead_letter_queue}.missing"},
                              require_api=False)
    with pytest.raises(dlq.DeadLetterError, match="no queue"):
        dlq.count(other)
    assert dlq.main(["replay"], settings=other) == 1
    assert "no queue" in capsys.readouterr().err
    with pytest.raises(dlq.DeadLetterError):  # still not there: nothing created it
        dlq.read(other)


class Crash(Exception):
    """Stands for the process dying after a group was confirmed and before its acks."""


class CrashAfterFirstGroup(Publisher):
    def publish(self, messages: Any) -> None:
        super().publish(messages)
        raise Crash


def test_an_error_between_confirm_and_acks_loses_nothing(settings: Settings) -> None:
    chosen = [dead("retries_exhausted") for _ in range(7)]
    put = fill(settings, chosen + [dead("invalid") for _ in range(3)])

    with pytest.raises(Crash):
        dlq.replay(settings, reasons=["retries_exhausted"], group_size=3, publisher_class=CrashAfterFirstGroup)

    replayed = ids(take(settings, settings.queue))
    left = ids(take(settings, settings.dead_letter_queue))
    assert replayed == [id_of(body) for body in chosen[:3]]
    assert set(left) == put  # nothing was acknowledged: the first group is now in both queues


#: A replay that SIGKILLs its own process: right after a group is confirmed, or after N acks.
CRASHING_REPLAY = """
import os, signal, sys
import amqp
from config.settings import Settings
from worker import dlq
from worker.publisher import Publisher

point, after = sys.argv[1], int(sys.argv[2])
published = acked = 0

class Crashing(Publisher):
    def publish(self, messages):
        global published
        super().publish(messages)
        published += 1
        if point == "confirmed" and published == after:
            os.kill(os.getpid(), signal.SIGKILL)

real_ack = amqp.Channel.basic_ack

def basic_ack(self, *args, **kwargs):
    global acked
    real_ack(self, *args, **kwargs)
    acked += 1
    if point == "acks" and acked == after:
        os.kill(os.getpid(), signal.SIGKILL)

amqp.Channel.basic_ack = basic_ack
dlq.replay(Settings.from_env(require_api=False), reasons=["retries_exhausted"], group_size=4,
           publisher_class=Crashing)
"""


@pytest.mark.parametrize(("point", "after"), [("confirmed", 1), ("confirmed", 2), ("acks", 1), ("acks", 6)])
def test_a_killed_replay_loses_nothing(settings: Settings, env: dict[str, str], point: str, after: int) -> None:
    chosen = [dead("retries_exhausted", f"asset-{n % 2}") for n in range(10)]
    others = [dead("invalid") for _ in range(4)]
    put = fill(settings, [body for pair in zip(chosen, others) for body in pair] + chosen[4:])

    child = subprocess.run(
        [sys.executable, "-c", CRASHING_REPLAY, point, str(after)],
        cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=60,
    )

    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    replayed = set(ids(take(settings, settings.queue)))
    left = take_until_accounted(settings, settings.dead_letter_queue, replayed, put)
    assert put <= replayed | left, f"lost: {sorted(put - replayed - left)}"
    assert replayed <= {id_of(body) for body in chosen}
    assert {id_of(body) for body in others} <= left
