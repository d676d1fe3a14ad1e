"""Compact bodies: JSON exactly as orjson writes it, read by orjson with the strict rules kept.

The strict parser (:mod:`worker.events.parsing`) pays for every rule with Python code: a hook
per object for duplicate keys, one per float, scans for lone surrogates and depth. Most bodies
need none of it, and this module proves so cheaply: orjson reads the body and writes the value
back; if that gives the very same bytes, no rule can be broken but depth. orjson refuses NaN,
Infinity, overflowing floats, lone surrogates, control characters and invalid UTF-8 outright;
it reads an integer beyond 64 bits as a float and keeps one of two equal keys, and either
would write back differently. And the strict parser would read the same value: every number
written the shortest way, every string with escapes both read alike, no key twice.

Compact are the texts the ingest step writes for the events of an array, and the bodies of
most producers' serialisers (orjson, JavaScript's ``JSON.stringify``, Jackson...); Python's
``json.dumps`` with its default spaces is not, and goes to the strict parser as before, after
about 2 us spent here. ``tests/test_differential.py`` holds the two readings to the same value.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

#: What :func:`compact_value` returns for a body orjson would not write byte for byte.
NOT_COMPACT: Final = object()


def compact_value(body: bytes | str, *, max_bytes: int, max_depth: int) -> Any:
    """The value of a body that is exactly orjson's writing of it, else :data:`NOT_COMPACT`.

    Also :data:`NOT_COMPACT` over ``max_bytes``, or when the body may nest deeper than
    ``max_depth`` levels: more brackets than that, and a line indented for a value that deep
    when orjson pretty-prints it (two spaces a level; a string cannot hold a raw newline), which
    costs a tenth of walking a 50-event array's values. The strict parser then decides.
    """
    if isinstance(body, str):
        try:
            data = body.encode()
        except UnicodeEncodeError:  # a lone surrogate in the text itself
            return NOT_COMPACT
    else:
        data = body if type(body) is bytes else bytes(body)
    if len(data) > max_bytes:
        return NOT_COMPACT
    try:
        value = orjson.loads(data)
        if orjson.dumps(value) != data:
            return NOT_COMPACT
        if data.count(b"[") + data.count(b"{") > max_depth and b"\n" + b"  " * max_depth in orjson.dumps(
                value, option=orjson.OPT_INDENT_2):
            return NOT_COMPACT
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):  # not JSON; nested past orjson's writer
        return NOT_COMPACT
    return value
