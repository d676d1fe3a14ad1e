"""Dead-letter commands run right one after another on a quorum queue, with the disk busy.

A quorum queue puts back what a closed channel held only once it has written that to its log,
after it answered the close: a command started a few milliseconds after another one used to
find fewer dead letters than there were, and said so in its report. Here threads write and
fsync in the test's temp dir meanwhile (the broker's log then waits for the disk), and every
report is checked against the truth: each dead letter carries a unique id, and the ids replayed
plus the ids left plus the ids purged must be the ids put in. Once a command returned, the
queue must show every dead letter it did not remove; and a command must see what a client
that just died held.

Nothing sleeps: the commands run back to back, as an operator's script runs them.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import amqp
import pytest
from kombu import Connection

from config.settings import Settings
from tests.harness import QueueSet, publish_events
from worker.broker.topology import dead_letter_arguments
from worker.deadletter import cli as dlq
from worker.deadletter import envelopes as deadletter
from worker.deadletter import handback
from worker.events import jsonutil

pytestmark = [pytest.mark.quorum, pytest.mark.timeout(180)]

#: Rounds of six commands back to back. Before the fix, about one command in twenty (with the
#: disk busy) found fewer dead letters than there were: 30 rounds never all passed.
ROUNDS = 30

#: Rounds of another client holding every dead letter, then a command right after it closed.
HOLDER_ROUNDS = 100

#: Bytes the busy-disk thread writes between two fsyncs.
BUSY_CHUNK = 8 * 1024 * 1024

#: Bytes of each busy-disk file, written over and over.
BUSY_FILE = 64 * 1024 * 1024

#: Threads writing and fsyncing, each its own file.
BUSY_WRITERS = 2

#: When every dead letter of these tests failed.
FAILED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def busy_disk(tmp_path: Path) -> Iterator[None]:
    """Threads writing and fsyncing files in the test's temp dir until the test ends."""
    stop = threading.Event()

    def write(path: Path) -> None:
        block = b"\x01" * BUSY_CHUNK
        with path.open("wb") as file:
            while not stop.is_set():
                file.write(block)
                file.flush()
                os.fsync(file.fileno())
                if file.tell() >= BUSY_FILE:
                    file.seek(0)

    paths = [tmp_path / f"busy-{n}" for n in range(BUSY_WRITERS)]
    writers = [threading.Thread(target=write, args=(path,), name="busy-disk", daemon=True) for path in paths]
    for writer in writers:
        writer.start()
    try:
        yield
    finally:
        stop.set()
        for writer in writers:
            writer.join(timeout=60)
        for path in paths:
            path.unlink(missing_ok=True)


def rejected() -> dict[str, Any]:
    """A replayable dead letter: an event the API rejected, with a unique id."""
    event_id = uuid.uuid4().hex
    event = {"activity_name": "Purchase", "asset_id": "asset-1", "timestamp": "2024-05-01T11:59:00Z",
             "identity": "customer-1", "activity_source": "web", "activity_params": {"event_id": event_id}}
    return deadletter.envelope(reason=deadletter.REJECTED, error="400", failed_at=FAILED_AT, event=event,
                               details={"status": 400}, asset_id="asset-1", attempts=1)


def malformed() -> dict[str, Any]:
    """A dead letter replay leaves: a body that is not JSON, its id in it."""
    return deadletter.envelope(reason=deadletter.MALFORMED, error="not JSON", failed_at=FAILED_AT,
                               raw=f"{{broken {uuid.uuid4().hex}")


def id_of(envelope: dict[str, Any]) -> str:
    event = envelope.get("event")
    return str(event["activity_params"]["event_id"]) if isinstance(event, dict) else str(envelope["raw"])


def put(settings: Settings, envelopes: list[dict[str, Any]]) -> set[str]:
    """Publish the dead letters (confirmed) and return their ids."""
    publish_events(settings.dead_letter_queue, envelopes, queue_arguments=dead_letter_arguments(True))
    return {id_of(envelope) for envelope in envelopes}


def drain(queues: QueueSet, queue: str) -> list[dict[str, Any]]:
    """Take every message ready in ``queue`` (for the ledger at the end)."""
    with Connection(queues.broker_url, heartbeat=0) as connection:
        channel = connection.channel()
        taken = []
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            taken.append(jsonutil.loads(message.body))
        return taken


def test_commands_back_to_back_see_every_dead_letter_and_report_the_truth(queues: QueueSet, busy_disk: None) -> None:
    """Each command's report is the truth, and once it returned the queue shows every dead letter
    it did not remove (as a dashboard or ``rabbitmqctl list_queues`` would, at that moment)."""
    settings = queues.settings
    sent: set[str] = set()
    replayable: set[str] = set()
    purged: set[str] = set()

    with Connection(queues.broker_url, heartbeat=0) as connection:
        look = connection.channel()

        def expect(what: str, seen: object, truth: object, ready: int) -> None:
            shown = look.queue_declare(settings.dead_letter_queue, passive=True).message_count
            assert (seen, shown) == (truth, ready), (f"round {round_}: {what}: said {seen} (truth: {truth}); "
                                                     f"the queue shows {shown} dead letters (truth: {ready})")

        for round_ in range(ROUNDS):
            events, bodies = [rejected() for _ in range(3)], [malformed() for _ in range(2)]
            sent |= put(settings, events + bodies)
            replayable |= {id_of(e) for e in events}
            stay = {id_of(e) for e in bodies}
            if round_ % 2 == 0:  # count, dry run, replay, list, purge, count
                expect("count", dlq.count(settings).total, 5, 5)
                expect("dry run", dlq.replay(settings, dry_run=True), dlq.ReplayReport(3, 2, 2, dry_run=True), 5)
                expect("replay", dlq.replay(settings), dlq.ReplayReport(3, 2, 2), 2)
                expect("list", {id_of(e) for e in dlq.read(settings)}, stay, 2)
            else:  # list, count, replay, count, purge, count
                expect("list", {id_of(e) for e in dlq.read(settings)}, stay | {id_of(e) for e in events}, 5)
                expect("count", dlq.count(settings).total, 5, 5)
                expect("replay", dlq.replay(settings), dlq.ReplayReport(3, 2, 2), 2)
                expect("count after replay", dlq.count(settings).total, 2, 2)
            purge = dlq.purge(settings, reasons=[deadletter.MALFORMED], confirm=lambda n: True)
            expect("purge", purge, dlq.PurgeReport(purged=2, selected=2, left=0), 0)
            purged |= stay
            expect("count after purge", dlq.count(settings).total, 0, 0)

    replayed = {id_of({"event": event}) for event in drain(queues, settings.queue)}
    left = {id_of(envelope) for envelope in drain(queues, settings.dead_letter_queue)}
    assert replayed == replayable and not left
    assert replayed | left | purged == sent and len(replayed) + len(purged) == len(sent)


def test_a_command_sees_what_a_client_that_just_died_held(queues: QueueSet, busy_disk: None) -> None:
    """A client read every dead letter without acknowledging it, then died (its socket closed,
    no goodbye: a command killed, a script that crashed): the next command sees them all."""
    settings = queues.settings
    ids = put(settings, [rejected() for _ in range(4)] + [malformed()])

    for round_ in range(HOLDER_ROUNDS):
        connection = Connection(queues.broker_url, heartbeat=0)
        channel = connection.channel()
        held = [channel.basic_get(settings.dead_letter_queue, no_ack=False) for _ in range(len(ids))]
        assert all(isinstance(message, amqp.Message) for message in held), f"round {round_}: not all back"
        connection.connection.transport.close()  # the broker notices, and puts them back once its log is written
        connection.collect()
        listed = {id_of(envelope) for envelope in dlq.read(settings)}
        assert listed == ids, f"round {round_}: {len(ids - listed)} of {len(ids)} not seen"


def test_what_another_consumer_holds_is_named_in_every_report(
    queues: QueueSet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer that keeps holding dead letters (a command running at the same time, a script):
    each command waits for it (here half a second), then reads the others and says so."""
    monkeypatch.setattr(handback, "SETTLE_TIMEOUT", 0.5)
    settings = queues.settings
    ids = put(settings, [rejected() for _ in range(3)] + [malformed() for _ in range(2)])
    held: list[amqp.Message] = []

    with Connection(queues.broker_url, heartbeat=0) as connection:
        channel = connection.channel()
        channel.basic_qos(0, 2, False)
        channel.basic_consume(settings.dead_letter_queue, callback=held.append)
        while len(held) < 2:
            connection.drain_events(timeout=30)
        counts = dlq.count(settings)
        listed = {id_of(envelope) for envelope in dlq.read(settings)}
        dry = dlq.replay(settings, dry_run=True)
        purge = dlq.purge(settings, dry_run=True, confirm=lambda n: False)
    after = dlq.count(settings)  # the consumer is gone, and what it held is back

    held_ids = {id_of(jsonutil.loads(message.body)) for message in held}
    assert listed == ids - held_ids and len(held_ids) == 2
    assert (counts.total, counts.other_consumers, counts.as_dict()["other_consumers"]) == (3, 1, 1)
    assert counts.table().splitlines()[1] == "1 other consumer of the queue held dead letters not counted"
    assert str(dry).endswith("; 1 other consumer of the queue held dead letters not read")
    assert str(purge) == "would purge 3, left 0; 1 other consumer of the queue held dead letters not read"
    assert "still has 1 consumers after 0.5 s: another client holds dead letters" in caplog.text
    assert (after.total, after.other_consumers) == (5, 0)
    assert {id_of(envelope) for envelope in dlq.read(settings)} == ids
