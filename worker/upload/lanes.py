"""One lane per Netcore account: its own API client, circuit, adaptive limit, delivery and queue.

Isolation is made of separate parts, not of rules: an account's outage opens its circuit only,
its 429s pause it only, its errors cut its adaptive limit only, and its retries wait in its own
delay queues. The consumer of each lane's upload queue follows its lane's circuit and limit
(:mod:`worker.upload.flow`), and what waits for an account that is down waits in its queues.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from config.accounts import Account
from config.settings import Settings
from worker.broker.messages import Bundle
from worker.broker.publisher import Outgoing, PublishFn
from worker.broker.topology import Topology
from worker.clock import Clock
from worker.upload.circuit import Circuit
from worker.upload.client import ApiClient
from worker.upload.concurrency import AdaptiveConcurrency
from worker.upload.delivery import Delivery
from worker.upload.hooks import Fanout
from worker.upload.retry import RetryPolicy


@dataclass
class Lane:
    """Everything one account's uploads need; see the module docstring."""

    account: Account
    #: The account's upload queue (its delay queues dead-letter back to it).
    queue: str
    circuit: Circuit
    concurrency: AdaptiveConcurrency
    delivery: Delivery

    @property
    def name(self) -> str:
        return self.account.name


class Lanes:
    """The lanes of every account, by name."""

    def __init__(self, lanes: list[Lane]) -> None:
        self._lanes = {lane.name: lane for lane in lanes}

    def __iter__(self) -> Iterator[Lane]:
        return iter(self._lanes.values())

    def get(self, name: str) -> Lane | None:
        return self._lanes.get(name)


def build_lanes(settings: Settings, topology: Topology, *, clock: Clock, publish: PublishFn,
                retry_message: Callable[[str, Bundle], Outgoing], listener: Fanout) -> Lanes:
    """A lane for every account of ``settings``; each part reports to ``listener`` (metrics, logs,
    Sentry)."""
    policy = RetryPolicy(max_retries=settings.max_retries, backoff=settings.retry_backoff,
                         backoff_max=settings.retry_backoff_max, window=settings.retry_window)
    lanes = []
    for account in settings.accounts:
        circuit = Circuit(clock=clock, probe_base=max(settings.retry_backoff, 0.1),
                          probe_max=settings.probe_interval_max, account=account.name, listeners=[listener])
        concurrency = AdaptiveConcurrency(ceiling=settings.upload_concurrency, clock=clock)
        delivery = Delivery(
            client=ApiClient(url=account.upload_url, api_key=account.api_key, timeout=settings.upload_timeout,
                             connect_timeout=settings.upload_connect_timeout),
            circuit=circuit,
            concurrency=concurrency,
            policy=policy,
            topology=topology,
            publish=publish,
            retry_message=retry_message,
            clock=clock,
            account=account.name,
            max_bundle_events=settings.batch_size,
            max_bundle_bytes=settings.batch_max_bytes,
            naive_timestamps="reject" if settings.naive_timestamps == "reject" else "forward",
            listener=listener,
        )
        lanes.append(Lane(account, topology.upload_for(account.name), circuit, concurrency, delivery))
    return Lanes(lanes)
