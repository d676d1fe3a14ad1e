"""``/metrics`` of a real worker: what the main process and the pool counted, adding up exactly.

A known mix goes through a real worker (two pool processes) and the sandbox; once the sandbox
stored the valid events and the dead letters arrived, ``/metrics`` is read over HTTP and every
number is checked against what was sent, what the sandbox saw and what was dead-lettered.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import DeadLetters, QueueSet, WorkerProcess, event, publish_events, publish_raw
from worker.ops.metrics import PREFIX
from worker.sandbox import Sandbox

#: How long the test waits for the worker, the sandbox and the dead letters.
DEADLINE = 60.0

#: A timestamp more than 24 hours old: stored by the API, counted as stale.
STALE = "2021-12-29T12:06:28Z"


class Scrape:
    """One read of ``/metrics``: samples by (name without the prefix, labels)."""

    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode("utf-8")
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (sample.name.removeprefix(PREFIX), sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith(PREFIX)
        ]

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        return sum(v for n, found, v in self.samples if n == name and labels.items() <= found.items())

    def labels(self, name: str) -> list[dict[str, str]]:
        return [found for n, found, _ in self.samples if n == name]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape_until(port: int, done: Callable[[Scrape], bool], timeout: float) -> Scrape:
    """Scrape until ``done`` holds or the deadline passes; return the last scrape.

    A pool process writes its counters after the sandbox answered and the broker confirmed the
    batch's dead letters, so the last of them may land a moment after what the test waited
    for: there is nothing to block on across processes, hence a short, bounded poll.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        scrape = Scrape(port)
        if done(scrape) or time.monotonic() > deadline:
            return scrape
        pause.wait(0.1)


def test_the_numbers_add_up_across_the_main_process_and_the_pool(
    start_worker: Callable[..., WorkerProcess], queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assets = ["asset-m1", "asset-m2", "asset-m3"]
    valid = [event(f"v{i}", assets[i % 3], timestamp=now) for i in range(116)]
    valid += [event(f"old{i}", assets[0], timestamp=STALE) for i in range(4)]
    rejected = [event(f"rej{i}", assets[1], timestamp=now, activity_params={"event_id": f"rej{i}",
                                                                              "sandbox_reject": True})
                for i in range(3)]
    invalid: list[dict[str, Any]] = [event(f"bad{i}", assets[2], timestamp="yesterday") for i in range(3)]
    invalid.append(event("no-asset", 42, timestamp=now))  # no asset_id: refused by the main process
    invalid.append({k: v for k, v in event("no-asset-2", timestamp=now).items() if k != "asset_id"})
    sandbox.add_fault(status=500, count=1)  # the first upload fails once: one retry
    publish_events(queues.settings.queue, [valid[:60] + rejected + invalid[:2], valid[60:] + invalid[2:]])
    publish_raw(queues.settings.queue, [b"{not json", b"[]"])

    port = free_port()
    start_worker(METRICS_PORT=port)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 120, timeout=DEADLINE)
    assert dead_letters.wait_for(10, timeout=DEADLINE), dead_letters.by_reason()
    assert dead_letters.by_reason() == {"invalid": 5, "malformed": 2, "rejected": 3}
    statuses = Counter(str(r.status) for r in sandbox.requests())
    assert statuses["500"] == 1 and statuses["400"] >= 1 and statuses["200"] >= 3

    def settled(s: Scrape) -> bool:
        return (s.total("events_delivered_total") == 120 and s.total("events_dead_lettered_total") == 10
                and s.total("uploads_total") == len(sandbox.requests()))

    s = scrape_until(port, settled, timeout=30)
    received, batched, valid_count = (s.total(n) for n in ("events_received_total", "events_batched_total",
                                                            "events_valid_total"))
    assert (received, batched, valid_count) == (130, 126, 123)
    assert s.total("events_delivered_total") == 120
    assert s.total("events_stale_total") == 4
    # main process: everything read is either batched or dead-lettered there
    assert received == batched + s.total("events_dead_lettered_total", stage="ingest")
    # pool: everything batched is valid or refused there; everything valid delivered or dead
    assert batched == valid_count + s.total("events_invalid_total", stage="delivery")
    assert s.total("events_delivered_total") + s.total("events_dead_lettered_total") == received
    dead = {(d["stage"], d["reason"]): s.total("events_dead_lettered_total", **d)
            for d in s.labels("events_dead_lettered_total")}
    assert {k: v for k, v in dead.items() if v} == {
        ("ingest", "invalid"): 2, ("ingest", "malformed"): 2, ("delivery", "invalid"): 3, ("delivery", "rejected"): 3,
    }
    assert s.total("events_invalid_total", stage="ingest", reason="missing_asset_id") == 2
    assert s.total("events_invalid_total", stage="ingest", reason="malformed") == 2
    assert s.total("events_invalid_total", stage="delivery", reason="invalid") == 3
    # uploads: one per request the sandbox saw, by status; a retry for the 500
    assert {status: s.total("uploads_total", status=status) for status in statuses} == statuses
    assert s.total("uploads_total", status="500", outcome="transient") == 1
    assert s.total("retries_scheduled_total") == 1
    assert s.total("upload_batch_size_count") == len(sandbox.requests())
    assert s.total("upload_batch_size_sum") == sum(r.events for r in sandbox.requests())
    assert s.total("upload_duration_seconds_count") == len(sandbox.requests())
    # nothing waits any more; the gauge is the main process's, without a pid label
    assert s.total("oldest_event_age_seconds") == 0 and s.total("events_buffered") == 0
    assert s.labels("oldest_event_age_seconds") == [{}]
    # the upload side's numbers are the account's (the one of NETCORE_API_KEY: "default")
    assert s.total("events_delivered_total", account="default") == 120
    assert {labels["account"] for labels in s.labels("uploads_total")} == {"default"}
    assert s.total("circuit_state", account="default") == 0
