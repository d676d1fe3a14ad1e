"""Decompression a producer cannot turn against the worker: bounded, and only kombu's own codecs.

kombu decompresses a message whose ``compression`` header names one of its codecs before any
consumer callback sees it (``kombu.message.Message.__init__``). Left as kombu ships it:

- a body that does not match its header (a real gzip file under kombu's ``gzip``, which is zlib)
  becomes a decode error; :mod:`worker.broker.guard` turns those into dead letters;
- a small body that expands to gigabytes (a "zip bomb") would be expanded whole, in memory.

:func:`install` replaces the decoder of every codec kombu registered with one that stops at
:data:`MAX_DECOMPRESSED_BYTES` (raising :class:`TooLarge`, a decode error like any other), and a
codec that cannot be bounded (brotli and zstd, when their packages are installed) with one that
refuses. A body compressed as kombu compresses it (``zlib``, ``bzip2``, ``lzma``) is read as usual.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import Any

from kombu import compression

#: The most bytes a compressed body may expand to: the worker's own limit for a message body
#: (worker.events.parsing.MAX_MESSAGE_BYTES) and a little more, so that "too large" is said there.
MAX_DECOMPRESSED_BYTES = 10 * 1024 * 1024 + 1

#: Read in pieces of this size, so that a bomb is stopped after one piece past the limit.
CHUNK = 1024 * 1024


class TooLarge(ValueError):
    """A compressed body expands past :data:`MAX_DECOMPRESSED_BYTES`."""


class Unsupported(ValueError):
    """A codec whose output the worker cannot bound: not read."""


def bounded(make: Callable[[], Any], *, limit: int = MAX_DECOMPRESSED_BYTES) -> Callable[[bytes], bytes]:
    """A decoder for ``make()``'s incremental decompressor (zlib, bz2, lzma) that refuses to
    produce more than ``limit`` bytes, and refuses a body with trailing garbage or cut short."""

    def decode(body: bytes) -> bytes:
        decompressor = make()
        out = bytearray()
        data = bytes(body)
        idle = 0  # calls in a row that produced nothing
        while True:
            piece = decompressor.decompress(data, CHUNK)
            out += piece
            if len(out) > limit:
                raise TooLarge(f"the body expands past {limit} bytes")
            data = getattr(decompressor, "unconsumed_tail", b"")  # zlib hands back what it did not read
            if getattr(decompressor, "eof", False):
                if getattr(decompressor, "unused_data", b""):
                    raise ValueError("bytes after the end of the compressed stream")
                return bytes(out)
            idle = 0 if piece else idle + 1
            if idle > 1 or (not piece and not data and getattr(decompressor, "needs_input", True)):
                raise ValueError("the compressed stream is cut short")

    return decode


def _refuse(name: str) -> Callable[[bytes], bytes]:
    def decode(body: bytes) -> bytes:
        raise Unsupported(f"{name} bodies are not read by this worker: publish uncompressed JSON")

    return decode


#: The decoders that replace kombu's, by the content type kombu registers them under.
BOUNDED: dict[str, Callable[[bytes], bytes]] = {
    "application/x-gzip": bounded(zlib.decompressobj),
    "application/x-bz2": bounded(bz2.BZ2Decompressor),
    "application/x-lzma": bounded(lzma.LZMADecompressor),
}


def install() -> None:
    """Replace every decoder kombu registered (see the module docstring). Idempotent."""
    for content_type in compression.encoders():
        encoder, _ = compression.get_encoder(content_type)
        compression.register(encoder, BOUNDED.get(content_type) or _refuse(content_type), content_type)
