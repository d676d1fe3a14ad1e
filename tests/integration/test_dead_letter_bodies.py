"""Every body is kept whole in the dead-letter queue, and the dead-letter command takes it right.

A real worker writes the dead letters (RabbitMQ, the sandbox over HTTP); ``python -m worker.deadletter.cli``'s
functions (and, for a fresh deployment, the command itself) read them back from the same broker.
Nothing sleeps: the dead letters are seen arriving by a consumer that acknowledges none of them
(closing its channel puts every one back, in order), the sandbox and the worker's output are
waited on with deadlines.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import amqp
import pytest
from kombu import Connection

from config.settings import Settings
from tests.harness import ROOT, QueueSet, event, event_id_of, publish_events, publish_raw, require_broker
from tests.integration.test_quorum import QUORUM, die_holding_it
from worker.broker.topology import Topology
from worker.deadletter import cli as dlq
from worker.deadletter import envelopes as deadletter
from worker.deadletter.reader import Letters
from worker.events.parsing import MAX_EVENTS_PER_MESSAGE
from worker.sandbox import Sandbox

#: Seconds the worker has to write its dead letters.
DEAD_LETTER_TIMEOUT = 60.0


def hold_until(queue: str, count: int, timeout: float = DEAD_LETTER_TIMEOUT, *, broker_url: str) -> int:
    """Block until ``count`` messages have arrived in ``queue``; leave them all there.

    A consumer that acknowledges nothing sees each one come; closing its channel hands every
    one back to its place. Returns how many came before the deadline.
    """
    seen = 0

    def arrived(message: amqp.Message) -> None:
        nonlocal seen
        seen += 1

    with Connection(broker_url, heartbeat=0) as connection:
        channel = connection.channel()
        channel.basic_consume(queue, no_ack=False, callback=arrived)
        deadline = time.monotonic() + timeout
        while seen < count and (remaining := deadline - time.monotonic()) > 0:
            try:
                connection.drain_events(timeout=remaining)
            except socket.timeout:
                break
        channel.close()
    return seen


def bodies_of(envelopes: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bytes | None]]:
    """(first envelope, whole body kept) of each dead letter listed, the parts of a body joined
    as the dead-letter command joins them."""
    return [(letter.envelope, letter.body()) for letter in Letters(enumerate(envelopes))]


def big_unreadable_body() -> bytes:
    """Over :data:`~worker.deadletter.PART_BYTES`: two-byte characters across the cut between
    parts, a Latin-1 byte (so not UTF-8: ``malformed``) near its end, and not JSON either."""
    head = b'{"asset_id": "asset-1", "blob": "'
    head += b"x" * ((deadletter.PART_BYTES - len(head)) % 2 == 0)  # the cut falls inside an "é"
    body = head + "é".encode() * (deadletter.PART_BYTES // 2 + 300_000) + b" caf\xe9 \\xe9"
    assert len(body) > deadletter.PART_BYTES and body[deadletter.PART_BYTES] & 0xC0 == 0x80
    return body


def test_unreadable_bodies_are_kept_whole_and_only_objects_are_replayed(
    start_worker, queues: QueueSet, sandbox: Sandbox
) -> None:
    settings = queues.settings
    array = [event(f"a{n}") for n in range(MAX_EVENTS_PER_MESSAGE + 2_000)]
    array_body = json.dumps(array, indent=1).encode()  # not compact: byte for byte is the point
    big = big_unreadable_body()
    publish_raw(settings.queue, [array_body, big])
    publish_events(settings.queue, [[event("n1"), 7], event("plain")])  # 7: an array item that is not an object
    sent = {event_id_of(e) for e in array} | {"n1", "plain"}

    worker = start_worker()
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 2, timeout=DEAD_LETTER_TIMEOUT), worker.log()[-3000:]
    letters = -(-len(array_body) // deadletter.PART_BYTES) + 2 + 1  # the array's parts, the big body's 2, the 7
    assert hold_until(settings.dead_letter_queue, letters, broker_url=queues.broker_url) == letters
    worker.terminate()

    listed = dlq.read(settings)
    kept = {body: envelope for envelope, body in bodies_of(listed)}
    assert kept[array_body]["details"]["problem"] == "too_many_events"  # all of it, not its first 1,000,000 bytes
    assert kept[big]["details"]["problem"] == "not_utf8"
    parts = [envelope for envelope in listed if envelope.get("part", {}).get("size") == len(big)]
    assert [p["part"]["number"] for p in parts] == [1, 2] and len({p["part"]["id"] for p in parts}) == 1
    assert "raw_base64" not in parts[0] and "raw_base64" in parts[1]  # no character cut; the Latin-1 byte
    assert deadletter.join(parts) == big and parts[0]["error"] == parts[1]["error"]
    item = next(envelope for envelope in listed if envelope["event"] == 7)
    assert item["reason"] == "invalid"

    counts = dlq.count(settings)
    dry = dlq.replay(settings, dry_run=True)
    report = dlq.replay(settings)

    assert (counts.total, counts.by_reason) == (3, {"malformed": 2, "invalid": 1})  # the big body once
    assert counts.not_replayable == dry.not_replayable == report.not_replayable == 3
    assert (dry.replayed, report.replayed, report.left) == (0, 0, 3)
    assert queues.depth(settings.queue) == 0  # the 7 was not sent back to become malformed
    assert dlq.read(settings) == listed  # every dead letter still there, in order
    delivered = {event_id_of(e) for e in sandbox.accepted()}
    dead_ids = {event_id_of(e) for e in json.loads(array_body)}
    assert delivered == {"n1", "plain"} and delivered | dead_ids == sent and not delivered & dead_ids


@pytest.mark.quorum
def test_a_poison_message_is_replayed_as_the_bytes_it_was(
    start_worker, queues: QueueSet, sandbox: Sandbox
) -> None:
    env = {**queues.env, "ACTIVITY_QUEUE_TYPE": "quorum"}
    settings = Settings.from_env(env, require_api=False)
    # one event, spaced and with 250.10 as written: re-encoding it would change its bytes
    body = json.dumps(event("poison"), indent=2).replace('"total": 2', '"total": 250.10').encode()
    topology = Topology.of(settings)
    publish_raw(topology.quarantine, [body], headers={"x-suspect-deliveries": 3},
                queue_arguments=topology.quarantine_queue().queue_arguments)
    assert die_holding_it(queues, quarantine=True) + die_holding_it(queues, quarantine=True) == [0, 1]
    publish_events(settings.queue, [event("after")], queue_arguments=QUORUM)

    worker = start_worker(ACTIVITY_QUEUE_TYPE="quorum", ACTIVITY_DELIVERY_LIMIT=3)
    assert hold_until(settings.dead_letter_queue, 1, broker_url=queues.broker_url) == 1
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 1, timeout=DEAD_LETTER_TIMEOUT)
    worker.terminate()
    ((dead, kept),) = bodies_of(dlq.read(settings))
    assert (dead["reason"], kept) == ("poison", body)

    dry = dlq.replay(settings, reasons=["poison"], dry_run=True)
    report = dlq.replay(settings, reasons=["poison"])

    assert dlq.count(settings).total == 0 and dry.replayed == report.replayed == 1 and report.left == 0
    with Connection(queues.broker_url, heartbeat=0) as connection:
        channel = connection.channel()
        replayed = channel.basic_get(settings.queue, no_ack=False)
        assert replayed is not None and replayed.body == body  # byte for byte
        assert replayed.headers[dlq.REPLAYS_HEADER] == 1
        channel.basic_reject(replayed.delivery_tag, requeue=True)  # for the worker, below
    start_worker(ACTIVITY_QUEUE_TYPE="quorum", ACTIVITY_DELIVERY_LIMIT=3)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 2, timeout=DEAD_LETTER_TIMEOUT)
    assert sorted(event_id_of(e) for e in sandbox.accepted()) == ["after", "poison"]  # every id accounted for


def test_a_fresh_deployment_has_no_dead_letters_yet() -> None:
    """Before any worker ran, the command says so, exits 0, and does not create the queue."""
    require_broker()
    fresh = QueueSet()  # never declared
    env = {**os.environ, **fresh.env, "PYTHONPATH": str(ROOT)}
    queue = fresh.settings.dead_letter_queue

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "worker.deadletter.cli", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)

    try:
        table, as_json, listed = run("count"), run("count", "--json"), run("list")
    finally:
        check = fresh.broker_url

    for done in (table, as_json, listed):
        assert done.returncode == 0, done.stderr
        assert f"no dead letters yet: there is no queue {queue!r}" in done.stderr
        assert "The worker creates it when it starts" in done.stderr and "ACTIVITY_DEAD_LETTER_QUEUE" in done.stderr
    assert table.stdout == "dead letters: 0 (not replayable: 0)\n" and listed.stdout == ""
    assert json.loads(as_json.stdout)["total"] == 0
    try:
        with Connection(check, heartbeat=0) as connection, pytest.raises(amqp.exceptions.NotFound):
            connection.channel().queue_declare(queue, passive=True)  # still not there
    finally:
        fresh.delete()
