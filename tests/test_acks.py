"""Acker: the complete prefix of a channel's delivery tags, acknowledged with one frame;
stragglers (complete, but behind an incomplete older message for a whole tick) one by one.

No broker: the ack function records ``(delivery_tag, multiple)`` calls, and :class:`Channel`
applies them as RabbitMQ does, refusing a tag that is not outstanding (PRECONDITION_FAILED
closes the channel, even with ``multiple``).
"""

from __future__ import annotations

import random

import pytest

from worker.ingest.acks import MAX_ACK_ALONE_DEPTH, Acker

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """Stands in for ``channel.basic_ack``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, delivery_tag: int, multiple: bool) -> None:
        self.calls.append((delivery_tag, multiple))


class Channel:
    """RabbitMQ's side of ``basic.ack``: the outstanding delivery tags of one channel."""

    def __init__(self) -> None:
        self.outstanding: set[int] = set()
        self.complete: set[int] = set()
        self.calls: list[tuple[int, bool]] = []
        #: For each ack without ``multiple``: the older deliveries RabbitMQ walks past to find it.
        self.depths: list[int] = []

    def deliver(self, tag: int) -> None:
        self.outstanding.add(tag)

    def __call__(self, delivery_tag: int, multiple: bool) -> None:
        self.calls.append((delivery_tag, multiple))
        assert delivery_tag in self.outstanding, f"unknown delivery tag {delivery_tag}"
        acked = {t for t in self.outstanding if t <= delivery_tag} if multiple else {delivery_tag}
        if not multiple:
            self.depths.append(sum(1 for t in self.outstanding if t < delivery_tag))
        early = acked - self.complete
        assert not early, f"acknowledged before their message was complete: {sorted(early)}"
        self.outstanding -= acked


def make(tags: range | list[int] = range(0)) -> tuple[Acker, Recorder]:
    acks = Recorder()
    acker = Acker(acks)
    for tag in tags:
        acker.received(tag)
    return acker, acks


def covered(calls: list[tuple[int, bool]], tags: list[int]) -> dict[int, int]:
    """For each tag, how many ack frames cover it (multiple=True covers every older tag)."""
    counts = dict.fromkeys(tags, 0)
    previous = 0
    for tag, multiple in calls:
        if multiple:
            for t in tags:
                if previous < t <= tag:
                    counts[t] += 1
        else:
            counts[tag] = counts.get(tag, 0) + 1
        previous = max(previous, tag)
    return counts


# --- in order -------------------------------------------------------------------------------


def test_in_order_completion_acks_each_at_once_with_multiple() -> None:
    acker, acks = make(range(1, 4))
    acker.complete(1)
    assert acks.calls == [(1, True)]
    acker.complete(2)
    assert acks.calls == [(1, True), (2, True)]
    acker.complete(3)
    assert acks.calls == [(1, True), (2, True), (3, True)]
    assert acker.frames == 3
    assert acker.outstanding == 0


def test_a_message_completed_as_soon_as_received_is_acked_alone() -> None:
    acker, acks = make()
    for tag in (1, 2, 3):
        acker.received(tag)
        acker.complete(tag)
    assert acks.calls == [(1, True), (2, True), (3, True)]


# --- out of order ---------------------------------------------------------------------------


def test_out_of_order_completion_waits_then_one_ack_covers_the_prefix() -> None:
    acker, acks = make(range(1, 6))
    acker.complete(3)
    acker.complete(2)
    acker.complete(5)
    assert acks.calls == []  # 1 is not complete: nothing can be acknowledged
    assert acker.outstanding == 5

    acker.complete(1)
    assert acks.calls == [(3, True)]  # 1, 2, 3 in one frame; 4 is not complete, 5 waits
    assert acker.outstanding == 2

    acker.complete(4)
    assert acks.calls == [(3, True), (5, True)]
    assert acker.outstanding == 0
    assert acker.frames == 2


def test_completing_a_later_tag_does_not_ack_an_older_incomplete_one() -> None:
    acker, acks = make(range(1, 4))
    acker.complete(2)
    acker.complete(3)
    assert acks.calls == []
    acker.complete(1)
    assert acks.calls == [(3, True)]


def test_tags_need_not_be_contiguous() -> None:
    acker, acks = make([4, 9, 10, 30])
    acker.complete(9)
    acker.complete(4)
    assert acks.calls == [(9, True)]
    acker.complete(30)
    acker.complete(10)
    assert acks.calls == [(9, True), (30, True)]


# --- outstanding and forget -----------------------------------------------------------------


def test_outstanding_counts_received_and_not_yet_acknowledged() -> None:
    acker, _ = make()
    assert acker.outstanding == 0
    for tag in range(1, 6):
        acker.received(tag)
    assert acker.outstanding == 5
    acker.complete(4)  # complete, but waits behind 1..3: still outstanding
    assert acker.outstanding == 5
    acker.complete(1)
    assert acker.outstanding == 4
    acker.complete(2)
    acker.complete(3)
    assert acker.outstanding == 1  # 5 is left
    acker.complete(5)
    assert acker.outstanding == 0


def test_forget_drops_every_tag_and_acks_nothing() -> None:
    acker, acks = make(range(1, 5))
    acker.complete(2)
    acker.complete(3)
    acker.forget()
    assert acker.outstanding == 0
    assert acks.calls == []

    # A new channel starts its tags again; the old completions must not leak into it.
    for tag in (1, 2, 3):
        acker.received(tag)
    acker.complete(1)
    assert acks.calls == [(1, True)]  # not (3, True): 2 and 3 of the old channel are gone
    acker.complete(3)
    assert acks.calls == [(1, True)]
    acker.complete(2)
    assert acks.calls == [(1, True), (3, True)]
    assert acker.outstanding == 0


# --- property: any completion order ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_any_completion_order_covers_every_tag_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 300)
    tags = list(range(1, n + 1))
    acker, acks = make(tags)
    order = tags[:]
    rng.shuffle(order)
    for i, tag in enumerate(order, 1):
        acker.complete(tag)
        # Invariant: what is acknowledged is exactly the longest complete prefix.
        done = set(order[:i])
        prefix = 0
        while prefix + 1 in done:
            prefix += 1
        acked = acks.calls[-1][0] if acks.calls else 0
        assert acked == prefix
        assert acker.outstanding == n - prefix

    assert all(multiple for _, multiple in acks.calls)
    frame_tags = [tag for tag, _ in acks.calls]
    assert frame_tags == sorted(set(frame_tags))  # strictly increasing
    assert frame_tags[-1] == n
    assert len(acks.calls) <= n
    assert acker.frames == len(acks.calls)
    assert covered(acks.calls, tags) == dict.fromkeys(tags, 1)
    assert acker.outstanding == 0


def test_reverse_order_needs_a_single_frame() -> None:
    n = 1000
    acker, acks = make(range(1, n + 1))
    for tag in range(n, 0, -1):
        acker.complete(tag)
    assert acks.calls == [(n, True)]


# --- stragglers -------------------------------------------------------------------------------


def test_a_straggler_is_acked_alone_after_waiting_a_whole_tick() -> None:
    acker, acks = make(range(1, 4))
    acker.complete(2)
    assert acker.ack_stragglers() == 0  # it waited part of a tick only
    assert acks.calls == []
    assert acker.ack_stragglers() == 1
    assert acks.calls == [(2, False)]
    assert acker.outstanding == 2  # 1 and 3
    assert acker.ack_stragglers() == 0  # never twice
    assert acks.calls == [(2, False)]


def test_the_prefix_ack_after_stragglers_never_names_an_acked_tag() -> None:
    acker, acks = make(range(1, 5))
    acker.complete(2)
    acker.ack_stragglers()
    acker.ack_stragglers()
    assert acks.calls == [(2, False)]
    acker.complete(1)
    assert acks.calls == [(2, False), (1, True)]  # 2 is already acked: the frame stops at 1
    acker.complete(4)
    acker.complete(3)
    assert acks.calls == [(2, False), (1, True), (4, True)]
    assert acker.outstanding == 0


def test_stragglers_are_acked_in_tag_order() -> None:
    acker, acks = make(range(1, 8))
    for tag in (6, 3, 5):
        acker.complete(tag)
    acker.ack_stragglers()
    acker.complete(7)  # completes during the tick: waits for the next one
    acker.ack_stragglers()
    assert acks.calls == [(3, False), (5, False), (6, False)]
    acker.ack_stragglers()
    assert acks.calls[-1] == (7, False)
    assert acker.outstanding == 3  # 1, 2 and 4
    acker.complete(1)
    acker.complete(2)
    acker.complete(4)
    assert acks.calls[-3:] == [(1, True), (2, True), (4, True)]
    assert acker.outstanding == 0


def test_a_message_completed_before_the_straggler_tick_is_acked_with_its_prefix() -> None:
    acker, acks = make(range(1, 4))
    acker.complete(2)
    acker.complete(3)
    acker.ack_stragglers()  # 2 and 3 waited part of a tick
    acker.complete(1)
    assert acks.calls == [(3, True)]
    assert acker.ack_stragglers() == 0
    assert acker.ack_stragglers() == 0
    assert acks.calls == [(3, True)]


def test_a_straggler_deep_in_the_window_waits_for_the_prefix_ack() -> None:
    """RabbitMQ finds the tag of an ack without ``multiple`` by walking every older
    unacknowledged delivery of the channel, so a message behind more than
    MAX_ACK_ALONE_DEPTH of them is left to the prefix ack, which costs it nothing extra."""
    depth = MAX_ACK_ALONE_DEPTH
    channel = Channel()
    acker = Acker(channel)
    for tag in range(1, depth + 4):
        channel.deliver(tag)
        acker.received(tag)
    shallow, deep = depth + 1, depth + 3  # behind 1..depth; behind those and depth + 2
    for tag in (deep, shallow):
        channel.complete.add(tag)
        acker.complete(tag)
    assert acker.ack_stragglers() == 0  # they waited part of a tick only
    assert acker.ack_stragglers() == 1
    assert acker.ack_stragglers() == 0  # deep still waits, tick after tick
    assert channel.calls == [(shallow, False)]
    assert channel.depths == [depth]
    assert acker.outstanding == depth + 2

    for tag in [*range(1, depth + 1), depth + 2]:
        channel.complete.add(tag)
        acker.complete(tag)
    assert channel.calls[-1] == (deep, True)  # the prefix ack takes it along
    assert channel.outstanding == set()
    assert acker.outstanding == 0


def test_forget_drops_stragglers_too() -> None:
    acker, acks = make(range(1, 4))
    acker.complete(2)
    acker.ack_stragglers()
    acker.complete(3)
    acker.forget()
    assert acker.ack_stragglers() == 0
    assert acker.ack_stragglers() == 0
    assert acks.calls == []
    assert acker.outstanding == 0


@pytest.mark.parametrize("seed", range(40))
def test_any_order_with_ticks_acks_every_tag_once_and_never_early(seed: int) -> None:
    """Random arrivals, completions and ticks against RabbitMQ's rules: no frame names a tag
    already acknowledged (or never delivered), no message is acknowledged before it is
    complete, and in the end every tag is acknowledged."""
    rng = random.Random(1000 + seed)
    n = rng.randint(1, 300)
    max_depth = rng.choice([0, 1, 3, 20, MAX_ACK_ALONE_DEPTH])
    channel = Channel()
    acker = Acker(channel, max_depth=max_depth)
    received: list[int] = []
    incomplete: list[int] = []
    next_tag = 1
    while next_tag <= n or incomplete:
        roll = rng.random()
        if next_tag <= n and (roll < 0.4 or not incomplete):
            channel.deliver(next_tag)
            acker.received(next_tag)
            received.append(next_tag)
            incomplete.append(next_tag)
            next_tag += 1
        elif roll < 0.85:
            tag = incomplete.pop(rng.randrange(len(incomplete)))
            channel.complete.add(tag)
            acker.complete(tag)
        else:
            acker.ack_stragglers()
        assert acker.outstanding == len(channel.outstanding)
    acker.ack_stragglers()
    acker.ack_stragglers()
    assert channel.outstanding == set()
    assert acker.outstanding == 0
    assert acker.frames == len(channel.calls) <= n
    multiple = [tag for tag, many in channel.calls if many]
    assert multiple == sorted(set(multiple))
    assert max(channel.depths, default=0) <= max_depth
