"""JSON out: orjson when it can, the standard library when it cannot.

orjson is ten times faster, but refuses integers beyond 64 bits; such values are valid JSON
and are forwarded unchanged by falling back to :mod:`json`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any) -> bytes:
    """Serialize to compact UTF-8 JSON bytes."""
    try:
        return orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def loads(data: bytes | str) -> Any:
    """Parse JSON produced by :func:`dumps` (internal messages, not producers' bodies)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
