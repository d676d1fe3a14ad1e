"""The ``/_sandbox`` control endpoints: what a demo, a benchmark or another process uses to
see what the sandbox received and to set its faults, over plain HTTP without authentication.

========  ==========================  =======================================================
GET       /_sandbox/health            ``{"status": "ok"}``
GET       /_sandbox/accepted          ``{"events": [...], "count": N}``: every stored event
GET       /_sandbox/accepted?account=A  the same, for the events uploaded with account A's key
GET       /_sandbox/dropped           ``{"events": [...], "count": N}``: answered 200, not stored
GET       /_sandbox/requests          ``[{"status", "events", "asset_ids", "fault", "at", ...}]``:
                                      one record per upload request, in arrival order
GET       /_sandbox/requests?since=N  the records from position N on (0 is the first): a
                                      poller keeps the count it has read and asks only for
                                      the new ones (``since=N+len(answer)`` next time)
GET       /_sandbox/faults            the active fault rules, with their ``remaining`` uses
POST      /_sandbox/faults            append a rule, or a list of rules (400 if one is wrong)
DELETE    /_sandbox/faults            clear the fault rules
POST      /_sandbox/reset             forget events, records and faults (positions restart at 0)
========  ==========================  =======================================================

Polling ``/_sandbox/requests`` without ``since`` copies and sends every record each time:
fine for a test's few dozen, not for a benchmark's 100,000 (10 MB a poll).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from worker.sandbox.faults import FaultError, FaultRule
from worker.sandbox.rules import BadRequest, parse_body
from worker.sandbox.store import Store

try:
    import orjson

    def to_json(value: Any) -> bytes:
        """Serialise an answer (orjson when installed: large ``accepted`` lists are common)."""
        return orjson.dumps(value)

except ImportError:  # pragma: no cover - depends on the environment

    def to_json(value: Any) -> bytes:
        """Serialise an answer."""
        return json.dumps(value, separators=(",", ":")).encode()


#: Every control path starts with this; nothing of the real API does.
CONTROL_PREFIX = "/_sandbox/"

#: An answer: HTTP status and a JSON-serialisable payload.
Answer = tuple[int, Any]

#: A request's query string, parsed: name -> values.
Query = Mapping[str, list[str]]

OK: dict[str, str] = {"status": "success"}


def handle_control(store: Store, method: str, target: str, body: bytes) -> Answer:
    """Answer one control request (``target`` is the path with its query string): 404 for an
    unknown path, 405 for a wrong method."""
    path, _, query = target.partition("?")
    routes = ROUTES.get(path.removeprefix(CONTROL_PREFIX).rstrip("/"))
    if routes is None:
        return 404, {"status": "fail", "message": "Not Found"}
    handler = routes.get(method)
    if handler is None:
        return 405, {"status": "fail", "message": "Method Not Allowed"}
    return handler(store, body, parse_qs(query, keep_blank_values=True))


def _health(store: Store, body: bytes, query: Query) -> Answer:
    return 200, {"status": "ok"}


def _accepted(store: Store, body: bytes, query: Query) -> Answer:
    account = query.get("account", [None])[-1]
    events = store.accepted(account or None)
    return 200, {"events": events, "count": len(events)}


def _dropped(store: Store, body: bytes, query: Query) -> Answer:
    events = store.dropped()
    return 200, {"events": events, "count": len(events)}


def _requests(store: Store, body: bytes, query: Query) -> Answer:
    """Every record, or with ``?since=N`` those from position N on."""
    values = query.get("since", ["0"])
    if len(values) != 1 or not values[0].isascii() or not values[0].isdigit():
        message = "since must be one whole number >= 0, e.g. since=120"
        return 400, {"status": "fail", "message": message}
    return 200, [record.to_dict() for record in store.requests(int(values[0]))]


def _faults(store: Store, body: bytes, query: Query) -> Answer:
    with store.lock:
        return 200, store.faults.rules()


def _add_faults(store: Store, body: bytes, query: Query) -> Answer:
    """Append one rule or a list; all are checked first, so a bad list adds nothing."""
    try:
        specs = parse_body(body)
        for spec in specs:
            if not isinstance(spec, dict):
                raise FaultError("a rule must be a JSON object")
            FaultRule.from_dict(spec)
    except (BadRequest, FaultError) as error:
        return 400, {"status": "fail", "message": str(error)}
    with store.lock:
        for spec in specs:
            store.faults.add(spec)
        return 200, {**OK, "faults": store.faults.rules()}


def _clear_faults(store: Store, body: bytes, query: Query) -> Answer:
    store.clear_faults()
    return 200, OK


def _reset(store: Store, body: bytes, query: Query) -> Answer:
    store.reset()
    return 200, OK


#: Path (after the prefix) -> method -> handler.
ROUTES: dict[str, dict[str, Callable[[Store, bytes, Query], Answer]]] = {
    "health": {"GET": _health},
    "accepted": {"GET": _accepted},
    "dropped": {"GET": _dropped},
    "requests": {"GET": _requests},
    "faults": {"GET": _faults, "POST": _add_faults, "DELETE": _clear_faults},
    "reset": {"POST": _reset},
}
