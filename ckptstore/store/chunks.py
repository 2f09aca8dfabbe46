"""Chunk objects: content keys, the stored frame with its checksum, and the row cutter.

A chunk's key is the 128-bit xxh3 of the codec spec followed by the raw bytes, so the same
bytes under two codecs are two objects, and equal content under one codec is one object.
The stored object is ``b"CKC1" + u64 xxh3_64(payload) + payload``: every read checks the
checksum of what was stored, which catches corruption also for lossy codecs.

A delta chunk (opt-in, lossless only) is framed the same way; its payload and key are
``store/delta.py``'s, and the manifest entry names its base chain.
"""

from __future__ import annotations

import struct

import xxhash

from ckptstore.codecs.base import Buffer
from ckptstore.codecs.pipeline import Pipeline
from ckptstore.errors import CorruptChunkError

CHUNK_MAGIC = b"CKC1"
_HEADER = struct.Struct("<4sQ")
HEADER_BYTES = _HEADER.size


def content_key(pipeline: Pipeline, raw: Buffer) -> bytes:
    """16-byte content key of ``raw`` under ``pipeline``."""
    h = xxhash.xxh3_128()
    h.update(pipeline.spec)
    h.update(raw)
    return h.digest()


def checksum(payload: Buffer) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def frame(payload: Buffer) -> bytes:
    """The stored object for an encoded payload."""
    return b"".join([_HEADER.pack(CHUNK_MAGIC, checksum(payload)), payload])


def frame_parts(parts: list[Buffer]) -> bytes:
    """The stored object for a payload given as pieces (``Pipeline.encode_parts``): the
    checksum hashes them in turn and one join makes the object, no payload-sized copy
    before it."""
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return b"".join([_HEADER.pack(CHUNK_MAGIC, h.intdigest()), *parts])


def unframe(stored: Buffer, where: str) -> memoryview:
    """The payload of a stored object, after checking magic and checksum."""
    view = memoryview(stored)
    if len(view) < HEADER_BYTES:
        raise CorruptChunkError(f"chunk {where} is truncated ({len(view)} bytes)")
    magic, expect = _HEADER.unpack_from(view)
    if magic != CHUNK_MAGIC:
        raise CorruptChunkError(f"chunk {where} has bad magic {magic!r}")
    payload = view[HEADER_BYTES:]
    if checksum(payload) != expect:
        raise CorruptChunkError(f"chunk {where} failed its checksum (corrupt or truncated)")
    return payload


def row_ranges(
    rows: int, row_bytes: int, chunk_bytes: int, first_row: int = 0
) -> list[tuple[int, int]]:
    """Cut ``rows`` rows into ranges of about ``chunk_bytes``, on a global row grid.

    Boundaries fall on multiples of the rows-per-chunk counted from global row 0, with
    ``first_row`` the global index of local row 0; a shard saved at another world size
    therefore cuts the same chunks where it can and dedups against earlier saves.
    Returned ranges are local: [start, stop) with 0 <= start < stop <= rows.
    """
    if rows <= 0:
        return []
    per = max(1, chunk_bytes // max(1, row_bytes))
    out = []
    start = 0
    while start < rows:
        global_row = first_row + start
        stop = min(rows, start + per - (global_row % per))
        out.append((start, stop))
        start = stop
    return out
