"""``python -m bench.deep``: the worker's memory with a deep queue (default 1,000,000 events).

The consumer holds at most ``ACTIVITY_PREFETCH`` messages, whatever the depth of the queue;
this measures it: preload the queue, run the worker against the sandbox for a while, and
report the peak RSS of its main process and of its largest pool process. It takes minutes
(publishing a million messages), so it is not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from bench import events
from bench.api import API_KEY, SandboxProcess
from bench.broker import Queues, depth, preload
from bench.procs import Spawned, children_of, kill_all, peak_rss_mb
from bench.runs import celery_worker

#: The project's root, where processes run.
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events queued before the worker starts")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the worker runs")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-deep-"))
    queues = Queues()
    env = queues.worker_env("deep")
    try:
        case = events.Case("deep", 1, 7)
        started = time.monotonic()
        for first in range(0, args.events, 100_000):  # in slices: a million bodies at once is 700 MB
            preload([env["ACTIVITY_QUEUE"]], events.bodies(f"{queues.run_id}-{first}", case,
                                                          min(100_000, args.events - first)))
        print(f"queued {depth(env['ACTIVITY_QUEUE']):,} events in {time.monotonic() - started:.0f} s")
        sandbox = SandboxProcess(ROOT, logs / "sandbox.log", {}).start()
        worker = Spawned(
            "worker",
            celery_worker("worker.app"),
            {**os.environ, **env, "NETCORE_API_URL": sandbox.url, "NETCORE_API_KEY": API_KEY,
             "METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"},
            logs / "worker.log", ROOT,
        ).start(" ready.")
        worker.wait_for(" ready.", 60)
        peak_main = peak_child = 0.0
        stop = threading.Event()
        deadline = time.monotonic() + args.seconds
        while not stop.wait(1.0) and time.monotonic() < deadline:  # sampling, not waiting for a result
            peak_main = max(peak_main, peak_rss_mb(worker.pid) or 0.0)
            for child in children_of(worker.pid):
                peak_child = max(peak_child, peak_rss_mb(child) or 0.0)
        delivered = sandbox.progress().delivered
        left = depth(env["ACTIVITY_QUEUE"])
        print(f"| queued | ran | delivered | left in the queue | peak RSS main | peak RSS pool |\n"
              f"| ---: | ---: | ---: | ---: | ---: | ---: |\n"
              f"| {args.events:,} | {args.seconds:.0f} s | {delivered:,} | {left:,} | {peak_main:.0f} MB | "
              f"{peak_child:.0f} MB |")
        return 0 if max(peak_main, peak_child) < 300 else 1
    finally:
        kill_all()
        queues.delete_all()


if __name__ == "__main__":
    raise SystemExit(main())
