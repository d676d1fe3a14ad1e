"""``python -m bench.upload``: the CPU an event costs on the worker's own paths, in process.

No broker, no API, no threads: each stage runs on the bench's messages (:mod:`bench.events`)
with timeit, best of a few repeats, in microseconds per event. On a shared machine this is the
measurement that moves least, so it is the one to change code by; ``make bench`` then says
what the change is worth end to end.

- **decode**: the consumer's reading of a source message (``events_of``): a single-event
  message, and a 50-event array (strict parsing happens here for arrays);
- **bundle**: the task body of a 1000-event upload task read back (Celery's main loop, then
  ``read_bundle``);
- **deliver**: ``Delivery.deliver`` of that bundle on the first attempt (screening, then the
  request body built as ``ApiClient.post`` builds it; nothing sent), and on a retry.

``--baseline REF`` measures the worker of commit ``REF`` too, round after round with this
tree's (each in a process of its own), and prints both with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import timeit
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.baseline import extract
from bench.events import ARRAY_SIZE, purchase

#: The project's root, and where baselines are unpacked.
ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "bench-results" / "baseline"

#: Events in the measured upload bundle (one full batch).
BATCH = 1000


def measure(repeat: int) -> dict[str, float]:
    """Microseconds per event of each stage, with the ``worker`` package found first on sys.path."""
    import logging
    import random

    import orjson
    from celery import Celery

    from config.settings import Settings
    from worker.broker.messages import Bundle, UploadBatch, read_bundle, upload_message
    from worker.broker.topology import Topology
    from worker.clock import SystemClock
    from worker.events import jsonutil
    from worker.ingest.decoding import events_of
    from worker.upload.circuit import Circuit
    from worker.upload.concurrency import AdaptiveConcurrency
    from worker.upload.delivery import Delivery
    from worker.upload.retry import RetryPolicy

    logging.disable(logging.CRITICAL)
    rng, now = random.Random(1), datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    events = [purchase(f"u-{i}", "a" * 20, rng, now) for i in range(BATCH)]
    texts = [orjson.dumps(e).decode() for e in events]
    topology, clock, app = Topology.of(Settings.from_env({}, require_api=False)), SystemClock(), Celery("u")
    body = upload_message(app, topology.upload, Bundle([UploadBatch("a" * 20, texts)])).body

    class Poster:
        def post(self, events: Sequence[Any]) -> None:
            ("[" + ",".join(events) + "]").encode("utf-8")  # as ApiClient.post builds its body

    delivery = Delivery(client=Poster(), circuit=Circuit(clock=clock, probe_base=1, probe_max=60),
                        concurrency=AdaptiveConcurrency(ceiling=8, clock=clock),
                        policy=RetryPolicy(max_retries=8, backoff=1, backoff_max=60), topology=topology,
                        publish=lambda messages: None, retry_message=lambda q, b: upload_message(app, q, b),
                        clock=clock)
    single, array = Message(texts[0].encode()), Message(orjson.dumps(events[:ARRAY_SIZE]))
    wire = read_bundle(jsonutil.loads(body)[0]).batches[0].to_wire()
    retry = read_bundle([[{**wire, "attempts": 1, "checked": True}]])  # as this tree's retries carry it

    stages: dict[str, tuple[Callable[[], Any], int]] = {
        "decode, single-event message": (lambda: events_of(single), 1),
        f"decode, {ARRAY_SIZE}-event array": (lambda: events_of(array), ARRAY_SIZE),
        "bundle, read by the upload task": (lambda: read_bundle(jsonutil.loads(body)[0]), BATCH),
        "deliver, first attempt": (lambda: delivery.deliver(read_bundle(jsonutil.loads(body)[0])), BATCH),
        "deliver, a retry": (lambda: delivery.deliver(retry), BATCH),
    }
    out = {}
    for name, (run, per) in stages.items():
        number = max(1, 2000 // per)
        out[name] = min(timeit.repeat(run, number=number, repeat=repeat)) / number / per * 1e6
    return out


class Message:
    """A source message as kombu hands it to the consumer (plain JSON, no headers)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.content_type = "application/json"
        self.content_encoding = "binary"
        self.headers: dict[str, Any] = {}
        self.delivery_tag = 1


def run_in(tree: Path, repeat: int) -> dict[str, float]:
    """:func:`measure` in a process of its own, the ``worker`` package taken from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "bench.upload", "--measure", "--repeat", str(repeat)],
                         cwd=tree, env=env, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REF", help="also measure the worker of commit REF, round by round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (each tree once a round; median shown)")
    parser.add_argument("--repeat", type=int, default=3, help="timeit repeats per stage and round (best kept)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one round, JSON out
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.repeat)))
        return 0
    trees = {"this tree": ROOT}
    if args.baseline:
        commit, tree = extract(args.baseline, repository=ROOT, into=BASELINES)
        trees[commit] = tree
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            rounds[name].append(run_in(tree, args.repeat))
    medians = {name: {stage: statistics.median(r[stage] for r in found) for stage in found[0]}
               for name, found in rounds.items()}
    names = list(trees)
    print(f"us per event, median of {args.rounds} rounds (each the best of {args.repeat}); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"| stage | {' | '.join(names)} |" + (" ratio |" if len(names) == 2 else ""))
    print("| --- |" + " ---: |" * (len(names) + (len(names) == 2)))
    for stage in medians[names[0]]:
        values = [medians[name][stage] for name in names]
        ratio = f" {values[0] / values[1]:.2f} |" if len(values) == 2 and values[1] else ""
        print(f"| {stage} | " + " | ".join(f"{v:.2f}" for v in values) + " |" + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
