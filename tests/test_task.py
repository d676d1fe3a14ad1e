"""An upload's outcome the broker does not confirm: published again with a backoff, then as dead
letters of only what was not delivered, then requeued; never acknowledged unpublished.

The runtime is the real one (built from settings); its publishers are a fake broker that refuses
what the test says, and the backoff is zero: nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Reject

from config.settings import Settings
from worker.broker.messages import Bundle, UploadBatch, upload_message
from worker.broker.publisher import Outgoing
from worker.deadletter import envelopes
from worker.errors import PublishError
from worker.events import jsonutil
from worker.runtime import Runtime, build_runtime
from worker.upload.task import PUBLISH_ROUNDS, _settle

pytestmark = pytest.mark.timeout(30)

APP = Celery("test-task", set_as_current=False)


class Broker:
    """Publishes by recording; refuses the next ``refusals`` groups, or every group whose
    messages go to a queue in ``refusing``."""

    def __init__(self, refusals: int = 0, refusing: set[str] | None = None) -> None:
        self.refusals = refusals
        self.refusing = refusing or set()
        self.groups: list[list[Outgoing]] = []
        self.tries = 0

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.tries += 1
        if self.refusals > 0 or any(m.queue in self.refusing for m in messages):
            self.refusals -= 1
            raise PublishError("the broker did not confirm", messages=messages)
        self.groups.append(list(messages))


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    rt = build_runtime(APP, Settings.from_env({"NETCORE_API_KEY": "k"}))
    rt.outcome_backoff = (0.0, 0.0, 0.0)
    pool = rt.publishers
    yield rt
    pool.close()


def outcome(rt: Runtime) -> tuple[Bundle, list[Outgoing]]:
    """What delivering a bundle of 5 events left to publish: one rejected event's dead letter, and
    a retry of 3 others (the fifth was delivered)."""
    texts = [jsonutil.dumps({"asset_id": "a", "activity_params": {"n": n}}).decode() for n in range(5)]
    bundle = Bundle([UploadBatch("a", texts)], "default")
    letters = envelopes.DeadLetters(queue=rt.topology.dead_letter, clock=rt.lanes.get("default").delivery.clock)
    dead = letters.event(envelopes.REJECTED, "rejected", event=jsonutil.loads(texts[0]), asset_id="a")
    retry = upload_message(APP, rt.topology.delay_name(rt.topology.rungs[0]), Bundle([UploadBatch("a", texts[1:4])]))
    return bundle, [dead, retry]


def test_an_outcome_refused_a_few_times_is_published_again_on_the_tasks_thread(runtime: Runtime) -> None:
    broker = Broker(refusals=2)
    runtime.publishers = broker  # type: ignore[assignment]
    bundle, messages = outcome(runtime)
    _settle(runtime, "t1", bundle, messages, 0)
    assert broker.tries == 3 and broker.groups == [messages]
    assert "t1" not in runtime.unpublished


def test_retries_the_broker_will_not_take_go_to_the_dead_letter_queue_and_only_them(runtime: Runtime) -> None:
    bundle, messages = outcome(runtime)
    broker = Broker(refusing={messages[1].queue})  # the delay queue refuses; the dead-letter queue takes
    runtime.publishers = broker  # type: ignore[assignment]
    _settle(runtime, "t2", bundle, messages, 0)
    (group,) = broker.groups
    bodies = [jsonutil.loads(m.body) for m in group]
    assert all(m.queue == runtime.topology.dead_letter for m in group)
    assert [b["reason"] for b in bodies] == ["rejected", "unhandled", "unhandled", "unhandled"]
    assert sorted(b["event"]["activity_params"]["n"] for b in bodies) == [0, 1, 2, 3]  # not 4: it was delivered
    assert "t2" not in runtime.unpublished


def test_an_outcome_refused_everywhere_is_kept_and_requeued_then_set_aside_for_the_salvage(runtime: Runtime) -> None:
    bundle, messages = outcome(runtime)
    broker = Broker(refusals=10**6)
    runtime.publishers = broker  # type: ignore[assignment]
    for rounds in range(PUBLISH_ROUNDS - 1):
        with pytest.raises(Reject) as info:
            _settle(runtime, "t3", bundle, messages, rounds)
        assert info.value.requeue is True and runtime.unpublished["t3"][0] == rounds + 1
    with pytest.raises(Reject) as info:
        _settle(runtime, "t3", bundle, messages, PUBLISH_ROUNDS - 1)
    assert info.value.requeue is False  # down the dead-letter route, to the salvage
    letters = runtime.kept_outcome("t3")  # what the salvage writes when it runs in this process
    assert letters is not None and "t3" not in runtime.unpublished
    events = sorted(jsonutil.loads(m.body)["event"]["activity_params"]["n"] for m in letters)
    assert events == [0, 1, 2, 3]  # the delivered event is not written again


def test_a_salvage_of_a_task_this_process_kept_writes_only_what_was_not_delivered(runtime: Runtime) -> None:
    from worker.deadletter.salvage import Salvage

    bundle, messages = outcome(runtime)
    runtime.unpublished["t4"] = (PUBLISH_ROUNDS, messages)
    published: list[list[Outgoing]] = []

    class Submit:
        def submit(self, group: Sequence[Outgoing], done: Any) -> None:
            published.append(list(group))
            done(None)

        def drain(self, timeout: float) -> bool:
            return True

    salvage = Salvage(publisher=Submit(), dead_letter_queue=runtime.topology.dead_letter,
                      clock=runtime.lanes.get("default").delivery.clock, later=lambda s, fn: None,
                      kept_outcome=runtime.kept_outcome)
    acked: list[bool] = []
    body = upload_message(APP, runtime.topology.upload, bundle).body
    message = type("M", (), {"body": body, "headers": {"id": "t4", "task": "activities.upload"},
                             "ack": lambda self: acked.append(True), "delivery_info": {}})()
    salvage.on_message(message)
    (group,) = published
    assert sorted(jsonutil.loads(m.body)["event"]["activity_params"]["n"] for m in group) == [0, 1, 2, 3]
    assert acked == [True]
