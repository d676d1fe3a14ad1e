"""The ingest bootstep takes messages only once the event loop runs.

Celery starts the consumer's steps one after the other, and the ones after this step make broker
calls (declaring each account's upload queues, remote control, events). While py-amqp waits for
their answers it delivers whatever arrived for every consumer already consuming: a backlog would
flow into the pipeline before the event loop runs, whose hand-offs cannot report back until it
does. Thousands of messages were then held (the prefetch window filled, batches were cut small)
and a worker with two accounts and a backlog took 16 s to become ready.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Consumer

from config.settings import Settings
from worker.ingest.step import IngestStep
from worker.runtime import Runtime, build_runtime


class Hub:
    """The event loop's ``call_soon``, run by hand."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.pending.append((callback, args))

    def turn(self) -> None:
        pending, self.pending = self.pending, []
        for callback, args in pending:
            callback(*args)


class Timer:
    def call_repeatedly(self, interval: float, callback: Callable[[], None]) -> Any:
        return SimpleNamespace(cancel=lambda: None)


class RecordingStep(IngestStep):
    """The real step, noting each time one of its consumers starts consuming."""

    consumed: list[str]

    def get_consumers(self, channel: Any) -> list[Consumer]:
        consumers = super().get_consumers(channel)
        for consumer in consumers:
            start = consumer.consume

            def consume(*args: Any, _start: Callable[..., Any] = start, **kwargs: Any) -> None:
                self.consumed.append("consume")
                _start(*args, **kwargs)

            consumer.consume = consume  # type: ignore[method-assign]
        return consumers


@pytest.fixture
def worker() -> Iterator[tuple[RecordingStep, Any, Runtime]]:
    app = Celery("test-ingest-step", set_as_current=False)
    runtime = build_runtime(app, Settings.from_env({"NETCORE_API_KEY": "k", "CELERY_BROKER_URL": "memory://"}))
    app.runtime = lambda: runtime  # type: ignore[attr-defined]
    with Connection("memory://") as connection:
        c = SimpleNamespace(app=app, hub=Hub(), timer=Timer(), connection=connection)
        step = RecordingStep(c)
        step.consumed = []
        try:
            yield step, c, runtime
        finally:
            runtime.close_background()
            runtime.publishers.close()


def test_consuming_starts_on_the_event_loops_first_turn_not_during_start_up(
        worker: tuple[RecordingStep, Any, Runtime]) -> None:
    step, c, _ = worker
    step.start(c)
    assert step.consumed == []  # the steps after this one may talk to the broker: nothing is taken meanwhile
    c.hub.turn()
    assert step.consumed == ["consume"]


def test_a_step_stopped_before_the_loop_ran_never_starts_consuming(worker: tuple[RecordingStep, Any, Runtime]) -> None:
    step, c, _ = worker
    step.start(c)
    step.stop(c)
    c.hub.turn()
    assert step.consumed == []
