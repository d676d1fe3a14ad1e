"""The event loop's background publisher: groups handed over, results back on the loop.

A fake :class:`Publisher` stands for the broker (it confirms, refuses some messages, or does not
answer); ``call_soon`` records what would run on the loop, and the test runs it. Waits block on
the publisher's own results, with deadlines: nothing sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from worker.broker.background import BackgroundPublisher
from worker.broker.publisher import Outgoing
from worker.errors import PublishError

pytestmark = pytest.mark.timeout(30)


class FakePublisher:
    """Publishes by calling ``answer(messages)``; records every group it was asked to publish."""

    heartbeat = 0.0

    def __init__(self, answer: Callable[[Sequence[Outgoing]], None] = lambda messages: None) -> None:
        self.answer = answer
        self.groups: list[list[bytes]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.closed = False

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.gate.wait(10)
        self.groups.append([m.body for m in messages])
        self.answer(messages)

    def keep_alive(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def message(body: bytes) -> Outgoing:
    return Outgoing("q", body)


class Loop:
    """What ``call_soon`` schedules, run when the test says (the event loop's turn)."""

    def __init__(self) -> None:
        self.scheduled: list[Callable[[], None]] = []
        self.lock = threading.Lock()
        #: Set when something was scheduled (what the hub's waker does for the real loop).
        self.woken = threading.Event()

    def call_soon(self, fn: Callable[[], None]) -> None:
        with self.lock:
            self.scheduled.append(fn)
        self.woken.set()

    def run(self) -> None:
        with self.lock:
            todo, self.scheduled = self.scheduled, []
        for fn in todo:
            fn()


def test_results_come_back_through_call_soon_and_groups_waiting_share_one_round_trip() -> None:
    fake = FakePublisher()
    fake.gate.clear()  # the broker is slow: the groups pile up behind the first one
    loop = Loop()
    results: list[tuple[str, Any]] = []
    background = BackgroundPublisher(fake, call_soon=loop.call_soon)  # type: ignore[arg-type]
    for name in ("a", "b", "c"):
        background.submit([message(name.encode())], lambda error, n=name: results.append((n, error)))
    assert background.pending == 3 and results == []
    fake.gate.set()
    assert background.drain(10)  # runs the callbacks here (as on a warm shutdown)
    assert sorted(results) == [("a", None), ("b", None), ("c", None)]
    assert len(fake.groups) <= 2 and sorted(b for g in fake.groups for b in g) == [b"a", b"b", b"c"]
    background.close()
    assert fake.closed


def test_a_group_refused_among_others_is_tried_alone_so_only_it_hears_of_it() -> None:
    def answer(messages: Sequence[Outgoing]) -> None:
        if any(m.body == b"too-big" for m in messages):
            raise PublishError("over max_message_size", too_large=100)

    fake = FakePublisher(answer)
    fake.gate.clear()
    loop = Loop()
    results: dict[str, PublishError | None] = {}
    background = BackgroundPublisher(fake, call_soon=loop.call_soon)  # type: ignore[arg-type]
    for body in (b"ok-1", b"too-big", b"ok-2"):
        background.submit([message(body)], lambda error, b=body: results.__setitem__(b.decode(), error))
    fake.gate.set()
    assert background.drain(10)
    assert results["ok-1"] is None and results["ok-2"] is None
    error = results["too-big"]
    assert isinstance(error, PublishError) and error.too_large == 100
    background.close()


def test_when_the_broker_does_not_answer_every_group_waiting_is_told_at_once() -> None:
    attempts: list[int] = []

    def answer(messages: Sequence[Outgoing]) -> None:
        attempts.append(len(messages))
        raise PublishError("could not publish: ConnectionRefusedError")

    fake = FakePublisher(answer)
    fake.gate.clear()
    background = BackgroundPublisher(fake, call_soon=Loop().call_soon)  # type: ignore[arg-type]
    errors: list[PublishError | None] = []
    for body in (b"1", b"2", b"3"):
        background.submit([message(body)], errors.append)
    fake.gate.set()
    assert background.drain(10)
    assert len(errors) == 3 and all(isinstance(e, PublishError) for e in errors)
    assert len(attempts) <= 2  # not once more per group: a dead broker must not cost each its own timeout
    background.close()


def test_callbacks_run_on_the_loop_only_when_it_runs_them() -> None:
    loop = Loop()
    background = BackgroundPublisher(FakePublisher(), call_soon=loop.call_soon)  # type: ignore[arg-type]
    done = threading.Event()
    results: list[PublishError | None] = []
    background.submit([message(b"x")], lambda error: (results.append(error), done.set()))
    assert loop.woken.wait(10)  # the thread scheduled the result on the loop...
    assert results == []  # ... and did not run it on its own thread
    loop.run()
    assert results == [None] and background.pending == 0
    background.close()
