"""Stand-ins for the background publisher (worker/broker/background.py) in unit tests.

:class:`Immediate` publishes on the caller's thread and reports at once: the pipeline then
behaves as if every confirm came back before the next line of the test. :class:`Deferred` keeps
every group until the test says how the broker answered, to test what happens meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from worker.broker.background import DoneFn
from worker.broker.publisher import Outgoing
from worker.errors import PublishError


class Immediate:
    """A submitter that calls ``publish(messages)`` at once and reports its outcome at once."""

    def __init__(self, publish: Callable[[Sequence[Outgoing]], None]) -> None:
        self.publish = publish

    def submit(self, messages: Sequence[Outgoing], done: DoneFn) -> None:
        try:
            self.publish(messages)
        except PublishError as exc:
            done(exc)
        else:
            done(None)

    def drain(self, timeout: float) -> bool:
        return True


class Deferred:
    """A submitter that holds each group until :meth:`confirm` or :meth:`refuse` (oldest first)."""

    def __init__(self, on_confirm: Callable[[list[Outgoing]], None] = lambda messages: None) -> None:
        self.groups: list[tuple[list[Outgoing], DoneFn]] = []
        self.confirmed: list[list[Outgoing]] = []
        #: Called with a group as the broker confirms it, before its callback runs.
        self.on_confirm = on_confirm

    def submit(self, messages: Sequence[Outgoing], done: DoneFn) -> None:
        self.groups.append((list(messages), done))

    def confirm(self, count: int | None = None, *, index: int = 0) -> None:
        """The broker confirms ``count`` groups (all by default) from the ``index``-th oldest on."""
        for _ in range(len(self.groups) - index if count is None else count):
            messages, done = self.groups.pop(index)
            self.confirmed.append(messages)
            self.on_confirm(messages)
            done(None)

    def refuse(self, error: PublishError | None = None) -> None:
        """The broker does not confirm the oldest group."""
        _, done = self.groups.pop(0)
        done(error or PublishError("the broker did not confirm"))

    def drain(self, timeout: float) -> bool:
        self.confirm()
        return True
