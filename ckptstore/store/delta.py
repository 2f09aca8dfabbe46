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

The default float chains write ``OP_SPARSE``: the same difference with each mostly-zero
byte plane (the top ones) stored as a bitmap plus its non-zero bytes when that is smaller,
because zstd's Huffman literals spend at least a bit a byte.

A delta payload starts with one op byte (``OP_XOR``/``OP_SUB``/``OP_SPARSE``, all ≥ 0x80), so
it names its own transform; a payload without one is a delta chunk of the first delta format
(XOR under the chain, keys in the ``ckptstore-delta-1`` domain), still read.
"""

from __future__ import annotations

import threading

import numpy as np
import xxhash

from ckptstore.codecs.base import Buffer, byte_view
from ckptstore.codecs.bytegroup import ByteGroup
from ckptstore.codecs.pipeline import Pipeline
from ckptstore.codecs.zstd import Zstd
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
OP_SPARSE = 0xD3
"""The same difference, byte-grouped, each mostly-zero byte plane stored as a bitmap of its
non-zero bytes plus those bytes (written for the default float chains)."""
SPARSE_BELOW = 0.5
"""A byte plane with fewer non-zero bytes than this fraction is also encoded sparse, and the
smaller kept. Huffman codes (zstd's literals) spend at least one bit a byte, so a plane of
80% zeros costs 1.8 bits an element where its entropy is 1.3: the top plane of a bf16
weight's difference. On bf16 pretraining states the delta chunks shrink by 3%
(docs/benchmarks.md, "Delta")."""
SPARSE_SURE = (0.1, 0.3)
"""Planes with a non-zero share in this range go sparse without encoding them whole too: on
the planes of docs/benchmarks.md's series sparse won 221 of 221 there (below it a mostly-zero
plane's runs suit zstd's matches, above it the bitmap costs nearly a bit a byte)."""

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


def _sparse_coder(pipeline: Pipeline) -> Zstd | None:
    """The zstd settings of a default float chain (rotating byte grouping, then zstd), which
    the sparse op codes its streams with; None for any other chain."""
    codecs = pipeline.codecs
    if len(codecs) == 2 and type(codecs[0]) is ByteGroup and type(codecs[1]) is Zstd:
        return Zstd(level=codecs[1].level, entropy=codecs[1].entropy)
    return None


_BLOCK = 32768
"""Elements per block of the difference passes (128 KiB of fp32: they stay in L2)."""
_SCRATCH = threading.local()


def _scratch(slot: int, nbytes: int) -> np.ndarray:
    """This thread's reused uint8 buffer ``slot`` of ``nbytes`` (valid until its next use)."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < nbytes:
        buf = bufs[slot] = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def _order(v: np.ndarray, t: np.ndarray, width: int, out: np.ndarray | None = None) -> None:
    """Float bits ``v`` (signed ints) → ints that order like the floats, into ``out``
    (default: in place; ``t``: a scratch array like ``v``); its own inverse."""
    np.right_shift(v, 8 * width - 1, out=t)
    np.bitwise_and(t, (1 << (8 * width - 1)) - 1, out=t)
    np.bitwise_xor(v, t, out=v if out is None else out)


def encode_delta(pipeline: Pipeline, raw: Buffer, base: Buffer) -> bytes:
    """The payload storing ``raw`` against ``base`` (equal lengths) under the lossless
    ``pipeline``: one op byte, then the encoded difference."""
    a = np.frombuffer(raw, dtype=np.uint8)
    b = np.frombuffer(base, dtype=np.uint8)
    if a.size != b.size:
        raise ValueError(f"delta of {a.size} bytes against a base of {b.size}")
    width = _float_width(pipeline)
    if width is None or a.size % width:
        x = _scratch(0, a.size)
        np.bitwise_xor(a, b, out=x)
        return bytes([OP_XOR]) + bytes(byte_view(pipeline.encode(x)))
    it = _INT[width]
    d = _scratch(0, a.size).view(it)
    t = _scratch(1, _BLOCK * width).view(it)
    av, bv = a.view(it), b.view(it)
    for i in range(0, d.size, _BLOCK):  # block by block, so the passes stay in cache
        j = min(i + _BLOCK, d.size)
        db, tb = d[i:j], t[: j - i]
        _order(av[i:j], tb, width, out=db)
        _order(bv[i:j], tb, width, out=tb)  # (tb is read before it is written, element-wise)
        np.subtract(db, tb, out=db)  # modulo 2^bits: numpy integer arithmetic wraps
        np.right_shift(db, 8 * width - 1, out=tb)  # zigzag: (d << 1) ^ (d >> (bits - 1))
        np.left_shift(db, 1, out=db)
        np.bitwise_xor(db, tb, out=db)
    z = d.view(np.uint8)
    coder = _sparse_coder(pipeline)
    if coder is not None:
        return _encode_sparse(coder, z, width)
    return bytes([OP_SUB]) + bytes(byte_view(_sub_tail(pipeline, width).encode(z)))


def _encode_sparse(coder: Zstd, z: np.ndarray, width: int) -> bytes:
    """``OP_SPARSE``, a mask byte (bit k: plane k is sparse), then the zstd container of the
    streams: per byte plane, lowest first, the plane, or its bitmap (``plane != 0``, packed
    8 a byte, little bit order) and its non-zero bytes — for a plane with fewer than
    ``SPARSE_BELOW`` non-zero bytes, whichever of the two is smaller (``SPARSE_SURE``: sparse
    without comparing)."""
    planes = np.frombuffer(ByteGroup(width).encode(z), dtype=np.uint8)
    m = planes.size // width
    mask, segments = 0, []
    for k in range(width):
        plane = planes[k * m : (k + 1) * m]
        share = np.count_nonzero(plane) / max(1, m)  # (counts without a mask)
        if share < SPARSE_BELOW:
            nonzero = np.not_equal(plane, 0, out=_scratch(2, m).view(np.bool_))
            bitmap = coder.encode_segment(np.packbits(nonzero, bitorder="little"))
            values = coder.encode_segment(np.compress(nonzero, plane))
            sparse = len(bitmap[1]) + len(values[1]) + Zstd.SEGMENT_ENTRY  # (one more segment)
            sure = SPARSE_SURE[0] <= share < SPARSE_SURE[1]  # (no whole encode to compare)
            if sure or sparse < len((dense := coder.encode_segment(plane))[1]):
                mask |= 1 << k
                segments += [bitmap, values]
                continue
        else:
            dense = coder.encode_segment(plane)
        segments.append(dense)
    return coder.join_segments(segments, prefix=bytes([OP_SPARSE, mask]))


def _decode_sparse(coder: Zstd, view: memoryview, out: np.ndarray, width: int) -> None:
    """Invert :func:`_encode_sparse` (``view``: what follows the op byte) into ``out``, the
    difference's bytes; every malformation is a CodecError."""
    n = out.size
    m = n // width
    bitmap = (m + 7) // 8
    if len(view) < 1 or view[0] >> width:
        raise CodecError("sparse delta without a valid plane mask")
    mask = view[0]
    sparse = [bool(mask >> k & 1) for k in range(width)]
    segs = coder.decode_segments(view[1:], n + sum(sparse) * bitmap)
    if len(segs) != width + sum(sparse):
        raise CodecError(f"sparse delta of {len(segs)} streams, expected {width + sum(sparse)}")
    planes: list[np.ndarray] = []
    it = iter(segs)
    for k in range(width):
        first = np.frombuffer(next(it), dtype=np.uint8)
        if not sparse[k]:
            if first.size != m:
                raise CodecError(f"sparse delta: plane {k} holds {first.size} bytes, not {m}")
            planes.append(first)
            continue
        values = np.frombuffer(next(it), dtype=np.uint8)
        if first.size != bitmap:
            raise CodecError(f"sparse delta: bitmap {k} of {first.size} bytes, not {bitmap}")
        planes.append(_scatter(first, values, _scratch(3 + k, m), k))
    ByteGroup(width).decode_into(planes, out)


_SCATTER_BLOCK = 1 << 16
"""Plane bytes scattered per block (a multiple of 8): the index array stays small."""


def _scatter(bitmap: np.ndarray, values: np.ndarray, plane: np.ndarray, k: int) -> np.ndarray:
    """Plane ``k`` rebuilt into ``plane`` from its bitmap and non-zero bytes, block by block
    (memory beyond ``plane`` stays ~9 × ``_SCATTER_BLOCK`` bytes whatever the payload says);
    a bitmap and values that disagree, a set padding bit or a zero value is a CodecError."""
    m, pos = plane.size, 0
    if m % 8 and bitmap[-1] >> (m % 8):
        raise CodecError(f"sparse delta: bitmap {k} sets bits past the plane's {m} bytes")
    if np.count_nonzero(values) != values.size:
        raise CodecError(f"sparse delta: plane {k} lists a zero byte among its non-zero ones")
    plane.fill(0)
    for i in range(0, m, _SCATTER_BLOCK):
        j = min(i + _SCATTER_BLOCK, m)
        bits = np.unpackbits(bitmap[i // 8 : (j + 7) // 8], count=j - i, bitorder="little")
        idx = np.flatnonzero(bits.view(np.bool_))  # (on bools: 3× faster than on uint8)
        if pos + idx.size > values.size:
            break
        plane[i:j][idx] = values[pos : pos + idx.size]
        pos += idx.size
    else:
        if pos == values.size:
            return plane
    marked = int(np.unpackbits(bitmap, count=m, bitorder="little").sum(dtype=np.int64))
    raise CodecError(
        f"sparse delta: plane {k} marks {marked} non-zero bytes but holds {values.size}"
    )


def apply_delta(pipeline: Pipeline, payload: Buffer, acc: np.ndarray, base_key: bytes) -> bytes:
    """Turn ``acc`` (uint8, the base's raw bytes) into the delta chunk's raw bytes, in place,
    decoding ``payload`` with at most ``acc.size`` bytes of output; return the key those
    bytes must have (the chunk's own key when nothing is damaged). Raises CodecError."""
    view = byte_view(payload)
    if len(view) == 0:
        raise CodecError("empty delta payload")
    op, n = view[0], acc.size
    if op < 0x80:  # the first format: XOR under the chain, no op byte
        np.bitwise_xor(acc, pipeline.decode_into(view, _scratch(0, n)), out=acc)
        return delta_key(pipeline, base_key, acc, legacy=True)
    if op == OP_XOR:
        np.bitwise_xor(acc, pipeline.decode_into(view[1:], _scratch(0, n)), out=acc)
    elif op in (OP_SUB, OP_SPARSE):
        width = _float_width(pipeline)
        coder = _sparse_coder(pipeline)
        if width is None or n % width or (op == OP_SPARSE and coder is None):
            raise CodecError(f"an ordered-integer delta under {pipeline.short()}")
        z = _scratch(0, n)
        if coder is not None and op == OP_SPARSE:
            _decode_sparse(coder, view[1:], z, width)
        else:
            _sub_tail(pipeline, width).decode_into(view[1:], z)
        _add_difference(acc, z.view(_UINT[width]), width)
    else:
        raise CodecError(f"unknown delta op 0x{op:02x}")
    return delta_key(pipeline, base_key, acc)


def _add_difference(acc: np.ndarray, z: np.ndarray, width: int) -> None:
    """``acc`` (a base's raw bytes) += the zigzag ordered-integer difference ``z``, in place."""
    it, ut = _INT[width], _UINT[width]
    t = _scratch(1, _BLOCK * width)
    v = acc.view(it)
    for i in range(0, v.size, _BLOCK):  # block by block, so the passes stay in cache
        j = min(i + _BLOCK, v.size)
        zb, tu, vb = z[i:j], t[: (j - i) * width].view(ut), v[i:j]
        ti = tu.view(it)
        np.bitwise_and(zb, 1, out=tu)  # unzigzag: (z >> 1) ^ -(z & 1)
        np.negative(ti, out=ti)
        np.right_shift(zb, 1, out=zb)
        d = zb.view(it)
        np.bitwise_xor(d, ti, out=d)
        _order(vb, ti, width)
        np.add(vb, d, out=vb)
        _order(vb, ti, width)
