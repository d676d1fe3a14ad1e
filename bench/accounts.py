"""Two Netcore accounts from one worker, one of them down for the whole run: how much of its rate
the healthy account keeps beside the down one (issue 17's target: at least 0.9 x).

The healthy account's backlog (single-event messages, 7 asset_ids) runs three times against the
instant sandbox: alone; with half as many events of a second account (``bench-b``, its own key and
asset_ids, named in an accounts file) mixed in, both accounts healthy; and with the same mix while
the sandbox answers every upload of the second account 503. The down account's events wait in its
own upload queue; its circuit opens and probes. The healthy account's rate is the time its own
events took to be delivered, from the run's clock start.

Two ratios come out, both against the 0.9 x target. Beside the down account against beside the
same account healthy says what the outage costs the healthy account: isolation. Against its rate
alone, the worker also reads the second account's messages (half as many again, decoded, batched
and handed on either way), CPU a single consumer on a shared machine pays whatever the other
account's state.

Against the instant sandbox the worker's CPU is what limits every run, so the second account's
messages cost the healthy one their share of it. The real API is what limits a deployment: it is
far away and rate-limits each account. Two more runs give the healthy account that limit
(:data:`PACED_LIMIT` uploads a second, 429 with ``Retry-After: 1`` beyond, as the sandbox's
``per_second`` rule answers): alone, and beside the down account with the same mix. Their ratio
says whether anything of the down account (its circuit, its probes, its queue, its events on the
way) takes from the healthy account's share of its API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench import broker, events
from bench.api import Progress, SandboxProcess
from bench.events import Case
from bench.runs import RunResult

#: The down account: its name, its key (the sandbox serves it as an account of its own) and asset_ids.
DOWN_ACCOUNT = "bench-b"
DOWN_KEY = "bench-b-key"
DOWN_ASSETS = tuple(f"bench-b-asset-{n}" for n in range(3))

#: The healthy account: the worker's default one (NETCORE_API_KEY), as the sandbox names it too.
DEFAULT_ACCOUNT = "default"

#: The healthy account's backlog shape (the first case's).
CASE = Case("accounts", 1, 7)

#: The target: the healthy account's rate beside the down one, over its rate alone.
TARGET = 0.9

#: Uploads a second the API takes from the healthy account in the paced runs: with 1000-event
#: batches, well under what one worker process reads, so that the API is what limits them.
PACED_LIMIT = 4

#: (label, the run's queue settings, events expected, the sandbox's faults) -> the measured run.
RunFn = Callable[[str, dict[str, str], int, list[dict[str, Any]]], RunResult]


@dataclass
class AccountsResult:
    """The healthy account alone, beside a second account that is healthy, and beside it down."""

    events: int  #: the healthy account's events, in each run
    down_events: int  #: the second account's events, mixed in the last two runs
    alone: RunResult
    both: RunResult  #: both accounts healthy (its rate counts both accounts' events)
    both_healthy_rate: float  #: the healthy account's own events/s in that run
    beside: RunResult
    down_requests: int  #: uploads the down account made during the last run (its circuit opened)
    paced_alone: RunResult | None = None  #: alone, the API taking PACED_LIMIT uploads a second
    paced_beside: RunResult | None = None  #: the same limit, beside the down account
    paced_down_requests: int = 0  #: uploads the down account made during that run

    @property
    def paced_ratio(self) -> float:
        """At the API's pace: beside the down account, against alone."""
        if self.paced_alone is None or self.paced_beside is None or not self.paced_alone.events_per_s:
            return 0.0
        return self.paced_beside.events_per_s / self.paced_alone.events_per_s

    @property
    def ratio(self) -> float:
        """Beside the down account, against alone."""
        return self.beside.events_per_s / self.alone.events_per_s if self.alone.events_per_s else 0.0

    @property
    def isolation(self) -> float:
        """Beside the down account, against beside the same account healthy."""
        return self.beside.events_per_s / self.both_healthy_rate if self.both_healthy_rate else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"events": self.events, "down_events": self.down_events, "alone": self.alone.to_dict(),
                "both_healthy": self.both.to_dict(), "both_healthy_rate": round(self.both_healthy_rate, 1),
                "beside": self.beside.to_dict(), "down_requests": self.down_requests,
                "ratio": round(self.ratio, 3), "isolation": round(self.isolation, 3),
                "paced_limit": PACED_LIMIT,
                "paced_alone": self.paced_alone.to_dict() if self.paced_alone else None,
                "paced_beside": self.paced_beside.to_dict() if self.paced_beside else None,
                "paced_down_requests": self.paced_down_requests, "paced_ratio": round(self.paced_ratio, 3)}


def account_rate(sandbox: SandboxProcess, run: RunResult, account: str, count: int) -> float:
    """``account``'s events/s in the run just measured: its ``count`` events over the time they took."""
    mine = Progress([r for r in sandbox.progress().records if r.get("account") == account])
    done = mine.time_reaching(1.0, count)
    return count / max(1e-6, done - run.started_at) if done is not None else 0.0


def down_requests(sandbox: SandboxProcess) -> int:
    """Uploads the down account made in the run just measured."""
    return sum(1 for record in sandbox.progress().records if record.get("account") == DOWN_ACCOUNT)


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


def paced(account: str = DEFAULT_ACCOUNT) -> dict[str, Any]:
    """The sandbox rule that takes at most PACED_LIMIT of ``account``'s uploads a second."""
    return {"status": 429, "retry_after": 1, "per_second": PACED_LIMIT, "account": account}


def run_accounts(*, queues: broker.Queues, sandbox: SandboxProcess, run_id: str, count: int, results: Path,
                 run: RunFn, say: Callable[[str], None]) -> AccountsResult:
    """Measure the healthy account alone, then beside the down one (see the module docstring)."""
    healthy = events.bodies(run_id, CASE, count)
    down = down_events(run_id, count // 2)
    labels = ("alone", "both", "beside", "paced-alone", "paced-beside")
    envs = {label: queues.worker_env(f"accounts-{label}") for label in labels}
    mixed = interleave(healthy, down)
    preload_s = broker.preload([envs["alone"]["ACTIVITY_QUEUE"], envs["paced-alone"]["ACTIVITY_QUEUE"]], healthy)
    preload_s += broker.preload([envs[label]["ACTIVITY_QUEUE"] for label in ("both", "beside", "paced-beside")],
                                mixed)
    for label in ("both", "beside", "paced-beside"):
        queues.names.update(broker.account_queues(envs[label], DOWN_ACCOUNT))
    say(f"accounts: preloaded {len(healthy):,} events of one account, and {len(down):,} of a second one mixed "
        f"in, in {preload_s:.1f} s")
    del healthy, mixed
    extra = {"NETCORE_ACCOUNTS_FILE": str(accounts_file(results / "bench-accounts.toml", sandbox.url)),
             "BENCH_DOWN_KEY": DOWN_KEY}
    alone = run("accounts-alone", envs["alone"], count, [])
    both = run("accounts-both-healthy", {**envs["both"], **extra}, count + len(down), [])
    both_rate = account_rate(sandbox, both, DEFAULT_ACCOUNT, count)
    beside = run("accounts-beside-down", {**envs["beside"], **extra}, count, [{"status": 503, "account": DOWN_ACCOUNT}])
    requests = down_requests(sandbox)
    result = AccountsResult(count, len(down), alone, both, both_rate, beside, requests)
    say(f"accounts: the healthy account beside a down one at {result.isolation:.2f} x its rate beside it healthy, "
        f"{result.ratio:.2f} x its rate alone; {requests} requests to the down one")
    result.paced_alone = run("accounts-paced-alone", envs["paced-alone"], count, [paced()])
    result.paced_beside = run("accounts-paced-beside-down", {**envs["paced-beside"], **extra}, count,
                              [paced(), {"status": 503, "account": DOWN_ACCOUNT}])
    result.paced_down_requests = down_requests(sandbox)
    say(f"accounts: at {PACED_LIMIT} uploads a second, the healthy account beside a down one at "
        f"{result.paced_ratio:.2f} x its rate alone; {result.paced_down_requests} requests to the down one")
    return result
