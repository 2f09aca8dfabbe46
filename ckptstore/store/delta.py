"""Delta chunks: a chunk stored as its difference from the parent checkpoint's chunk of the
same rows (docs/format.md, "Delta chunks").

Float chunks are stored as the *ordered-integer difference*: each element's bits, mapped to
an integer that orders like the float (sign-magnitude → two's complement), minus the base's,
modulo 2^bits, zigzag-coded so that small steps either way have many leading zero bits. A
weight that moved by a few ulps costs a few low bits, where XOR costs every bit up to the
highest one that flipped, and a carry across the exponent (0x3F7FFFFF → 0x3F800000) costs
one step, not 24 bits. On the fine-tune and pretraining series of docs/benchmarks.md it
stores 5% fewer bytes than XOR (weights 1.69× → 1.80×). Those planes are byte-grouped
without the sign rotation (zigzag already put the sign in bit 0). Other element types keep
XOR under their own chain.

A delta payload starts with one op byte (``OP_XOR``/``OP_SUB``, both ≥ 0x80), so it names
its own transform; a payload without one is a delta chunk of the first delta format (XOR
under the chain, keys in the ``ckptstore-delta-1`` domain), still read.
"""

from __future__ import annotations

import numpy as np
import xxhash

from ckptstore.codecs.base import Buffer, byte_view
from ckptstore.codecs.bytegroup import ByteGroup
from ckptstore.codecs.pipeline import Pipeline
from ckptstore.errors import CodecError

DELTA_DOMAIN = b"ckptstore-delta-2"
"""Key domain of delta chunks with an op byte."""
LEGACY_DOMAIN = b"ckptstore-delta-1"
"""Key domain of the first format's XOR delta chunks (no op byte)."""

OP_XOR = 0xD1
"""``raw XOR base``, encoded with the blob's chain."""
OP_SUB = 0xD2
"""Zigzag ordered-integer difference of ``width``-byte floats, encoded with the blob's chain
without the sign rotation."""

_INT = {2: np.int16, 4: np.int32, 8: np.int64}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def delta_key(pipeline: Pipeline, base: bytes, raw: Buffer, *, legacy: bool = False) -> bytes:
    """16-byte key of a delta chunk: raw bytes ``raw`` stored against chunk ``base`` under
    ``pipeline``. Equal content on the same base is one object; a reader checks it against
    the bytes it rebuilt."""
    h = xxhash.xxh3_128()
    h.update(LEGACY_DOMAIN if legacy else DELTA_DOMAIN)
    h.update(base)
    h.update(pipeline.spec)
    h.update(raw)
    return h.digest()


def _float_width(pipeline: Pipeline) -> int | None:
    """Element width of a float chain (one that starts with a rotating byte grouping)."""
    first = pipeline.codecs[0] if pipeline.codecs else None
    if isinstance(first, ByteGroup) and first.rotate and first.width in _INT:
        return first.width
    return None


def _sub_tail(pipeline: Pipeline, width: int) -> Pipeline:
    return Pipeline([ByteGroup(width), *pipeline.codecs[1:]])


def _ordered(v: np.ndarray, width: int) -> np.ndarray:
    """Float bits (as signed ints) → ints that order like the floats; its own inverse."""
    mask = np.array((1 << (8 * width - 1)) - 1, dtype=_INT[width])
    return v ^ ((v >> (8 * width - 1)) & mask)


def encode_delta(pipeline: Pipeline, raw: Buffer, base: Buffer) -> bytes:
    """The payload storing ``raw`` against ``base`` (equal lengths) under the lossless
    ``pipeline``: one op byte, then the encoded difference."""
    a = np.frombuffer(raw, dtype=np.uint8)
    b = np.frombuffer(base, dtype=np.uint8)
    if a.size != b.size:
        raise ValueError(f"delta of {a.size} bytes against a base of {b.size}")
    width = _float_width(pipeline)
    if width is None or a.size % width:
        return bytes([OP_XOR]) + bytes(byte_view(pipeline.encode(np.bitwise_xor(a, b))))
    bits = 8 * width
    with np.errstate(over="ignore"):
        d = _ordered(a.view(_INT[width]), width) - _ordered(b.view(_INT[width]), width)
        z = (d << 1) ^ (d >> (bits - 1))
    return bytes([OP_SUB]) + bytes(byte_view(_sub_tail(pipeline, width).encode(z)))


def apply_delta(pipeline: Pipeline, payload: Buffer, acc: np.ndarray, base_key: bytes) -> bytes:
    """Turn ``acc`` (uint8, the base's raw bytes) into the delta chunk's raw bytes, in place,
    decoding ``payload`` with at most ``acc.size`` bytes of output; return the key those
    bytes must have (the chunk's own key when nothing is damaged). Raises CodecError."""
    view = byte_view(payload)
    if len(view) == 0:
        raise CodecError("empty delta payload")
    op, expected = view[0], acc.size
    if op < 0x80:  # the first format: XOR under the chain, no op byte
        _, diff = pipeline.decode_parts(view, expected_size=expected)
        np.bitwise_xor(acc, np.frombuffer(diff, dtype=np.uint8), out=acc)
        return delta_key(pipeline, base_key, acc, legacy=True)
    if op == OP_XOR:
        _, diff = pipeline.decode_parts(view[1:], expected_size=expected)
        np.bitwise_xor(acc, np.frombuffer(diff, dtype=np.uint8), out=acc)
    elif op == OP_SUB:
        width = _float_width(pipeline)
        if width is None or expected % width:
            raise CodecError(f"an ordered-integer delta under {pipeline.short()}")
        _, diff = _sub_tail(pipeline, width).decode_parts(view[1:], expected_size=expected)
        z = np.frombuffer(diff, dtype=_UINT[width])
        one = _UINT[width](1)
        d = (z >> one).view(_INT[width]) ^ -(z & one).view(_INT[width])
        v = acc.view(_INT[width])
        with np.errstate(over="ignore"):
            k = _ordered(v, width) + d
        v[:] = _ordered(k, width)
    else:
        raise CodecError(f"unknown delta op 0x{op:02x}")
    return delta_key(pipeline, base_key, acc)
