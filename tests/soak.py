"""``make soak``: 200,000 events through the worker while the API fails 5% of requests at
random and the worker is SIGKILLed and restarted every 20 seconds. Prints the ledger.

Not part of ``make test`` (it takes minutes); run it before a release. Exit status 0 only when
nothing is lost: ids sent = ids delivered + ids dead-lettered.

    python -m tests.soak [--events 200000] [--rate 2000] [--kill-every 20] [--fail-rate 0.05]

Producers publish all along (``--rate`` events/s), as real traffic does, so every SIGKILL lands
with messages in memory, batches in flight and uploads running.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from tests.harness import DeadLetters, QueueSet, WorkerProcess, event, event_id_of, publish_events, require_broker
from worker.sandbox import Sandbox

API_KEY = "soak-key"

#: Assets the events are spread over.
ASSETS = 7


def produce(queue: str, payloads: list, rate: float) -> None:
    """Publish ``payloads`` at about ``rate`` events per second, in confirmed groups."""
    started, published = time.monotonic(), 0
    for n in range(0, len(payloads), 200):
        group = payloads[n:n + 200]
        publish_events(queue, group)
        published += sum(len(p) if isinstance(p, list) else 1 for p in group)
        ahead = published / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)  # pacing a producer, not waiting for a result


def run_until_done(sandbox: Sandbox, dead: DeadLetters, sent: list[str], producer: threading.Thread,
                   seconds: float) -> bool:
    """Let the worker run for ``seconds``; True as soon as every id sent is accounted for."""
    started = time.monotonic()
    while (remaining := seconds - (time.monotonic() - started)) > 0:
        seen = sandbox.accepted_count()
        target = len(sent) if seen < len(sent) else seen + 1  # past N: wait for anything new
        if producer.is_alive() or seen < len(sent):
            if not sandbox.wait_until(lambda s: s.accepted_count() >= target, timeout=remaining):
                return False
            if seen < len(sent) and sandbox.accepted_count() < len(sent):
                continue
        dead.settle(quiet=0.2)
        accounted = {event_id_of(e) for e in sandbox.accepted()} | set(dead.ids())
        if set(sent) <= accounted:
            return True
        if not sandbox.wait_until(lambda s: s.accepted_count() > seen, timeout=remaining):
            return False
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="events published per second")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between SIGKILLs")
    parser.add_argument("--fail-rate", type=float, default=0.05, help="share of API requests answered 500")
    parser.add_argument("--deadline", type=float, default=1800.0, help="give up after this many seconds")
    args = parser.parse_args()
    require_broker()
    queues = QueueSet()
    queues.declare()
    logs = Path(tempfile.mkdtemp(prefix="soak-"))
    sent = [f"s{i}" for i in range(args.events)]
    payloads: list = []
    for n in range(0, len(sent), 10):  # single events and arrays of 10, alternately
        chunk = [event(i, asset_id=f"asset-{k % ASSETS}") for k, i in enumerate(sent[n:n + 10], start=n)]
        payloads += chunk if (n // 10) % 2 else [chunk]
    producer = threading.Thread(target=produce, args=(queues.settings.queue, payloads, args.rate), daemon=True)
    dead = DeadLetters(queues.settings.dead_letter_queue)
    kills = 0
    with Sandbox(api_key=API_KEY, seed=1) as sandbox:
        sandbox.add_fault(status=500, rate=args.fail_rate)
        env = {**queues.env, "NETCORE_API_KEY": API_KEY, "NETCORE_API_URL": sandbox.url,
               "UPLOAD_RETRY_BACKOFF": "0.5", "UPLOAD_RETRY_BACKOFF_MAX": "5"}
        run_started = time.monotonic()
        producer.start()
        while time.monotonic() - run_started < args.deadline:
            worker = WorkerProcess(env, logs / f"worker-{kills}.log").start()
            if run_until_done(sandbox, dead, sent, producer, args.kill_every):
                worker.terminate()
                break
            worker.kill()
            kills += 1
            print(f"  {time.monotonic() - run_started:6.1f} s: killed the worker ({kills}); "
                  f"{sandbox.accepted_count()} accepted so far")
        elapsed = time.monotonic() - run_started
        dead.settle(quiet=2.0)
        delivered = Counter(event_id_of(e) for e in sandbox.accepted())
        failures = sum(1 for r in sandbox.requests() if r.status != 200)
        requests = len(sandbox.requests())
    dead_ids = Counter(dead.ids())
    dead.close()
    queues.delete()
    lost = set(sent) - set(delivered) - set(dead_ids)
    duplicates = sum(delivered.values()) - len(delivered)
    print(f"""
| ledger | events |
| --- | --- |
| sent | {len(sent)} |
| delivered (unique) | {len(delivered)} |
| dead-lettered | {sum(dead_ids.values())} {dict(Counter(e['reason'] for e in dead.envelopes))} |
| lost | {len(lost)} |
| duplicates delivered | {duplicates} ({duplicates / len(sent):.2%}) |

{kills} SIGKILLs, {failures} of {requests} API requests failed on purpose, {elapsed:.0f} s; logs in {logs}""")
    return 0 if not lost else 1


if __name__ == "__main__":
    raise SystemExit(main())
