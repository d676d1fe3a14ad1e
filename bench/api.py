"""The sandbox API as a process of its own, and what the benchmark asks of it over HTTP.

It runs apart from the benchmark so that its CPU is measured apart too (it competes with the
worker for the same cores, as a real API would not), and it is started ``--quiet``: a log line
per upload would be work the real API never makes the worker's machine do.

Progress is read from ``/_sandbox/requests?since=N``: one record per upload with its status,
event count and arrival time, and only the records not read yet (the benchmark keeps the
others), so a poll costs the same at the 100th upload and at the 100,000th. The arrival
times, not the moment the benchmark happened to look, date the last delivery, so polling
gently costs no precision.

Faults (a per-request latency, an outage answering 503) are set through ``/_sandbox/faults``
on the one sandbox process, so every run of a benchmark talks to the same server and the
only thing that differs between two runs compared is the fault.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
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

    @cached_property
    def ok(self) -> list[dict[str, Any]]:
        """Uploads answered 200, in arrival order (computed once: a snapshot does not change)."""
        return sorted((r for r in self.records if r.get("status") == 200), key=lambda r: r["at"])

    @cached_property
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

    def __init__(self, root: Path, log_path: Path, env: dict[str, str],
                 accounts: Mapping[str, str] | None = None) -> None:
        """``accounts``: further accounts the sandbox serves, name -> API key."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        more = [arg for name, key in (accounts or {}).items() for arg in ("--account", f"{name}={key}")]
        self.process = Spawned(
            "sandbox",
            [sys.executable, "-m", "worker.sandbox", "--port", str(self.port), "--quiet", "--api-key", API_KEY,
             *more],
            {**env, "PYTHONUNBUFFERED": "1"}, log_path, root,
        )
        self.session = requests.Session()
        #: Every record read since the last reset, in the sandbox's order (``since`` = its length).
        self._records: list[dict[str, Any]] = []
        #: Events in those records answered 200, summed as they arrive.
        self._delivered = 0

    def start(self) -> SandboxProcess:
        self.process.start("listening on")
        self.process.wait_for("listening on", START_TIMEOUT)
        self.session.get(f"{self.url}/_sandbox/health", timeout=CONTROL_TIMEOUT).raise_for_status()
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def reset(self, faults: Sequence[Mapping[str, Any]] = ()) -> None:
        """Forget every event, record and fault (between runs), then set ``faults``."""
        self.session.post(f"{self.url}/_sandbox/reset", timeout=CONTROL_TIMEOUT).raise_for_status()
        self._records, self._delivered = [], 0
        if faults:
            self.add_faults(faults)

    def add_faults(self, faults: Sequence[Mapping[str, Any]]) -> None:
        """Append fault rules (``{"latency": 0.15}``, ``{"status": 503}``: worker.sandbox.faults)."""
        answer = self.session.post(f"{self.url}/_sandbox/faults", data=orjson.dumps(list(faults)),
                                   headers={"Content-Type": "application/json"}, timeout=CONTROL_TIMEOUT)
        answer.raise_for_status()

    def set_faults(self, faults: Sequence[Mapping[str, Any]]) -> None:
        """Replace every fault rule by ``faults`` (none: the API answers normally again)."""
        self.session.delete(f"{self.url}/_sandbox/faults", timeout=CONTROL_TIMEOUT).raise_for_status()
        if faults:
            self.add_faults(faults)

    def poll(self) -> int:
        """Read the records that arrived since the last poll; return the events delivered so far."""
        answer = self.session.get(f"{self.url}/_sandbox/requests", params={"since": len(self._records)},
                                  timeout=CONTROL_TIMEOUT)
        answer.raise_for_status()
        new: list[dict[str, Any]] = orjson.loads(answer.content)
        self._records.extend(new)
        self._delivered += sum(int(r.get("events", 0)) for r in new if r.get("status") == 200)
        return self._delivered

    @property
    def delivered(self) -> int:
        """Events delivered as of the last :meth:`poll`."""
        return self._delivered

    @property
    def records_read(self) -> int:
        """Records read so far (the position the next poll starts at)."""
        return len(self._records)

    def records_since(self, position: int) -> list[dict[str, Any]]:
        """Records already read, from ``position`` on (no request: call :meth:`poll` first)."""
        return self._records[position:]

    def progress(self) -> Progress:
        """A snapshot of every record since the last reset (polls first)."""
        self.poll()
        return Progress(list(self._records))

    def event_ids(self) -> Counter[str]:
        """How many times each accepted event's ``event_id`` was stored (duplicates > 1).

        The ids are picked out of the answer's bytes: building 100,000 dicts to read one field
        of each would double the time this check takes.
        """
        return Counter(self.accepted_ids())

    def accepted_ids(self) -> list[str]:
        """The ``event_id`` of every stored event, in the order the sandbox stored them."""
        answer = self.session.get(f"{self.url}/_sandbox/accepted", timeout=CONTROL_TIMEOUT)
        answer.raise_for_status()
        return [match.decode() for match in EVENT_ID_RE.findall(answer.content)]

    def deliveries(self) -> list[tuple[float, list[str]]] | None:
        """Each accepted upload as (arrival time, the event ids it stored), in the order stored.

        The sandbox stores an upload's events and its record together, under one lock, so the
        records answered 200 and the stored events come in the same order: each record takes
        as many ids as it holds events. None when the counts do not match (the sandbox dropped
        some events of an accepted upload, which the benchmark's events never make it do).
        """
        ids = self.accepted_ids()
        self.poll()
        accepted = [r for r in self._records if r.get("status") == 200]
        if sum(int(r.get("events", 0)) for r in accepted) != len(ids):
            return None
        out: list[tuple[float, list[str]]] = []
        position = 0
        for record in accepted:
            count = int(record.get("events", 0))
            out.append((float(record["at"]), ids[position:position + count]))
            position += count
        return out

    def stop(self) -> None:
        self.session.close()
        self.process.kill()
