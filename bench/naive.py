"""The naive design, the floor the worker is measured against: one task, one POST, per event.

This is what a first version usually looks like: the producer calls ``send_task`` once per
event, the task posts that one event with ``requests.post`` (a new connection each time) and
Celery acknowledges it on receipt. No batching, no keep-alive, no confirms. It is here, as a
real Celery app run by a real ``celery worker``, so that "N times faster than the obvious
approach" is measured on the same machine in the same run, not assumed.

``celery -A bench.naive worker`` reads ``BENCH_NAIVE_QUEUE``, ``NETCORE_API_URL`` and
``NETCORE_API_KEY`` from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import requests
from celery import Celery
from kombu import Exchange, Queue

#: The one task of the naive app.
TASK = "bench.naive.post_event"

#: The queue its messages travel on (a benchmark run sets a name of its own).
QUEUE = os.environ.get("BENCH_NAIVE_QUEUE", "bench.naive")

#: Where the events go: the sandbox of the benchmark.
UPLOAD_URL = os.environ.get("NETCORE_API_URL", "http://127.0.0.1:8080").rstrip("/") + "/v1/activity/upload"

#: Seconds a naive POST may take.
TIMEOUT = 10.0

app = Celery("bench_naive", broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@localhost:5672//"))
app.conf.task_default_queue = QUEUE
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = True


@app.task(name=TASK)
def post_event(event: dict[str, Any]) -> int:
    """POST one event, alone, on a new connection; fail (and lose it) on any error."""
    response = requests.post(
        UPLOAD_URL, json=[event], timeout=TIMEOUT,
        headers={"Authorization": f"Bearer {os.environ.get('NETCORE_API_KEY', '')}"},
    )
    response.raise_for_status()
    return response.status_code


def queue(name: str) -> Queue:
    """The queue as Celery itself declares a default queue (a direct exchange of its name)."""
    return Queue(name, Exchange(name, "direct", durable=True), routing_key=name, durable=True)


def preload(name: str, events: Iterable[dict[str, Any]]) -> int:
    """Send one task message per event to queue ``name``, the naive producer's way."""
    sent = 0
    with app.connection_for_write() as connection:
        queue(name)(connection.default_channel).declare()
        with app.producer_or_acquire() as producer:
            for event in events:
                app.send_task(TASK, args=[event], queue=name, routing_key=name, producer=producer)
                sent += 1
    return sent
