"""The issue's acceptance run: 5,000 valid events over 7 asset_ids mixed with bad ones.

Every valid event is delivered, every upload holds at most 1000 events of one asset_id, and
every other event is in the dead-letter queue with its reason and original event.
"""

from __future__ import annotations

import random
from collections import Counter

from tests.harness import DeadLetters, QueueSet, event, event_id_of, publish_events, publish_raw
from worker.sandbox import Sandbox

ASSETS = [f"asset-{n}" for n in range(7)]


def test_mixed_traffic_ledger(start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters) -> None:
    rng = random.Random(2026)
    valid = [event(f"v{i}", asset_id=rng.choice(ASSETS)) for i in range(5000)]
    invalid = [
        event(f"i{i}", **{k: v})
        for i, (k, v) in enumerate(
            [("activity_source", "WEB"), ("timestamp", "2021-02-30T10:00:00Z"), ("activity_params", [])] * 20
        )
    ]
    rejected = [event(f"j{i}", asset_id=rng.choice(ASSETS)) for i in range(10)]
    for e in rejected:
        e["activity_params"]["sandbox_reject"] = True
    malformed = [b"{oops", b"null", b"\xc3\x28", b"[1, 2", b"[]"]

    mixed = valid + invalid + rejected
    rng.shuffle(mixed)
    payloads: list = []
    while mixed:  # single events and arrays of up to 50
        take = rng.choice([1, 1, 1, 50])
        chunk, mixed = mixed[:take], mixed[take:]
        payloads.append(chunk[0] if take == 1 else chunk)
    publish_events(queues.settings.queue, payloads)
    publish_raw(queues.settings.queue, malformed)

    start_worker()
    expected_dead = len(invalid) + len(rejected) + len(malformed)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= len(valid), timeout=120)
    assert dead_letters.wait_for(expected_dead, timeout=60)
    dead_letters.settle(quiet=1.0)

    delivered = Counter(event_id_of(e) for e in sandbox.accepted())
    assert delivered == Counter(event_id_of(e) for e in valid)  # each valid event exactly once
    for record in sandbox.requests():
        assert record.events <= 1000 and len(set(record.asset_ids)) == 1
    assert sandbox.dropped() == []  # nothing the API would silently drop was sent
    reasons = Counter(e["reason"] for e in dead_letters.envelopes)
    assert reasons == {"invalid": len(invalid), "rejected": len(rejected), "malformed": len(malformed)}
    dead_ids = Counter(dead_letters.ids())
    assert dead_ids == Counter([event_id_of(e) for e in invalid + rejected] + [None] * len(malformed))
    originals = {event_id_of(e): e for e in invalid + rejected}
    for envelope in dead_letters.envelopes:
        if envelope["event"] is not None:
            assert envelope["event"] == originals[event_id_of(envelope["event"])]
            assert envelope["error"] and envelope["failed_at"].endswith("Z")
    uploads = [r for r in sandbox.requests() if r.status == 200]
    print(
        f"\nmixed traffic: {len(valid)} delivered in {len(uploads)} uploads "
        f"(mean {len(valid) / len(uploads):.0f} events), {len(sandbox.requests())} requests in all; "
        f"dead-lettered {dict(reasons)}"
    )
