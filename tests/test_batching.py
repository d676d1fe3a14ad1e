"""Batching rules: full, too big, old enough, backpressure, shutdown; and when messages are acked.

Pure bookkeeping, so every test drives a :class:`ManualClock` and never sleeps.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from worker.clock import ManualClock
from worker.ingest.batching import Batch, Batcher, Ticket

pytestmark = pytest.mark.timeout(30)

BIG = 1 << 40  # a limit that never triggers


class Acks:
    """Counts acknowledgements per message."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()

    def ticket(self, name: str) -> Ticket:
        return Ticket(lambda: self.count.update([name]))


def make(
    clock: ManualClock | None = None,
    *,
    max_events: int = 1000,
    max_wait: float = 2.0,
    max_bytes: int = BIG,
    max_buffered: int = BIG,
) -> Batcher:
    return Batcher(
        max_events=max_events,
        max_wait=max_wait,
        max_bytes=max_bytes,
        max_buffered=max_buffered,
        clock=clock or ManualClock(),
    )


def ev(asset: str, n: int) -> dict[str, Any]:
    return {"asset_id": asset, "n": n}


def noop_ticket() -> Ticket:
    return Ticket(lambda: None)


# --- full batches -------------------------------------------------------------------------


def test_flushes_exactly_at_max_events_1000() -> None:
    batcher = make(max_events=1000)
    ticket = noop_ticket()
    for i in range(999):
        assert batcher.add("a", ev("a", i), 10, ticket) == []
    assert batcher.buffered == 999
    ready = batcher.add("a", ev("a", 999), 10, ticket)
    assert len(ready) == 1
    batch = ready[0]
    assert isinstance(batch, Batch)
    assert batch.asset_id == "a"
    assert len(batch) == 1000
    assert [e["n"] for e in batch.events] == list(range(1000))
    assert batcher.buffered == 0
    assert batcher.next_due() is None
    # the next event opens a fresh batch
    assert batcher.add("a", ev("a", 1000), 10, ticket) == []
    assert batcher.buffered == 1


def test_max_events_one_releases_every_event_at_once() -> None:
    batcher = make(max_events=1)
    ticket = noop_ticket()
    for i in range(5):
        ready = batcher.add("a" if i % 2 else "b", ev("x", i), 10, ticket)
        assert len(ready) == 1
        assert ready[0].events == [ev("x", i)]
        assert batcher.buffered == 0
    assert batcher.drain() == []


# --- bytes ----------------------------------------------------------------------------------


def test_flushes_when_one_more_event_would_pass_max_bytes() -> None:
    # a batch costs 2 bytes of brackets plus, per event, its size and one separator
    batcher = make(max_bytes=2 + 3 * (100 + 1))
    ticket = noop_ticket()
    for i in range(3):
        assert batcher.add("a", ev("a", i), 100, ticket) == []
    assert batcher.buffered == 3
    ready = batcher.add("a", ev("a", 3), 100, ticket)
    assert [len(b) for b in ready] == [3]
    assert [e["n"] for e in ready[0].events] == [0, 1, 2]
    assert ready[0].nbytes <= batcher.max_bytes
    # the event that did not fit starts the next batch
    assert batcher.buffered == 1
    (rest,) = batcher.drain()
    assert rest.events == [ev("a", 3)]


def test_event_that_fits_exactly_stays() -> None:
    batcher = make(max_bytes=2 + 2 * 101)
    ticket = noop_ticket()
    assert batcher.add("a", ev("a", 0), 100, ticket) == []
    assert batcher.add("a", ev("a", 1), 100, ticket) == []  # exactly max_bytes: fits
    assert batcher.buffered == 2
    assert len(batcher.add("a", ev("a", 2), 1, ticket)) == 1  # one byte more would not


def test_oversized_single_event_still_goes_out_alone() -> None:
    batcher = make(max_bytes=50)
    ticket = noop_ticket()
    assert batcher.add("a", ev("a", 0), 500, ticket) == []  # an empty batch takes anything
    ready = batcher.add("a", ev("a", 1), 10, ticket)
    assert [b.events for b in ready] == [[ev("a", 0)]]


def test_byte_limit_is_per_asset() -> None:
    batcher = make(max_bytes=2 + 2 * 101)
    ticket = noop_ticket()
    assert batcher.add("a", ev("a", 0), 100, ticket) == []
    assert batcher.add("b", ev("b", 0), 100, ticket) == []
    assert batcher.add("a", ev("a", 1), 100, ticket) == []
    assert batcher.add("b", ev("b", 1), 100, ticket) == []
    assert batcher.buffered == 4


# --- waiting ----------------------------------------------------------------------------------


def test_due_releases_only_after_max_wait() -> None:
    clock = ManualClock()
    batcher = make(clock, max_wait=2.0)
    batcher.add("a", ev("a", 0), 10, noop_ticket())
    assert batcher.due() == []
    assert batcher.next_due() == pytest.approx(2.0)
    clock.advance(1.999)
    assert batcher.due() == []
    assert batcher.next_due() == pytest.approx(0.001)
    clock.advance(0.001)  # exactly max_wait
    ready = batcher.due()
    assert [b.asset_id for b in ready] == ["a"]
    assert batcher.buffered == 0
    assert batcher.next_due() is None
    assert batcher.due() == []


def test_due_counts_from_the_oldest_event_not_the_newest() -> None:
    clock = ManualClock()
    batcher = make(clock, max_wait=2.0)
    batcher.add("a", ev("a", 0), 10, noop_ticket())
    clock.advance(1.5)
    batcher.add("a", ev("a", 1), 10, noop_ticket())  # does not restart the wait
    clock.advance(0.5)
    (batch,) = batcher.due()
    assert len(batch) == 2


def test_due_releases_every_open_batch_once_the_oldest_has_waited() -> None:
    clock = ManualClock()
    batcher = make(clock, max_wait=2.0)
    batcher.add("a", ev("a", 0), 10, noop_ticket())
    clock.advance(0.5)
    batcher.add("b", ev("b", 0), 10, noop_ticket())
    clock.advance(0.5)
    batcher.add("c", ev("c", 0), 10, noop_ticket())
    batcher.add("a", ev("a", 1), 10, noop_ticket())  # a is still the oldest batch
    clock.advance(0.999)
    assert batcher.due() == [] and batcher.next_due() == pytest.approx(0.001)
    clock.advance(0.001)  # a: 2.0, b: 1.5, c: 1.0
    assert [(b.asset_id, len(b)) for b in batcher.due()] == [("a", 2), ("b", 1), ("c", 1)]
    assert batcher.buffered == 0 and batcher.next_due() is None


def test_released_together_every_message_read_so_far_is_acknowledged() -> None:
    clock = ManualClock()
    batcher = make(clock, max_wait=2.0, max_events=2)
    acked: list[int] = []
    tickets = [Ticket(lambda n=n: acked.append(n)) for n in range(5)]  # type: ignore[misc]
    batcher.add("slow-1", ev("slow-1", 0), 10, tickets[0])
    clock.advance(1.0)
    full = batcher.add("busy", ev("busy", 0), 10, tickets[1]) + batcher.add("busy", ev("busy", 1), 10, tickets[2])
    batcher.add("slow-2", ev("slow-2", 0), 10, tickets[3])
    batcher.add("busy", ev("busy", 2), 10, tickets[4])
    for ticket in tickets:
        ticket.release()  # each message's own hold: all its events are added
    for batch in full:
        batch.handed_on()
    assert acked == [1, 2]  # complete, but on the channel behind 0, which waits in slow-1's batch
    clock.advance(1.0)  # slow-1 has waited 2 s; slow-2 and busy's second batch 1 s
    for batch in batcher.due():
        batch.handed_on()
    assert sorted(acked) == [0, 1, 2, 3, 4]  # slow-2 and the younger busy batch went too


def test_reopened_asset_is_released_with_the_rest() -> None:
    clock = ManualClock()
    batcher = make(clock, max_wait=2.0, max_events=2)
    batcher.add("a", ev("a", 0), 10, noop_ticket())
    clock.advance(0.5)
    batcher.add("b", ev("b", 0), 10, noop_ticket())
    assert len(batcher.add("a", ev("a", 1), 10, noop_ticket())) == 1  # a full, released
    clock.advance(0.5)
    batcher.add("a", ev("a", 2), 10, noop_ticket())  # a reopens, younger than b
    clock.advance(1.0)  # b: 1.5, a: 1.0
    assert batcher.due() == []
    assert batcher.next_due() == pytest.approx(0.5)
    clock.advance(0.5)
    assert [b.asset_id for b in batcher.due()] == ["b", "a"]


def test_next_due_is_zero_when_overdue_and_none_when_empty() -> None:
    clock = ManualClock()
    batcher = make(clock, max_wait=2.0)
    assert batcher.next_due() is None
    batcher.add("a", ev("a", 0), 10, noop_ticket())
    clock.advance(10)
    assert batcher.next_due() == 0.0


# --- per asset ---------------------------------------------------------------------------------


def test_seven_interleaved_assets_never_share_a_batch() -> None:
    assets = [f"asset-{i}" for i in range(7)]
    batcher = make(max_events=10)
    released: list[Batch] = []
    for n in range(7 * 25 + 3):
        asset = assets[n % 7]
        released += batcher.add(asset, ev(asset, n), 10, noop_ticket())
    released += batcher.drain()
    assert sum(len(b) for b in released) == 7 * 25 + 3
    for batch in released:
        assert len(batch) <= 10
        assert {e["asset_id"] for e in batch.events} == {batch.asset_id}
        numbers = [e["n"] for e in batch.events]
        assert numbers == sorted(numbers)  # arrival order kept within a batch
    assert {b.asset_id for b in released} == set(assets)


# --- backpressure, drain, discard --------------------------------------------------------------


def test_max_buffered_releases_the_oldest_batch() -> None:
    clock = ManualClock()
    batcher = make(clock, max_buffered=5)
    for i in range(3):
        assert batcher.add("a", ev("a", i), 10, noop_ticket()) == []
    clock.advance(0.1)
    for i in range(2):
        assert batcher.add("b", ev("b", i), 10, noop_ticket()) == []
    assert batcher.buffered == 5
    ready = batcher.add("c", ev("c", 0), 10, noop_ticket())
    assert [b.asset_id for b in ready] == ["a"]
    assert len(ready[0]) == 3
    assert batcher.buffered == 3
    ready = batcher.add("c", ev("c", 1), 10, noop_ticket())
    assert ready == []
    assert batcher.buffered == 4


def test_max_buffered_releases_as_many_batches_as_needed() -> None:
    batcher = make(max_buffered=3)
    for asset in "abc":
        batcher.add(asset, ev(asset, 0), 10, noop_ticket())
    ready = batcher.add("d", ev("d", 0), 10, noop_ticket())
    assert [b.asset_id for b in ready] == ["a"]
    assert batcher.buffered <= 3


def test_drain_releases_everything() -> None:
    batcher = make()
    for n in range(20):
        asset = "abcd"[n % 4]
        batcher.add(asset, ev(asset, n), 10, noop_ticket())
    batches = batcher.drain()
    assert [b.asset_id for b in batches] == list("abcd")
    assert sum(len(b) for b in batches) == 20
    assert batcher.buffered == 0
    assert batcher.drain() == []
    assert batcher.next_due() is None


def test_discard_forgets_everything_without_acking() -> None:
    acks = Acks()
    batcher = make()
    tickets = [acks.ticket(f"m{i}") for i in range(3)]
    for i, ticket in enumerate(tickets):
        for j in range(i + 1):
            batcher.add(f"a{j}", ev(f"a{j}", i), 10, ticket)
        ticket.release()
    assert batcher.discard() == 6
    assert batcher.buffered == 0
    assert batcher.drain() == []
    assert batcher.next_due() is None
    assert acks.count == Counter()
    assert batcher.discard() == 0


# --- tickets ------------------------------------------------------------------------------------


def test_ticket_without_events_acks_on_release() -> None:
    acks = Acks()
    ticket = acks.ticket("m")
    assert acks.count["m"] == 0
    ticket.release()
    assert acks.count["m"] == 1


def test_message_spanning_three_batches_acks_once_after_the_last() -> None:
    acks = Acks()
    batcher = make()
    ticket = acks.ticket("m")
    for asset in ("a", "b", "c"):
        assert batcher.add(asset, ev(asset, 0), 10, ticket) == []
    ticket.release()  # every event added
    assert acks.count["m"] == 0
    a, b, c = batcher.drain()
    b.handed_on()
    assert acks.count["m"] == 0
    c.handed_on()
    assert acks.count["m"] == 0
    a.handed_on()
    assert acks.count["m"] == 1


def test_message_batch_released_mid_message_waits_for_the_initial_hold() -> None:
    acks = Acks()
    batcher = make(max_events=2)
    ticket = acks.ticket("m")
    released: list[Batch] = []
    released += batcher.add("a", ev("a", 0), 10, ticket)
    released += batcher.add("a", ev("a", 1), 10, ticket)
    assert len(released) == 1
    released[0].handed_on()  # both events so far are safe, but the message is not done
    assert acks.count["m"] == 0
    released += batcher.add("a", ev("a", 2), 10, ticket)
    ticket.release()
    assert acks.count["m"] == 0
    (last,) = batcher.drain()
    last.handed_on()
    assert acks.count["m"] == 1


def test_every_event_of_a_message_handed_on_before_the_hold_is_released() -> None:
    acks = Acks()
    batcher = make(max_events=1)
    ticket = acks.ticket("m")
    for i in range(3):
        (batch,) = batcher.add("a", ev("a", i), 10, ticket)
        batch.handed_on()
        assert acks.count["m"] == 0
    ticket.release()  # only now is the message complete
    assert acks.count["m"] == 1


def test_batch_shared_by_several_messages_acks_each_once() -> None:
    acks = Acks()
    batcher = make()
    t1, t2 = acks.ticket("m1"), acks.ticket("m2")
    batcher.add("a", ev("a", 0), 10, t1)
    batcher.add("a", ev("a", 1), 10, t2)
    batcher.add("a", ev("a", 2), 10, t1)
    t1.release()
    t2.release()
    (batch,) = batcher.drain()
    batch.handed_on()
    assert acks.count == Counter({"m1": 1, "m2": 1})


# --- property ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_every_event_once_and_every_ticket_acked_once(seed: int) -> None:
    rng = random.Random(seed)
    clock = ManualClock()
    max_events = rng.choice([1, 2, 5, 17, 1000])
    batcher = make(
        clock,
        max_events=max_events,
        max_wait=rng.choice([0.5, 2.0]),
        max_bytes=rng.choice([300, 2_000, BIG]),
        max_buffered=rng.choice([3, 50, BIG]),
    )
    assets = [f"asset-{i}" for i in range(rng.randint(1, 9))]
    acks = Acks()
    released: list[Batch] = []
    sent: list[tuple[str, int]] = []
    handed: list[Batch] = []
    n = 0
    messages = rng.randint(1, 120)
    for m in range(messages):
        ticket = acks.ticket(f"m{m}")
        for _ in range(rng.randint(0, 12)):
            asset = rng.choice(assets)
            event = {"asset_id": asset, "n": n}
            sent.append((asset, n))
            n += 1
            released += batcher.add(asset, event, rng.randint(1, 120), ticket)
        ticket.release()
        if rng.random() < 0.3:
            clock.advance(rng.random())
            released += batcher.due()
        # hand on some of what was released so far, as the consumer would
        while released and rng.random() < 0.5:
            batch = released.pop(0)
            check_batch(batch, batcher)
            handed.append(batch)
            batch.handed_on()
    released += batcher.drain()
    for batch in released:
        check_batch(batch, batcher)
        handed.append(batch)
        batch.handed_on()
    got = [(e["asset_id"], e["n"]) for batch in handed for e in batch.events]
    assert sorted(got, key=lambda pair: pair[1]) == sent
    assert len(set(got)) == len(got)
    assert acks.count == Counter({f"m{m}": 1 for m in range(messages)})
    assert batcher.buffered == 0


def check_batch(batch: Batch, batcher: Batcher) -> None:
    assert 1 <= len(batch) <= batcher.max_events
    assert {e["asset_id"] for e in batch.events} == {batch.asset_id}
    assert len(batch.tickets) == len(batch.events)
    if len(batch) > 1:
        assert batch.nbytes <= batcher.max_bytes
