"""The sandbox API as a process of its own, and what the benchmark asks of it over HTTP.

It runs apart from the benchmark so that its CPU is measured apart too (it competes with the
worker for the same cores, as a real API would not), and it is started ``--quiet``: a log line
per upload would be work the real API never makes the worker's machine do.

Progress is read from ``/_sandbox/requests``: one record per upload with its status, event
count and arrival time. The arrival times, not the moment the benchmark happened to look,
date the last delivery, so polling gently (every 0.2 s, less often as the list grows long)
costs no precision.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import requests

from bench.procs import Spawned, free_port

#: The API key of the benchmark's sandbox (and of the workers it runs).
API_KEY = "bench-key"

#: Seconds to wait for the sandbox's banner.
START_TIMEOUT = 30.0

#: An event's id in the sandbox's compact JSON (the benchmark's ids hold no quotes).
EVENT_ID_RE = re.compile(rb'"event_id":"([^"]*)"')

#: Seconds to wait for one control answer (the full list of accepted events can be large).
CONTROL_TIMEOUT = 120.0


@dataclass(frozen=True)
class Progress:
    """The sandbox's upload records, summed up."""

    records: list[dict[str, Any]]

    @property
    def ok(self) -> list[dict[str, Any]]:
        """Uploads answered 200, in arrival order."""
        return sorted((r for r in self.records if r.get("status") == 200), key=lambda r: r["at"])

    @property
    def delivered(self) -> int:
        """Events in uploads answered 200."""
        return sum(int(r.get("events", 0)) for r in self.records if r.get("status") == 200)

    @property
    def failed(self) -> int:
        """Uploads answered anything but 200 (or dropped)."""
        return sum(1 for r in self.records if r.get("status") != 200)

    def mixed_batches(self) -> int:
        """Uploads holding more than one asset_id: a contract breach."""
        return sum(1 for r in self.records if len(r.get("asset_ids") or ()) > 1)

    def last_at(self) -> float | None:
        ok = self.ok
        return ok[-1]["at"] if ok else None

    def longest_gap(self) -> float:
        """The longest pause between two successive uploads (a stall shows here)."""
        times = [float(r["at"]) for r in self.ok]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def timeline(self, start: float) -> list[int]:
        """Events delivered in each second after ``start``."""
        buckets: list[int] = []
        for record in self.ok:
            second = max(0, int(float(record["at"]) - start))
            buckets.extend([0] * (second + 1 - len(buckets)))
            buckets[second] += int(record.get("events", 0))
        return buckets

    def time_reaching(self, share: float, total: int) -> float | None:
        """Arrival time of the upload that brought the delivered count to ``share`` of ``total``."""
        target = share * total
        done = 0
        for record in self.ok:
            done += int(record.get("events", 0))
            if done >= target:
                return float(record["at"])
        return None


class SandboxProcess:
    """``python -m worker.sandbox --quiet`` on a free port, with its control endpoints."""

    def __init__(self, root: Path, log_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Spawned(
            "sandbox",
            [sys.executable, "-m", "worker.sandbox", "--port", str(self.port), "--quiet", "--api-key", API_KEY],
            {**env, "PYTHONUNBUFFERED": "1"}, log_path, root,
        )
        self.session = requests.Session()

    def start(self) -> SandboxProcess:
        self.process.start("listening on")
        self.process.wait_for("listening on", START_TIMEOUT)
        self.session.get(f"{self.url}/_sandbox/health", timeout=CONTROL_TIMEOUT).raise_for_status()
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def reset(self) -> None:
        """Forget every event and record (between runs)."""
        self.session.post(f"{self.url}/_sandbox/reset", timeout=CONTROL_TIMEOUT).raise_for_status()

    def progress(self) -> Progress:
        answer = self.session.get(f"{self.url}/_sandbox/requests", timeout=CONTROL_TIMEOUT)
        answer.raise_for_status()
        return Progress(orjson.loads(answer.content))

    def event_ids(self) -> Counter[str]:
        """How many times each accepted event's ``event_id`` was stored (duplicates > 1).

        The ids are picked out of the answer's bytes: building 100,000 dicts to read one field
        of each would double the time this check takes.
        """
        answer = self.session.get(f"{self.url}/_sandbox/accepted", timeout=CONTROL_TIMEOUT)
        answer.raise_for_status()
        return Counter(match.decode() for match in EVENT_ID_RE.findall(answer.content))

    def stop(self) -> None:
        self.session.close()
        self.process.kill()
