"""``python -m worker.sandbox``: run the sandbox API in the foreground until SIGTERM or Ctrl-C.

The API key comes from ``--api-key``, else ``SANDBOX_API_KEY``, else ``sandbox-key``: the account
``default``. ``--account NAME=KEY`` (repeatable) serves more keys, each an account of its own, as
the real API does for several Netcore panels. Keys are never printed or logged: the banner says
only where the sandbox listens, and loudly that it is not the real Netcore API, so nobody
mistakes a demo's "success" for delivered events.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from worker.sandbox.faults import FaultError, FaultRule
from worker.sandbox.server import DEFAULT_ACCOUNT, Sandbox

log = logging.getLogger("worker.sandbox")

#: The key a client must send when neither ``--api-key`` nor ``SANDBOX_API_KEY`` sets one.
DEFAULT_API_KEY = "sandbox-key"


def parse_args(argv: Sequence[str] | None = None, *, prog: str = "python -m worker.sandbox") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A local, Netcore-compatible Activity API (NOT the real one) with faults.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=os.environ.get("SANDBOX_API_KEY", DEFAULT_API_KEY),
                        help="the Bearer key clients must send (default: $SANDBOX_API_KEY)")
    parser.add_argument("--account", action="append", default=[], metavar="NAME=KEY", type=_account,
                        help="another account: its name and the key its clients send (repeatable)")
    parser.add_argument("--fail-rate", type=float, default=0.0,
                        help="probability that an upload fails with --fail-status")
    parser.add_argument("--fail-status", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds every upload waits before it is answered")
    parser.add_argument("--rate-limit", type=int, default=None, metavar="N",
                        help="answer uploads beyond N a second with 429 and Retry-After: 1, as a "
                             "rate-limited API (each account its own N)")
    parser.add_argument("--fault", action="append", default=[], metavar="JSON",
                        help='an extra fault rule, e.g. \'{"status": 429, "retry_after": 2, '
                             '"count": 3}\'; "asset_id": "..." limits it to one tenant\'s uploads, '
                             '"account": "..." to one account\'s (repeatable)')
    parser.add_argument("--seed", type=int, default=None, help="seed of the random faults")
    parser.add_argument("--quiet", action="store_true", help="do not log every request")
    return parser.parse_args(argv)


def _account(text: str) -> tuple[str, str]:
    name, _, key = text.partition("=")
    if not name or not key:
        raise argparse.ArgumentTypeError(f"{text.split('=')[0]}=...: give NAME=KEY")
    return name, key


def fault_rules(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rules the options ask for; latency first, since it only delays (see faults.py)."""
    rules: list[dict[str, Any]] = []
    if args.latency > 0:
        rules.append({"latency": args.latency})
    if args.fail_rate > 0:
        rules.append({"status": args.fail_status, "rate": args.fail_rate})
    if args.rate_limit is not None:
        for name in [DEFAULT_ACCOUNT, *(name for name, _ in args.account)]:
            rules.append({"status": 429, "retry_after": 1, "per_second": args.rate_limit, "account": name})
    rules.extend(json.loads(text) for text in args.fault)
    for rule in rules:
        if not isinstance(rule, dict):
            raise FaultError(f"a rule must be a JSON object, not {rule!r}")
        FaultRule.from_dict(rule)  # fail before listening, with the reason
    return rules


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m worker.sandbox") -> int:
    """Run the sandbox until SIGTERM or Ctrl-C (``prog``: the name its usage shows)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, prog=prog)
    try:
        rules = fault_rules(args)
    except (FaultError, ValueError) as error:
        print(f"bad fault option: {error}", file=sys.stderr)
        return 2
    sandbox = Sandbox(api_key=args.api_key, host=args.host, port=args.port, seed=args.seed,
                      log_requests=not args.quiet, accounts=dict(args.account))
    for rule in rules:
        sandbox.add_fault(**rule)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with sandbox:
        print(f"*** Netcore SANDBOX (NOT the real Netcore API) listening on {sandbox.url} "
              f"- nothing sent here reaches Netcore ***", flush=True)
        for rule in rules:
            log.info("fault rule: %s", rule)
        stop.wait()
    log.info("sandbox stopped: %d events accepted", sandbox.accepted_count())
    return 0


if __name__ == "__main__":
    sys.exit(main())
