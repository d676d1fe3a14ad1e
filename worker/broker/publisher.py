"""Publishing with publisher confirms, many messages per confirm round trip.

Waiting for RabbitMQ's confirm after each message caps a publisher near 2,000 messages/s;
here a group is published at once and the broker's acks are gathered afterwards, so a
bisected batch's 500 dead letters cost one round trip, not 500.

:meth:`Publisher.publish` returns only when the broker has confirmed *every* message of the
group (and routed it to a queue: messages are ``mandatory``); otherwise it raises
:class:`~worker.errors.PublishError` and the caller must not acknowledge what it was handing
on. After a connection error the whole group is published again on a new connection:
duplicates are possible, losses are not.

Every publisher's connection has heartbeats (:mod:`worker.broker.connection`): while it waits
for confirms it keeps them going, and between groups its owner calls :meth:`Publisher.keep_alive`
(the :class:`PublisherPool` does, for the idle ones), so a dead broker or a partition shows
within two heartbeats, not at the confirm timeout.
"""

from __future__ import annotations

import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import amqp
from kombu.connection import Connection
from kombu.entity import Queue

from worker.broker.connection import HEARTBEAT, connect, keep_alive
from worker.errors import PublishError

logger = logging.getLogger(__name__)

#: Seconds to wait for the broker's confirms of one group.
CONFIRM_TIMEOUT = 30.0

#: How many times a group is published before :meth:`Publisher.publish` gives up.
PUBLISH_ATTEMPTS = 3

#: RabbitMQ's words when a message is over its ``max_message_size`` (it closes the channel).
_TOO_LARGE = re.compile(r"larger than configured max size (\d+)")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish: to the default exchange, routed by queue name, unless an
    ``exchange`` is named (then ``queue`` is the routing key)."""

    queue: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"
    properties: dict[str, Any] = field(default_factory=dict)
    content_encoding: str | None = "utf-8"
    exchange: str = ""


class _Confirms:
    """Tracks the delivery tags the broker has yet to confirm on one channel."""

    def __init__(self) -> None:
        self.next_tag = 1
        self.pending: set[int] = set()
        self.nacked = 0
        self.returned = 0

    def sent(self) -> None:
        self.pending.add(self.next_tag)
        self.next_tag += 1

    def on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self.pending = {tag for tag in self.pending if tag > delivery_tag}
        else:
            self.pending.discard(delivery_tag)

    def on_nack(self, delivery_tag: int, multiple: bool) -> None:
        before = len(self.pending)
        self.on_ack(delivery_tag, multiple)
        self.nacked += before - len(self.pending)

    def on_return(self, *args: Any) -> None:
        self.returned += 1


class Publisher:
    """A connection of its own, in confirm mode, that publishes groups of messages.

    Not thread-safe: one per process (or per consumer step).
    """

    def __init__(
        self,
        broker_url: str,
        *,
        declare: Iterable[Queue] = (),
        confirm_timeout: float = CONFIRM_TIMEOUT,
        heartbeat: float = HEARTBEAT,
        ssl: Any = None,
    ) -> None:
        self.broker_url = broker_url
        self.declare = tuple(declare)
        self.confirm_timeout = confirm_timeout
        self.heartbeat = heartbeat
        self.ssl = ssl
        self._connection: Connection | None = None
        self._channel: amqp.Channel | None = None
        self._confirms = _Confirms()

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish every message; return once the broker confirmed them all."""
        if not messages:
            return
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                self._publish_once(messages)
                return
            except PublishError as exc:
                raise PublishError(str(exc), messages=messages, refused=exc.refused) from None
            except Exception as exc:  # connection and channel errors: start anew
                self.close()
                too_large = _TOO_LARGE.search(str(exc))
                if too_large:  # the same message would be refused again: say so at once
                    raise PublishError(f"the broker refused a message over its max_message_size: {exc}",
                                       messages=messages, too_large=int(too_large.group(1))) from None
                if attempt == PUBLISH_ATTEMPTS:
                    raise PublishError(
                        f"could not publish {len(messages)} messages: {exc!r}", messages=messages
                    ) from exc
                logger.warning(
                    "Publishing %d messages failed (%r); reconnecting (attempt %d of %d)",
                    len(messages), exc, attempt + 1, PUBLISH_ATTEMPTS,
                )

    def keep_alive(self) -> None:
        """Between groups: take the broker's heartbeats, send ours; a connection found dead is
        closed (the next publish opens a new one)."""
        if self._connection is None:
            return
        try:
            keep_alive(self._connection)
        except Exception as exc:  # the broker is gone: say so once, reconnect at the next publish
            logger.warning("A publisher's connection to the broker died while idle (%r); it reconnects when "
                           "next needed", exc)
            self.close()

    def declare_queues(self) -> None:
        """Connect now and declare the queues (otherwise done before the first publish)."""
        self._ensure_channel()

    def close(self) -> None:
        """Close the connection (it is opened again on the next publish)."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # already broken: nothing to release
                pass

    def _publish_once(self, messages: Sequence[Outgoing]) -> None:
        channel = self._ensure_channel()
        confirms = self._confirms
        first_tag = confirms.next_tag
        nacked, returned = confirms.nacked, confirms.returned
        for message in messages:
            properties = dict(message.properties)
            if message.content_type:
                properties["content_type"] = message.content_type
            if message.content_encoding:
                properties["content_encoding"] = message.content_encoding
            channel.basic_publish(
                amqp.Message(message.body, delivery_mode=2, application_headers=message.headers, **properties),
                exchange=message.exchange,
                routing_key=message.queue,
                mandatory=True,
            )
            confirms.sent()
        self._wait(first_tag)
        if confirms.nacked > nacked or confirms.returned > returned:
            self.close()
            raise PublishError(
                f"the broker refused {confirms.nacked - nacked} and could not route "
                f"{confirms.returned - returned} of {len(messages)} messages", refused=True
            )

    def _wait(self, first_tag: int) -> None:
        """Drain the connection until every tag from ``first_tag`` on is confirmed."""
        assert self._connection is not None
        deadline = time.monotonic() + self.confirm_timeout
        confirms = self._confirms
        step = self.heartbeat / 2 if self.heartbeat else self.confirm_timeout
        while any(tag >= first_tag for tag in confirms.pending):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no confirm from the broker in {self.confirm_timeout} s")
            try:
                self._connection.drain_events(timeout=min(remaining, step))
            except socket.timeout:
                pass
            self._connection.heartbeat_check()  # a silent broker raises here, within two heartbeats

    def _ensure_channel(self) -> amqp.Channel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        connection = connect(self.broker_url, heartbeat=self.heartbeat, ssl=self.ssl)
        channel = connection.channel()
        for target in self.declare:
            try:
                target(channel).declare()
            except amqp.exceptions.PreconditionFailed:  # it exists with other arguments (an earlier
                channel = connection.channel()          # version's): usable as it is (start-up says so)
        self._confirms = confirms = _Confirms()
        channel.confirm_select()
        channel.events["basic_ack"].add(confirms.on_ack)
        channel.events["basic_nack"].add(confirms.on_nack)
        channel.events["basic_return"].add(confirms.on_return)
        self._connection, self._channel = connection, channel
        return channel


#: What the pipeline steps are given to hand messages to the broker (``Publisher.publish``).
PublishFn = Callable[[Sequence[Outgoing]], None]


class PublisherPool:
    """A few :class:`Publisher`\\ s shared by the upload threads, each used by one thread at a time.

    A publisher per thread would mean a connection per thread (dozens); one shared behind a
    lock would make every thread wait for every other's confirms. A thread of its own keeps
    the idle ones' heartbeats going (taking each from the pool while it does).
    """

    def __init__(self, broker_url: str, *, size: int, declare: Iterable[Queue] = (),
                 heartbeat: float = HEARTBEAT, ssl: Any = None) -> None:
        self._free: queue.SimpleQueue[Publisher] = queue.SimpleQueue()
        self._all = [Publisher(broker_url, declare=declare, heartbeat=heartbeat, ssl=ssl)
                     for _ in range(max(1, size))]
        for publisher in self._all:
            self._free.put(publisher)
        self._stopped = threading.Event()
        self._keeper: threading.Thread | None = None
        if heartbeat:
            self._keeper = threading.Thread(target=self._keep_alive, args=(heartbeat / 4,),
                                            name="publisher-heartbeats", daemon=True)
            self._keeper.start()

    def _keep_alive(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            for _ in range(len(self._all)):
                try:
                    publisher = self._free.get_nowait()
                except queue.Empty:
                    break  # the others are publishing: their traffic is their heartbeat
                try:
                    publisher.keep_alive()
                finally:
                    self._free.put(publisher)

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """:meth:`Publisher.publish` on a free publisher (waits for one)."""
        if not messages:
            return
        publisher = self._free.get()
        try:
            publisher.publish(messages)
        finally:
            self._free.put(publisher)

    def close(self) -> None:
        self._stopped.set()
        for publisher in self._all:
            publisher.close()
