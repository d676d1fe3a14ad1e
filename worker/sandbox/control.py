"""The ``/_sandbox`` control endpoints: what a demo, a benchmark or another process uses to
see what the sandbox received and to set its faults, over plain HTTP without authentication.

========  ======================  ===========================================================
GET       /_sandbox/health        ``{"status": "ok"}``
GET       /_sandbox/accepted      ``{"events": [...], "count": N}``: every stored event
GET       /_sandbox/dropped       ``{"events": [...], "count": N}``: answered 200, not stored
GET       /_sandbox/requests      ``[{"status", "events", "asset_ids", "fault", "at", ...}]``
GET       /_sandbox/faults        the active fault rules, with their ``remaining`` uses
POST      /_sandbox/faults        append a rule, or a list of rules (400 if one is wrong)
DELETE    /_sandbox/faults        clear the fault rules
POST      /_sandbox/reset         forget events, records and faults
========  ======================  ===========================================================
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

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

OK: dict[str, str] = {"status": "success"}


def handle_control(store: Store, method: str, path: str, body: bytes) -> Answer:
    """Answer one control request: 404 for an unknown path, 405 for a wrong method."""
    routes = ROUTES.get(path.removeprefix(CONTROL_PREFIX).rstrip("/"))
    if routes is None:
        return 404, {"status": "fail", "message": "Not Found"}
    handler = routes.get(method)
    if handler is None:
        return 405, {"status": "fail", "message": "Method Not Allowed"}
    return handler(store, body)


def _health(store: Store, body: bytes) -> Answer:
    return 200, {"status": "ok"}


def _accepted(store: Store, body: bytes) -> Answer:
    events = store.accepted()
    return 200, {"events": events, "count": len(events)}


def _dropped(store: Store, body: bytes) -> Answer:
    events = store.dropped()
    return 200, {"events": events, "count": len(events)}


def _requests(store: Store, body: bytes) -> Answer:
    return 200, [record.to_dict() for record in store.requests()]


def _faults(store: Store, body: bytes) -> Answer:
    with store.lock:
        return 200, store.faults.rules()


def _add_faults(store: Store, body: bytes) -> Answer:
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


def _clear_faults(store: Store, body: bytes) -> Answer:
    store.clear_faults()
    return 200, OK


def _reset(store: Store, body: bytes) -> Answer:
    store.reset()
    return 200, OK


#: Path (after the prefix) -> method -> handler.
ROUTES: dict[str, dict[str, Callable[[Store, bytes], Answer]]] = {
    "health": {"GET": _health},
    "accepted": {"GET": _accepted},
    "dropped": {"GET": _dropped},
    "requests": {"GET": _requests},
    "faults": {"GET": _faults, "POST": _add_faults, "DELETE": _clear_faults},
    "reset": {"POST": _reset},
}
