"""The dead-letter command against a real RabbitMQ: counting, listing, replaying, crashing.

Each test gets queues of its own (``test-<uuid>.*``), deleted afterwards. Every event carries
a unique id (``activity_params.event_id``), so each test can keep a ledger: the ids replayed
plus the ids left must be the ids put in. Nothing sleeps: queues are read with ``basic_get``,
and after a crash with ``drain_events`` under a timeout until the broker has put every
unacknowledged dead letter back.
"""

from __future__ import annotations

import io
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
from tests.harness import VHOSTS
from tests.test_ingest import Rig
from tests.test_ingest import event as ingest_event
from worker.__main__ import main as worker_main
from worker.broker.publisher import Publisher
from worker.deadletter import cli as dlq
from worker.deadletter import envelopes as deadletter
from worker.deadletter import reader as dlq_select
from worker.events import jsonutil

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
def env(broker: None) -> Iterator[dict[str, str]]:
    """This test's queues, in a vhost of its own on the machine's broker (deleted after the test)."""
    vhost_url = VHOSTS.take()
    yield {**queue_env(f"test-{uuid.uuid4().hex}"), "CELERY_BROKER_URL": vhost_url}
    VHOSTS.give_back(vhost_url)


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


def dead(reason: str, asset_id: str = "asset-1", replays: int = 0, failed_at: datetime = FAILED_AT) -> dict[str, Any]:
    """A dead letter of one event with a unique id."""
    return deadletter.envelope(
        reason=reason, error=f"failed: {reason}", failed_at=failed_at, event=event(asset_id),
        details={"status": 400}, asset_id=asset_id, attempts=1, replays=replays,
    )


def unparseable() -> dict[str, Any]:
    """A dead letter of a body that could not be parsed: ``raw`` only, no event."""
    return deadletter.envelope(
        reason=deadletter.MALFORMED, error="not JSON", failed_at=FAILED_AT, raw=f"{{broken {uuid.uuid4().hex}"
    )


def id_of(body: dict[str, Any]) -> str:
    """The unique id of an event, of an envelope, of a raw-only envelope, or of an item that is not an object."""
    if "activity_params" in body:
        return str(body["activity_params"]["event_id"])
    if isinstance(body.get("event"), dict):
        return id_of(body["event"])
    return str(body["details"]["item_id"]) if "item_id" in body.get("details", {}) else str(body["raw"])


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
    for command in ("count", "list", "show", "replay", "purge"):
        with pytest.raises(SystemExit) as exit_:
            dlq.main([command, "--help"])
        assert exit_.value.code == 0
        assert "--json" in capsys.readouterr().out or command != "count"


#: Each subcommand on a broker without the dead-letter queue, and what it prints on stdout.
NOTHING_YET = {
    ("count",): "dead letters: 0 (not replayable: 0)\n",
    ("list",): "",
    ("show", "--reason", "invalid"): "",
    ("replay",): "replayed 0, left 0, not replayable 0\n",
    ("replay", "--dry-run", "--reason", "poison"): "would replay 0, left 0, not replayable 0\n",
    ("purge",): "purged 0, left 0\n",
    ("purge", "--dry-run"): "would purge 0, left 0\n",
}


def test_without_a_dead_letter_queue_every_subcommand_says_there_are_none_yet_and_creates_nothing(
    settings: Settings, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"{settings.dead_letter_queue}.typo"
    other = Settings.from_env({**env, "ACTIVITY_DEAD_LETTER_QUEUE": missing}, require_api=False)

    for argv, expected in NOTHING_YET.items():
        assert dlq.main(list(argv), settings=other) == 0, argv
        captured = capsys.readouterr()
        assert captured.out == expected, argv
        assert captured.err.startswith(f"no dead letters yet: there is no queue {missing!r} on "), argv
        assert "The worker creates it when it starts" in captured.err and "ACTIVITY_DEAD_LETTER_QUEUE" in captured.err
        assert ":guest@" not in captured.err
    assert dlq.main(["count", "--json"], settings=other) == 0
    zero = json.loads(capsys.readouterr().out)
    assert zero == dlq.Counts().as_dict() and zero["total"] == 0 and zero["by_reason"] == {}
    with pytest.raises(dlq.NoDeadLetterQueue):  # still not there: nothing created it
        dlq.read(other)
    assert dlq.read(settings) == []  # the real one is untouched


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
from worker.deadletter import cli as dlq
from worker.broker.publisher import Publisher

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


# --- what replay can publish: objects, and poison bodies byte for byte -------------------------


def dead_item(item: Any, reason: str = "invalid") -> dict[str, Any]:
    """A dead letter of an array item that is not an object (dead-lettered ``invalid``), with a ledger id."""
    return deadletter.envelope(reason=reason, error="The event cannot be routed", failed_at=FAILED_AT, event=item,
                               details={"_schema": ["Invalid input type."], "item_id": uuid.uuid4().hex})


def poison(tag: str, *, replays: int = 0, **parts: int) -> tuple[bytes, list[dict[str, Any]]]:
    """A poison message's body, carrying ``tag`` (not UTF-8, with a real backslash), and its dead letters
    (in parts of ``part_bytes``, when given)."""
    body = b'{"asset_id": "asset-1", "id": "' + tag.encode() + b'", "note": "caf\xe9 caf\\xe9"}'
    return body, deadletter.body_envelopes(reason=deadletter.POISON, error="delivered 10 times", failed_at=FAILED_AT,
                                           raw=body, details={"deliveries": 10}, attempts=10, replays=replays, **parts)


def test_only_objects_can_be_replayed_and_dry_run_and_count_agree(settings: Settings) -> None:
    objects = [dead("invalid"), dead("invalid")]
    others = [dead_item(7), dead_item("a string"), dead_item([1, 2]), dead_item(None), dead_item(True)]
    put = [others[0], objects[0], others[1], others[2], objects[1], others[3], others[4]]
    ledger = fill(settings, put)

    counted = dlq.count(settings)
    dry = dlq.replay(settings, dry_run=True)
    report = dlq.replay(settings)

    assert counted.not_replayable == dry.not_replayable == report.not_replayable == len(others)
    assert dry.replayed == report.replayed == len(objects) and report.left == len(others)
    replayed = take(settings, settings.queue)
    assert [json.loads(m.body) for m in replayed] == [body["event"] for body in objects]  # never a bare 7
    left = [json.loads(m.body) for m in take(settings, settings.dead_letter_queue)]
    assert left == others  # kept, untouched, in order
    assert {id_of(json.loads(m.body)) for m in replayed} | {id_of(e) for e in left} == ledger
    assert len(replayed) + len(left) == len(put)


def test_poison_bodies_are_replayed_byte_for_byte_whole_or_in_parts(settings: Settings) -> None:
    small, small_dead = poison("small", replays=2)
    large, large_dead = poison("large", part_bytes=16)
    assert len(small_dead) == 1 and len(large_dead) > 3
    malformed = unparseable()
    fill(settings, [small_dead[0], malformed, *large_dead, dead("rejected")])

    dry = dlq.replay(settings, reasons=["poison"], dry_run=True)
    report = dlq.replay(settings, reasons=["poison"])

    assert dry == dlq.ReplayReport(replayed=2, left=2, not_replayable=0, dry_run=True)
    assert report == dlq.ReplayReport(replayed=2, left=2, not_replayable=0)
    replayed = take(settings, settings.queue)
    assert [m.body for m in replayed] == [small, large]  # the bytes they were, parts joined
    assert [m.headers[dlq.REPLAYS_HEADER] for m in replayed] == [3, 1]
    assert {m.properties["delivery_mode"] for m in replayed} == {2}
    left = [json.loads(m.body) for m in take(settings, settings.dead_letter_queue)]
    assert [e["reason"] for e in left] == ["malformed", "rejected"]  # every part acknowledged, nothing else


def test_a_malformed_body_is_never_replayed(settings: Settings) -> None:
    body, _ = poison("x")
    parts = deadletter.body_envelopes(reason=deadletter.MALFORMED, error="not JSON", failed_at=FAILED_AT,
                                      raw=body, part_bytes=16)
    fill(settings, [*parts, unparseable()])

    assert dlq.count(settings).not_replayable == 2
    assert dlq.replay(settings) == dlq.ReplayReport(replayed=0, left=2, not_replayable=2)
    assert ready(settings, settings.queue) == 0 and ready(settings, settings.dead_letter_queue) == len(parts) + 1


def test_an_error_between_confirm_and_acks_leaves_every_part_of_a_replayed_poison_body(settings: Settings) -> None:
    body, parts = poison("crash", part_bytes=16)
    fill(settings, parts)

    with pytest.raises(Crash):
        dlq.replay(settings, publisher_class=CrashAfterFirstGroup)

    assert [m.body for m in take(settings, settings.queue)] == [body]
    left = [json.loads(m.body) for m in take(settings, settings.dead_letter_queue)]
    assert deadletter.join(left) == body  # replayed and still dead-lettered: nothing lost


# --- bodies in parts: one dead letter to every command ----------------------------------------


def test_a_body_in_parts_is_one_dead_letter_to_count_list_and_purge(settings: Settings) -> None:
    body, parts = poison("parts", part_bytes=16)
    first, second = dead("invalid", "asset-2"), dead("rejected")
    # a publisher's first try got two parts out before its connection broke; its retry sent them
    # all again, while another worker's dead letters came in between
    fill(settings, [*parts[:2], first, *parts[:3], second, *parts[3:]])

    counts = dlq.count(settings)
    listed = dlq.read(settings)

    assert (counts.total, counts.scanned, counts.not_replayable, counts.incomplete) == (3, 3, 0, 0)
    assert counts.by_reason == {"poison": 1, "invalid": 1, "rejected": 1}
    assert listed == [first, second, *parts]  # every part shown once, in order, once all are read
    assert deadletter.join(listed[2:]) == body
    assert dlq.read(settings, reasons=["poison"], limit=1) == parts  # a limit takes a body whole
    report = dlq.purge(settings, reasons=["poison"], confirm=lambda n: n == 1)
    assert report == dlq.PurgeReport(purged=1, selected=1, left=2)
    assert ids(take(settings, settings.dead_letter_queue)) == [id_of(first), id_of(second)]  # duplicates too


def test_a_body_missing_a_part_is_counted_once_left_alone_and_not_replayed(settings: Settings) -> None:
    _, parts = poison("incomplete", part_bytes=16)
    kept = dead("rejected")
    fill(settings, [*parts[:2], *parts[3:], kept])

    counts = dlq.count(settings)
    report = dlq.replay(settings)

    assert (counts.total, counts.incomplete, counts.not_replayable) == (2, 1, 1)
    assert "bodies in parts with a part missing: 1" in counts.table()
    assert report == dlq.ReplayReport(replayed=1, left=1, not_replayable=1)
    assert ids(take(settings, settings.queue)) == [id_of(kept)]
    assert [json.loads(m.body) for m in take(settings, settings.dead_letter_queue)] == parts[:2] + parts[3:]


# --- selection by time, counts by reason x asset_id, the replay counter ------------------------

#: Three moments, an hour apart, for dead letters selected by time.
EARLY, MIDDLE, LATE = (datetime(2024, 5, 1, hour, 30, tzinfo=timezone.utc) for hour in (10, 11, 12))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=timezone.utc)),
        ("2024-05-01T17:30:00+05:30", datetime(2024, 5, 1, 12, tzinfo=timezone.utc)),
        ("2024-05-01T12:00:00.250Z", datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=timezone.utc)),
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=timezone.utc)),
    ],
)
def test_since_and_until_read_iso_8601(text: str, expected: datetime) -> None:
    assert dlq_select.parse_when(text) == expected


@pytest.mark.parametrize("text", ["2024-05-01T12:00:00", "yesterday", "2024-02-30T00:00:00Z", ""])
def test_since_and_until_refuse_naive_or_impossible_times(text: str) -> None:
    with pytest.raises(ValueError):
        dlq_select.parse_when(text)


def test_selection_by_failed_at_includes_since_and_excludes_until() -> None:
    at = {when: dead("invalid", failed_at=when) for when in (EARLY, MIDDLE, LATE)}
    undated = {**dead("invalid"), "failed_at": "not a time"}
    window = dlq.Selection.of(since=MIDDLE, until=LATE)
    assert [window.matches(at[w]) for w in (EARLY, MIDDLE, LATE)] == [False, True, False]
    assert not window.matches(undated) and dlq.Selection().matches(undated)
    assert dlq.Selection.of(since=MIDDLE).matches(at[LATE]) and not dlq.Selection.of(until=EARLY).matches(at[EARLY])
    mixed = dlq.Selection.of(reasons=["invalid"], asset_ids=["asset-2"], since=EARLY)
    assert not mixed.matches(at[LATE]) and mixed.matches(dead("invalid", "asset-2", failed_at=LATE))


def test_count_by_reason_times_asset_id_with_replayed_and_a_time_range(settings: Settings) -> None:
    fill(settings, [dead("invalid", "asset-1", failed_at=EARLY), dead("invalid", "asset-1", replays=1),
                    dead("rejected", "asset-1", failed_at=LATE), dead("rejected", "asset-2", replays=3),
                    dead("invalid", "asset-2", failed_at=LATE), unparseable()])

    counts = dlq.count(settings)
    window = dlq.count(settings, since=MIDDLE, until=LATE)

    assert (counts.total, counts.replayed, counts.not_replayable) == (6, 2, 1)
    assert counts.by_reason_and_asset_id == {("invalid", "asset-1"): 2, ("rejected", "asset-1"): 1,
                                             ("rejected", "asset-2"): 1, ("invalid", "asset-2"): 1,
                                             ("malformed", dlq.NO_ASSET): 1}
    assert counts.as_dict()["by_reason_and_asset_id"]["invalid"] == {"asset-1": 2, "asset-2": 1}
    table = counts.table()
    assert "replayed before and dead again: 2" in table
    cross = table.split("\n\n")[-1].splitlines()
    assert cross[0].split() == ["asset_id", "invalid", "rejected", "malformed"]
    assert cross[1].split() == ["asset-1", "2", "1", "."]
    # FAILED_AT (12:00) is the only moment in [11:30, 12:30): the unparseable one has it too
    assert (window.total, window.scanned, window.by_reason) == (3, 6, {"invalid": 1, "rejected": 1, "malformed": 1})
    assert window.table().startswith("dead letters: 3 of 6 in the queue")
    assert ready(settings, settings.dead_letter_queue) == 6


def test_count_table_shows_the_top_asset_ids_only(settings: Settings) -> None:
    fill(settings, [dead("invalid", f"asset-{n}") for n in range(5)] + [dead("invalid", "asset-0")])

    table = dlq.count(settings).table(top=2)

    assert "asset-0" in table and "(and 3 more asset_ids: --json lists them all)" in table
    assert len(dlq.count(settings).as_dict()["by_asset_id"]) == 5


def test_list_and_replay_by_time_range(settings: Settings) -> None:
    early, middle, late = (dead("retries_exhausted", failed_at=when) for when in (EARLY, MIDDLE, LATE))
    put = fill(settings, [late, early, middle])

    assert dlq.read(settings, since=MIDDLE) == [late, middle]
    assert dlq.read(settings, until=MIDDLE) == [early]
    report = dlq.replay(settings, since=EARLY, until=LATE)

    assert (report.replayed, report.left) == (2, 1)
    replayed, left = ids(take(settings, settings.queue)), ids(take(settings, settings.dead_letter_queue))
    assert replayed == [id_of(early), id_of(middle)] and left == [id_of(late)]
    assert set(replayed) | set(left) == put


def test_main_selects_by_time_and_refuses_bad_times(
    settings: Settings, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    early, late = dead("invalid", failed_at=EARLY), dead("invalid", failed_at=LATE)
    fill(settings, [early, late])

    assert dlq.main(["list", "--since", "2024-05-01T17:00:00+05:30"]) == 0  # 11:30 UTC
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [late]
    assert dlq.main(["count", "--json", "--until", "2024-05-01T11:00:00Z"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 1
    assert dlq.main(["count", "--since", "2024-05-02", "--until", "2024-05-01"]) == 2
    assert "--since must be before --until" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        dlq.main(["list", "--since", "2024-05-01T12:00:00"])
    assert exit_.value.code == 2 and "has no offset" in capsys.readouterr().err
    for command in ("count", "list", "replay", "purge"):
        with pytest.raises(SystemExit):
            dlq.main([command, "--help"])
        assert "--since" in (text := capsys.readouterr().out) and "--until" in text and "--asset-id" in text
        assert "--account NAME" in text and "they are account default" in " ".join(text.split())


# --- accounts ---------------------------------------------------------------------------------


def for_account(account: str, reason: str = "invalid", asset_id: str = "asset-1") -> dict[str, Any]:
    """A dead letter written for one Netcore account (``default`` ones written before accounts carry none)."""
    return {**dead(reason, asset_id), "account": account}


def test_selection_by_account_takes_dead_letters_without_one_as_the_default_accounts() -> None:
    old, acme = dead("invalid"), for_account("acme")
    default = dlq.Selection.of(accounts=[dlq.DEFAULT_ACCOUNT])
    assert default.matches(old) and default.matches(for_account("default")) and not default.matches(acme)
    assert dlq.Selection.of(accounts=["acme", "globex"]).matches(acme)
    assert not dlq.Selection.of(accounts=["acme"]).matches(old)
    assert not dlq.Selection.of(accounts=["acme"], reasons=["rejected"]).matches(acme)
    assert dlq.Selection().matches(acme)


def test_count_groups_by_account_only_when_there_are_several(settings: Settings) -> None:
    fill(settings, [dead("invalid"), dead("rejected", "asset-2")])
    single = dlq.count(settings)
    assert single.by_account == {"default": 2} and single.as_dict()["by_account"] == {"default": 2}
    assert "account" not in single.table()  # one account: nothing to tell apart
    fill(settings, [for_account("acme", "rejected"), for_account("acme", "rejected", "asset-2"),
                    for_account("globex"), for_account("default", "rejected")])

    counts = dlq.count(settings)
    acme = dlq.count(settings, accounts=["acme"])

    assert counts.by_account == {"default": 3, "acme": 2, "globex": 1}
    assert counts.as_dict()["by_reason_and_account"] == {"rejected": {"acme": 2, "default": 2},
                                                         "invalid": {"default": 1, "globex": 1}}
    blocks = counts.table().split("\n\n")
    assert blocks[2].splitlines() == ["account  count", "default      3", "acme         2", "globex       1"]
    assert [row.split() for row in blocks[4].splitlines()] == [
        ["account", "rejected", "invalid"], ["default", "2", "1"], ["acme", "2", "."], ["globex", ".", "1"]]
    assert blocks[5].splitlines()[0].split() == ["asset_id", "rejected", "invalid"]  # the asset_ids' last
    assert (acme.total, acme.scanned, acme.by_account) == (2, 6, {"acme": 2})
    assert "account" not in acme.table()


def test_list_replay_and_purge_by_account(settings: Settings) -> None:
    old, acme, globex, named = dead("rejected"), for_account("acme"), for_account("globex"), for_account("default")
    more_acme = for_account("acme", "rejected")
    put = fill(settings, [old, acme, globex, named, more_acme])

    assert dlq.read(settings, accounts=["default"]) == [old, named]
    assert dlq.read(settings, accounts=["acme"], limit=1) == [acme]
    dry = dlq.purge(settings, accounts=["globex"], dry_run=True, confirm=lambda n: False)
    report = dlq.replay(settings, accounts=["acme"], reasons=["invalid", "rejected"])
    purged = dlq.purge(settings, accounts=["globex"], confirm=lambda n: n == 1)

    assert str(dry) == "would purge 1, left 4"
    assert report == dlq.ReplayReport(replayed=2, left=3, not_replayable=0)
    assert purged == dlq.PurgeReport(purged=1, selected=1, left=2)
    replayed, left = ids(take(settings, settings.queue)), ids(take(settings, settings.dead_letter_queue))
    assert replayed == [id_of(acme), id_of(more_acme)] and left == [id_of(old), id_of(named)]
    assert set(replayed) | set(left) | {id_of(globex)} == put


def test_main_selects_by_account(
    settings: Settings, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    old, acme, globex = dead("invalid"), for_account("acme", "rejected"), for_account("globex")
    fill(settings, [old, acme, globex])

    assert dlq.main(["count", "--account", "acme", "--account", "globex", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_account"] == {"acme": 1, "globex": 1}
    assert dlq.main(["count"]) == 0
    assert "account  count" in capsys.readouterr().out
    assert dlq.main(["list", "--account", "default"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [old]
    assert dlq.main(["replay", "--account", "acme"]) == 0
    assert capsys.readouterr().out == "replayed 1, left 2, not replayable 0\n"
    assert dlq.main(["purge", "--yes", "--account", "default", "--reason", "invalid"]) == 0
    assert capsys.readouterr().out == "purged 1, left 1\n"
    assert dlq.read(settings) == [globex]


def test_the_ingest_consumer_copies_x_replays_into_its_dead_letters() -> None:
    rig = Rig()
    bad = ingest_event("", "replayed-twice")  # an empty asset_id: dead-lettered as invalid by the consumer
    rig.send_event(bad, headers={dlq.REPLAYS_HEADER: 2})
    rig.send_event(ingest_event("", "fresh"))
    rig.send(b"{not json", headers={dlq.REPLAYS_HEADER: 1})
    rig.send_event(ingest_event("", "odd-header"), headers={dlq.REPLAYS_HEADER: "many"})

    assert [(d["reason"], d["replays"]) for d in rig.dead_letters()] == [
        ("invalid", 2), ("invalid", 0), ("malformed", 1), ("invalid", 0)]


def test_a_replayed_event_that_dies_again_in_the_consumer_is_counted_as_replayed(settings: Settings) -> None:
    fill(settings, [dead("invalid", "asset-1")])
    dlq.replay(settings)
    [message] = take(settings, settings.queue)
    rig = Rig()
    unroutable = {**json.loads(message.body), "asset_id": ""}
    rig.send_event(unroutable, headers=dict(message.headers))
    fill(settings, rig.dead_letters())

    assert dlq.count(settings).replayed == 1


# --- progress ---------------------------------------------------------------------------------


def test_replay_shows_progress_every_n_dead_letters(settings: Settings) -> None:
    fill(settings, [dead("rejected") for _ in range(5)])
    stream = io.StringIO()

    dlq.replay(settings, group_size=2, progress=dlq.Progress("replay", "replayed", every=2, stream=stream))

    assert stream.getvalue().splitlines() == [
        "replay: read 2 of 5 (40%), replayed 1", "replay: read 4 of 5 (80%), replayed 3",
        "replay: read 5 of 5 (100%), replayed 5"]


def test_progress_is_rewritten_in_place_on_a_terminal_and_silent_on_short_runs() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress = dlq.Progress("purge", "selected", every=10, stream=terminal)
    for read in range(1, 21):
        progress.update(read, 25, read // 2)
    progress.update(25, 25, 12, final=True)
    assert terminal.getvalue() == ("\rpurge: read 10 of 25 (40%), selected 5\033[K"
                                   "\rpurge: read 20 of 25 (80%), selected 10\033[K"
                                   "\rpurge: read 25 of 25 (100%), selected 12\033[K\n")
    quiet = io.StringIO()
    short = dlq.Progress("replay", "replayed", every=10, stream=quiet)
    short.update(3, 3, 3)
    short.update(3, 3, 3, final=True)
    assert quiet.getvalue() == ""


def test_main_shows_progress_only_when_asked_or_on_a_terminal(
    settings: Settings, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fill(settings, [dead("rejected") for _ in range(4)])

    assert dlq.main(["replay", "--dry-run", "--progress-every", "2"]) == 0
    assert "replay: read" not in capsys.readouterr().err  # stderr is not a terminal here
    assert dlq.main(["replay", "--progress", "--progress-every", "2"]) == 0
    captured = capsys.readouterr()
    assert "replay: read 2 of 4 (50%)" in captured.err and captured.out == "replayed 4, left 0, not replayable 0\n"


# --- purge ------------------------------------------------------------------------------------


def test_purge_removes_exactly_the_selected_after_confirmation(settings: Settings) -> None:
    doomed = [dead("invalid", "asset-1") for _ in range(4)]
    kept = [dead("invalid", "asset-2"), dead("rejected", "asset-1"), unparseable()]
    order = [kept[0], doomed[0], doomed[1], kept[1], doomed[2], kept[2], doomed[3]]
    put = fill(settings, order)
    asked: list[int] = []

    def confirm(how_many: int) -> bool:
        asked.append(how_many)
        assert ready(settings, settings.dead_letter_queue) == 0  # all held while the operator decides
        return True

    report = dlq.purge(settings, reasons=["invalid"], asset_ids=["asset-1"], confirm=confirm)

    assert asked == [4] and report == dlq.PurgeReport(purged=4, selected=4, left=3)
    assert str(report) == "purged 4, left 3"
    left = ids(take(settings, settings.dead_letter_queue))
    assert left == [id_of(body) for body in kept]  # the others, untouched and in order
    assert set(left) | {id_of(body) for body in doomed} == put


def test_purge_from_the_head_of_the_queue_and_with_a_limit(settings: Settings) -> None:
    bodies = [dead("rejected") for _ in range(6)]
    fill(settings, bodies)

    first = dlq.purge(settings, limit=4, confirm=lambda n: True)

    assert (first.purged, first.left) == (4, 2)
    assert ids(take(settings, settings.dead_letter_queue)) == [id_of(body) for body in bodies[4:]]


@pytest.mark.parametrize("answer", [False, KeyboardInterrupt])
def test_purge_unconfirmed_or_interrupted_at_the_question_removes_nothing(
    settings: Settings, answer: bool | type[BaseException]
) -> None:
    bodies = [dead("invalid"), dead("rejected"), unparseable()]
    fill(settings, bodies)

    def confirm(how_many: int) -> bool:
        if answer is KeyboardInterrupt:
            raise KeyboardInterrupt
        return bool(answer)

    if answer is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            dlq.purge(settings, reasons=["invalid"], confirm=confirm)
    else:
        report = dlq.purge(settings, reasons=["invalid"], confirm=confirm)
        assert report == dlq.PurgeReport(purged=0, selected=1, left=3, confirmed=False)
    assert dlq.read(settings) == bodies


def test_purge_dry_run_and_nothing_selected_never_ask(settings: Settings) -> None:
    bodies = [dead("invalid"), dead("rejected")]
    fill(settings, bodies)

    def never(how_many: int) -> bool:
        raise AssertionError("asked")

    dry = dlq.purge(settings, reasons=["invalid"], dry_run=True, confirm=never)
    none = dlq.purge(settings, reasons=["unauthorized"], confirm=never)

    assert str(dry) == "would purge 1, left 1" and (none.purged, none.left, none.confirmed) == (0, 2, True)
    assert dlq.read(settings) == bodies


def test_main_purge_asks_on_stdin(
    settings: Settings, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bodies = [dead("invalid", "asset-1"), dead("invalid", "asset-2"), dead("rejected", "asset-1"),
              dead("invalid", "asset-3")]
    fill(settings, bodies)

    monkeypatch.setattr("sys.stdin", io.StringIO("yes\n"))
    assert dlq.main(["purge", "--reason", "invalid"]) == 1
    captured = capsys.readouterr()
    assert '3 dead letters would be removed for good.\ntype "purge 3" to confirm: ' in captured.err
    assert captured.out == "not confirmed: purged 0 of 3, left 4\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no answer at all (stdin closed): no
    assert dlq.main(["purge", "--reason", "invalid"]) == 1
    assert dlq.main(["purge", "--reason", "invalid", "--dry-run"]) == 0

    class CtrlC(io.StringIO):
        def readline(self, size: int | None = -1) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", CtrlC())
    assert dlq.main(["purge", "--reason", "invalid"]) == 130
    assert "interrupted: every dead letter not yet acknowledged stays" in capsys.readouterr().err
    assert dlq.read(settings) == bodies

    monkeypatch.setattr("sys.stdin", io.StringIO("purge 2\n"))
    assert dlq.main(["purge", "--reason", "invalid", "--asset-id", "asset-1", "--asset-id", "asset-2"]) == 0
    assert capsys.readouterr().out == "purged 2, left 2\n"
    assert dlq.main(["purge", "--yes", "--reason", "rejected"]) == 0
    assert capsys.readouterr().out == "purged 1, left 1\n"
    assert dlq.read(settings) == [bodies[3]]


#: A purge that SIGKILLs its own process after N acknowledgements (or while asking, N = 0).
CRASHING_PURGE = """
import os, signal, sys
import amqp
from config.settings import Settings
from worker.deadletter import cli as dlq

after = int(sys.argv[1])
acked = 0
real_ack = amqp.Channel.basic_ack

def basic_ack(self, *args, **kwargs):
    global acked
    real_ack(self, *args, **kwargs)
    acked += 1
    if acked == after:
        os.kill(os.getpid(), signal.SIGKILL)

def confirm(how_many):
    if after == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return True

amqp.Channel.basic_ack = basic_ack
dlq.purge(Settings.from_env(require_api=False), reasons=["invalid"], confirm=confirm)
"""


@pytest.mark.parametrize("after", [0, 1, 3])
def test_a_killed_purge_removes_nothing_but_selected_dead_letters(
    settings: Settings, env: dict[str, str], after: int
) -> None:
    doomed = [dead("invalid") for _ in range(6)]
    kept = [dead("rejected") for _ in range(5)] + [unparseable()]
    put = fill(settings, [body for pair in zip(kept, doomed) for body in pair])

    child = subprocess.run(
        [sys.executable, "-c", CRASHING_PURGE, str(after)],
        cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=60,
    )

    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    kept_ids, doomed_ids = {id_of(body) for body in kept}, {id_of(body) for body in doomed}
    expected = kept_ids if after else put  # killed while asking: every one comes back
    left = take_until_accounted(settings, settings.dead_letter_queue, set(), expected)
    assert kept_ids <= left, f"lost: {sorted(kept_ids - left)}"
    assert left <= put and (after or left == put)
    assert len(put - left) <= after  # at most the dead letters it acknowledged, all of them selected
    assert put - left <= doomed_ids


def test_another_applications_message_is_replayed_to_the_queue_it_came_from_as_it_was(settings: Settings) -> None:
    """A task of another application set aside by the consumer (``unhandled``, ``foreign_task``)
    goes back, once its routing is fixed, to where it came from: same body, headers, properties."""
    from worker.ingest.decoding import foreign_message_details

    original = f"{settings.queue}.shop"
    body = b"\x80\x04\x95 a pickle the worker never read"
    headers = {"task": "shop.send_email", "id": "t-1", "binary": b"\x00\xff"}

    class Message:
        content_type, content_encoding = "application/x-python-serialize", "binary"
        properties = {"correlation_id": "c-1", "priority": 3}
        delivery_info = {"routing_key": original}

    Message.headers = headers  # type: ignore[attr-defined]
    details = {"problem": "foreign_task", "task": "shop.send_email", "replay_body": False,
               "message": foreign_message_details(Message(), original)}  # type: ignore[arg-type]
    parts = deadletter.body_envelopes(reason=deadletter.UNHANDLED, error="another application's task",
                                      failed_at=FAILED_AT, raw=body, details=details, part_bytes=16)
    with Connection(settings.broker_url, heartbeat=0) as connection:
        connection.channel().queue_declare(original, durable=True, auto_delete=False)
    fill(settings, [*parts, dead("invalid")])

    assert dlq.replay(settings, reasons=["unhandled"]) == dlq.ReplayReport(replayed=1, left=1, not_replayable=0)
    (back,) = take(settings, original)
    assert back.body == body and back.headers["task"] == "shop.send_email" and back.headers["binary"] == b"\x00\xff"
    assert (back.properties["content_type"], back.properties["content_encoding"]) == (
        "application/x-python-serialize", "binary")
    assert back.properties["correlation_id"] == "c-1" and back.properties["priority"] == 3
    assert ready(settings, settings.queue) == 0  # not to activities: it holds no events
