"""Two Netcore accounts from one worker, one of them down for the whole run: how much of its rate
alone the healthy account keeps beside the down one (issue 17's target: at least 0.9 x).

The same backlog of the healthy account (single-event messages, 7 asset_ids) runs twice against
the instant sandbox: alone, then with half as many events of a second account (``bench-b``, its
own key and asset_ids, named in an accounts file) mixed in, whose every upload the sandbox answers
503. The down account's events wait in its own upload queue; its circuit opens and probes; the
healthy account's rate is measured as usual (the run ends when its events are delivered).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench import broker, events
from bench.api import SandboxProcess
from bench.events import Case
from bench.runs import RunResult

#: The down account: its name, its key (the sandbox serves it as an account of its own) and asset_ids.
DOWN_ACCOUNT = "bench-b"
DOWN_KEY = "bench-b-key"
DOWN_ASSETS = tuple(f"bench-b-asset-{n}" for n in range(3))

#: The healthy account's backlog shape (the first case's).
CASE = Case("accounts", 1, 7)

#: The target: the healthy account's rate beside the down one, over its rate alone.
TARGET = 0.9

#: (label, the run's queue settings, events expected, the sandbox's faults) -> the measured run.
RunFn = Callable[[str, dict[str, str], int, list[dict[str, Any]]], RunResult]


@dataclass
class AccountsResult:
    """The healthy account alone, and beside a second account that is down."""

    events: int  #: the healthy account's events, in each run
    down_events: int  #: the down account's events mixed in the second run
    alone: RunResult
    beside: RunResult
    down_requests: int  #: uploads the down account made during the second run (its circuit opened)

    @property
    def ratio(self) -> float:
        return self.beside.events_per_s / self.alone.events_per_s if self.alone.events_per_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"events": self.events, "down_events": self.down_events, "alone": self.alone.to_dict(),
                "beside": self.beside.to_dict(), "down_requests": self.down_requests, "ratio": round(self.ratio, 3)}


def accounts_file(path: Path, sandbox_url: str) -> Path:
    """The accounts file naming the down account (the healthy one is ``default``)."""
    assets = ", ".join(f'"{a}"' for a in DOWN_ASSETS)
    path.write_text(f'[accounts.{DOWN_ACCOUNT}]\napi_key_env = "BENCH_DOWN_KEY"\napi_url = "{sandbox_url}"\n'
                    f"asset_ids = [{assets}]\n")
    return path


def down_events(run_id: str, count: int) -> list[bytes]:
    """``count`` single-event messages of the down account."""
    stream = events.events(run_id, Case("accounts-down", 1, len(DOWN_ASSETS)), count)
    return [orjson.dumps({**e, "asset_id": DOWN_ASSETS[n % len(DOWN_ASSETS)]}) for n, e in enumerate(stream)]


def interleave(first: list[bytes], second: list[bytes]) -> list[bytes]:
    """``second``'s messages spread evenly among ``first``'s, from the start."""
    if not second:
        return list(first)
    every = max(1, len(first) // len(second))
    rest = iter(second)
    out: list[bytes] = []
    for n, body in enumerate(first):
        if n % every == 0:
            extra = next(rest, None)
            if extra is not None:
                out.append(extra)
        out.append(body)
    out.extend(rest)
    return out


def run_accounts(*, queues: broker.Queues, sandbox: SandboxProcess, run_id: str, count: int, results: Path,
                 run: RunFn, say: Callable[[str], None]) -> AccountsResult:
    """Measure the healthy account alone, then beside the down one (see the module docstring)."""
    healthy = events.bodies(run_id, CASE, count)
    down = down_events(run_id, count // 2)
    alone_env, beside_env = queues.worker_env("accounts-alone"), queues.worker_env("accounts-beside")
    queues.names.update(broker.account_queues(beside_env, DOWN_ACCOUNT))
    preload_s = broker.preload([alone_env["ACTIVITY_QUEUE"]], healthy)
    preload_s += broker.preload([beside_env["ACTIVITY_QUEUE"]], interleave(healthy, down))
    say(f"accounts: preloaded {len(healthy):,} events of the healthy account, and {len(down):,} of a down one "
        f"beside them, in {preload_s:.1f} s")
    alone = run("accounts-alone", alone_env, count, [])
    extra = {"NETCORE_ACCOUNTS_FILE": str(accounts_file(results / "bench-accounts.toml", sandbox.url)),
             "BENCH_DOWN_KEY": DOWN_KEY}
    beside = run("accounts-beside", {**beside_env, **extra}, count, [{"status": 503, "account": DOWN_ACCOUNT}])
    requests = sum(1 for record in sandbox.progress().records if record.get("account") == DOWN_ACCOUNT)
    result = AccountsResult(count, len(down), alone, beside, requests)
    say(f"accounts: the healthy account beside a down one at {result.ratio:.2f} x its rate alone; "
        f"{requests} requests to the down one")
    return result
