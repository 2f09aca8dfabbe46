"""Lossy first stages: fp16/bf16 casts and blockwise int8, with the error they introduce.

Each works on the raw bytes of a floating dtype named in its config (``source``) and is
decoded back to that dtype. A lossy codec must be the first codec of a pipeline; its output
(not the raw input) is what the chunk key hashes, so two saves of the same bytes with the
same codec config dedup, and a store could quantize on the device before the host copy.

Per chunk the codecs guard against silent damage:

- ``cast`` to fp16: elements outside fp16's normal range — a finite value that would
  overflow to ±inf, or a non-zero value below 2⁻¹⁴ that would become subnormal (losing
  precision) or 0 — are kept exactly (as float32) in a patch list stored with the chunk when
  they are at most 1/64 of it; a chunk with more of them is stored as bf16 instead (fp32's
  range). ``inspect`` counts both as fallback chunks. inf/NaN pass through unchanged.
- ``int8block``: a chunk holding inf or NaN is stored lossless (the source bytes); blocks
  whose scale does not fit fp16 make the chunk keep fp32 scales.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptstore.codecs.base import Buffer, Codec, byte_view
from ckptstore.codecs.registry import register
from ckptstore.errors import CodecError

SOURCES = ("float64", "float32", "bfloat16", "float16")
_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class QuantStats:
    """Error a lossy stage introduced on one chunk (sums, so chunks and shards add up)."""

    sq_err: float = 0.0
    sq_ref: float = 0.0
    max_abs: float = 0.0
    fallback: int = 0
    chunks: int = 0

    def add(self, other: QuantStats) -> None:
        self.sq_err += other.sq_err
        self.sq_ref += other.sq_ref
        self.max_abs = max(self.max_abs, other.max_abs)
        self.fallback += other.fallback
        self.chunks += other.chunks

    @property
    def rel_l2(self) -> float:
        """‖x − x̂‖ / ‖x‖ over finite elements."""
        return float(np.sqrt(self.sq_err / self.sq_ref)) if self.sq_ref > 0 else 0.0

    def pack(self) -> list[float | int]:
        return [self.sq_err, self.sq_ref, self.max_abs, self.fallback, self.chunks]

    @classmethod
    def unpack(cls, v: list[Any]) -> QuantStats:
        sq_err, sq_ref, max_abs, fallback, chunks = v
        return cls(float(sq_err), float(sq_ref), float(max_abs), int(fallback), int(chunks))


def to_float(data: Buffer, source: str) -> np.ndarray:
    """Elements of ``source`` dtype as float32 (float64 stays float64)."""
    if source == "float64":
        return np.frombuffer(data, dtype=np.float64)
    if source == "float32":
        return np.frombuffer(data, dtype=np.float32)
    if source == "float16":
        return np.frombuffer(data, dtype=np.float16).astype(np.float32)
    if source == "bfloat16":
        return (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"unsupported source dtype {source!r}")


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)  # keep sign, quiet NaN
    return rounded


def from_float(x: np.ndarray, source: str) -> bytes:
    """float32/float64 elements back to ``source`` dtype bytes."""
    if source == "float64":
        return x.astype(np.float64).tobytes()
    if source == "float32":
        return x.astype(np.float32).tobytes()
    if source == "float16":
        return x.astype(np.float16).tobytes()
    if source == "bfloat16":
        return bf16_bits(x.astype(np.float32)).tobytes()
    raise ValueError(f"unsupported source dtype {source!r}")


def _stats(x: np.ndarray, approx: np.ndarray, fallback: int) -> QuantStats:
    """Error sums over the finite elements of ``x`` (BLAS dots: fast, ~1e-6 relative)."""
    if not np.isfinite(x).all():
        finite = np.isfinite(x)
        x, approx = x[finite], approx[finite]
    if x.size == 0:
        return QuantStats(fallback=fallback, chunks=1)
    with np.errstate(over="ignore", invalid="ignore"):  # sums of squares of ~1e38 values
        diff = x - approx.astype(x.dtype, copy=False)
        return QuantStats(
            sq_err=float(np.dot(diff, diff)),
            sq_ref=float(np.dot(x, x)),
            max_abs=float(np.abs(diff).max()),
            fallback=fallback,
            chunks=1,
        )


class LossyCodec(Codec):
    lossless = False

    def quantize(self, data: Buffer) -> tuple[bytes, QuantStats]:
        """Encode ``data`` and report the error; ``encode`` is this without the stats."""
        raise NotImplementedError

    def encode(self, data: Buffer) -> Buffer:
        return self.quantize(data)[0]


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"quantization source must be one of {SOURCES}, got {source!r}")
    return source


# -- the stored formats of the lossy stages (public: ckptstore.dcp.device_quant writes the
# same bytes with torch on the device, so both implementations take these from here) -------

CAST_HEADER = struct.Struct("<BB")
"""Header of a ``cast`` payload: kind, reserved (2 bytes keep 2-byte grouping aligned)."""
CAST_AS_FP16, CAST_AS_BF16, CAST_PATCHED = 0, 1, 2
"""``cast`` kinds: the body is fp16 or bf16; ``kind | CAST_PATCHED``: a patch list follows
(uint32 indices, then the exact values in the source's width, then ``CAST_PATCH_COUNT``)."""
CAST_PATCH_COUNT = struct.Struct("<I")
"""Trailer of a patched ``cast`` payload: the number of patched elements."""
MAX_PATCHED_FRACTION = 64
"""A ``cast`` to fp16 patches at most 1/64 of a chunk's elements; more, and it is bf16."""
FP16_MIN_NORMAL = 2.0**-14
"""Smallest normal fp16 value: non-zero values below it are patched (``cast``), and an
int8 scale below it makes the chunk keep fp32 scales."""


@register
class Cast(LossyCodec):
    """float32/float64 → fp16 or bf16 (2 bytes per element)."""

    codec_id = "cast"

    def __init__(self, source: str, target: str) -> None:
        if target not in ("float16", "bfloat16"):
            raise ValueError(f"cast target must be float16 or bfloat16, got {target!r}")
        if _check_source(source) not in ("float32", "float64"):
            raise ValueError(f"cast to {target} needs a float32/float64 source, not {source}")
        self.source, self.target = source, target

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "source": self.source, "target": self.target}

    def short(self) -> str:
        return "fp16" if self.target == "float16" else "bf16"

    def quantize(self, data: Buffer) -> tuple[bytes, QuantStats]:
        """Cast, then keep exactly (patch) every element the cast would damage: a finite
        value that became ±inf, a non-zero value that became 0 — and for fp16 any value
        below its normal range. A fp16 chunk with more than 1/64 such elements is stored
        as bf16 instead. Patched or bf16-instead-of-fp16 chunks count as fallbacks."""
        x = to_float(data, self.source)
        fallback = 0
        kind = CAST_AS_BF16
        if self.target == "float16":
            with np.errstate(over="ignore", under="ignore"):
                body = x.astype(np.float16)
            tiny = (x != 0) & (np.abs(x) < FP16_MIN_NORMAL)  # subnormal or 0 in fp16
            bad = (np.isfinite(x) & ~np.isfinite(body)) | tiny
            if np.count_nonzero(bad) * MAX_PATCHED_FRACTION <= x.size:
                kind, approx = CAST_AS_FP16, body.astype(x.dtype)
            else:  # too many to patch: the chunk becomes bf16 (fp32's range)
                fallback = 1
        if kind == CAST_AS_BF16:
            with np.errstate(over="ignore"):
                body = bf16_bits(x.astype(np.float32))
            approx = (body.astype(np.uint32) << 16).view(np.float32).astype(x.dtype)
            bad = (np.isfinite(x) & ~np.isfinite(approx)) | ((x != 0) & (approx == 0))
        idx = np.flatnonzero(bad)
        if idx.size == 0:
            return CAST_HEADER.pack(kind, 0) + body.tobytes(), _stats(x, approx, fallback)
        values = x[idx]  # in the source's own width: exact
        approx[idx] = values
        out = b"".join(
            [
                CAST_HEADER.pack(kind | CAST_PATCHED, 0),
                body.tobytes(),
                idx.astype(np.uint32).tobytes(),
                values.tobytes(),
                CAST_PATCH_COUNT.pack(idx.size),
            ]
        )
        return out, _stats(x, approx, 1)

    def max_encoded_size(self, raw_size: int) -> int:
        width = _ITEMSIZE[self.source]
        n = raw_size // width  # header, 2 bytes each, at worst every element patched
        return CAST_HEADER.size + 2 * n + (4 + width) * n + CAST_PATCH_COUNT.size

    def decode(self, data: Buffer) -> Buffer:
        return self._decode(data, None)

    def decode_bounded(self, data: Buffer, max_size: int) -> Buffer:
        return self._decode(data, max_size)

    def _decode(self, data: Buffer, max_size: int | None) -> Buffer:
        view = byte_view(data)
        if len(view) < CAST_HEADER.size or (len(view) - CAST_HEADER.size) % 2:
            raise CodecError(f"cast payload of {len(view)} bytes is malformed")
        kind, _ = CAST_HEADER.unpack_from(view)
        if kind not in (
            CAST_AS_FP16,
            CAST_AS_BF16,
            CAST_AS_FP16 | CAST_PATCHED,
            CAST_AS_BF16 | CAST_PATCHED,
        ):
            raise CodecError(f"cast payload has unknown kind {kind}")
        body = view[CAST_HEADER.size :]
        wide_dtype = np.float64 if self.source == "float64" else np.float32
        patches = 0
        if kind & CAST_PATCHED:
            if len(body) < CAST_PATCH_COUNT.size:
                raise CodecError("cast payload lost its patch count")
            (patches,) = CAST_PATCH_COUNT.unpack_from(body, len(body) - CAST_PATCH_COUNT.size)
            width = np.dtype(wide_dtype).itemsize
            end = len(body) - CAST_PATCH_COUNT.size - (4 + width) * patches
            if end < 0 or end % 2:
                raise CodecError(f"cast payload with {patches} patches is malformed")
            idx = np.frombuffer(body, dtype=np.uint32, count=patches, offset=end)
            vals = np.frombuffer(body, dtype=wide_dtype, count=patches, offset=end + 4 * patches)
            body = body[:end]
        out_size = len(body) // 2 * _ITEMSIZE[self.source]
        if max_size is not None and out_size > max_size:
            raise CodecError(f"cast payload decodes to {out_size} bytes, over {max_size}")
        if kind & 1 == CAST_AS_FP16:
            wide = np.frombuffer(body, dtype=np.float16).astype(wide_dtype)
        else:
            bits = np.frombuffer(body, dtype=np.uint16).astype(np.uint32) << 16
            wide = bits.view(np.float32).astype(wide_dtype)
        if patches:
            if int(idx.max()) >= wide.size:
                raise CodecError("cast patch index beyond the data")
            wide[idx] = vals
        return from_float(wide, self.source)


INT8_HEADER = struct.Struct("<BxxxQ")
"""Header of an ``int8block`` payload: kind, 3 pad bytes, element count."""
INT8_FP16_SCALES, INT8_FP32_SCALES, INT8_RAW = 0, 1, 2
"""``int8block`` kinds: int8 values then fp16 scales, or then fp32 scales; or the source
bytes as they were (a chunk holding inf/NaN)."""


@register
class Int8Block(LossyCodec):
    """Symmetric absmax int8 per block of ``block`` elements, one scale per block.

    Layout: header (u8 kind, 3 pad, u64 n), then ceil(n/block)·block int8 values, then one
    fp16 (kind 0) or fp32 (kind 1) scale per block; kind 2 holds the source bytes as they
    were (a chunk with inf/NaN).
    """

    codec_id = "int8block"

    def __init__(self, source: str, block: int = 64) -> None:
        if not 8 <= block <= 65536:
            raise ValueError(f"int8 block size must be 8..65536, got {block}")
        self.source = _check_source(source)
        self.block = int(block)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "source": self.source, "block": self.block}

    def short(self) -> str:
        return f"int8/{self.block}"

    def quantize(self, data: Buffer) -> tuple[bytes, QuantStats]:
        x = to_float(data, self.source)
        n = x.size
        if not np.isfinite(x).all():
            return INT8_HEADER.pack(INT8_RAW, n) + bytes(byte_view(data)), QuantStats(
                fallback=1,
                chunks=1,
                sq_ref=float(np.square(x[np.isfinite(x)], dtype=np.float64).sum()),
            )
        xf = x.astype(np.float32)
        blocks = -(-n // self.block)
        padded = np.zeros(blocks * self.block, dtype=np.float32)
        padded[:n] = xf
        b = padded.reshape(blocks, self.block)
        scale = np.abs(b).max(axis=1) / 127.0
        with np.errstate(over="ignore"):  # too large for fp16: caught by ``fits`` below
            s16 = scale.astype(np.float16)
            low = s16.astype(np.float32) < scale  # rounded down: |x|/s could pass 127
            s16[low] = np.nextafter(s16[low], np.float16(np.inf))
        fits = np.isfinite(s16) & ((scale == 0) | (s16.astype(np.float32) >= FP16_MIN_NORMAL))
        if fits.all():
            kind, stored, s = INT8_FP16_SCALES, s16, s16.astype(np.float32)
        else:
            kind, stored, s = INT8_FP32_SCALES, scale.astype(np.float32), scale.astype(np.float32)
        safe = np.where(s == 0, 1.0, s)[:, None]
        q = np.clip(np.rint(b / safe), -127, 127).astype(np.int8)
        approx = (q.astype(np.float32) * s[:, None]).reshape(-1)[:n]
        out = INT8_HEADER.pack(kind, n) + q.tobytes() + stored.tobytes()
        return out, _stats(x, approx, 0)

    def max_encoded_size(self, raw_size: int) -> int:
        n = raw_size // _ITEMSIZE[self.source]
        blocks = -(-n // self.block)
        return INT8_HEADER.size + max(raw_size, blocks * (self.block + 4))

    def decode(self, data: Buffer) -> Buffer:
        return self._decode(data, None)

    def decode_bounded(self, data: Buffer, max_size: int) -> Buffer:
        return self._decode(data, max_size)

    def _decode(self, data: Buffer, max_size: int | None) -> Buffer:
        view = byte_view(data)
        try:
            kind, n = INT8_HEADER.unpack_from(view)
        except struct.error as exc:
            raise CodecError(f"int8 payload is truncated: {exc}") from exc
        body = view[INT8_HEADER.size :]
        out_size = len(body) if kind == INT8_RAW else n * _ITEMSIZE[self.source]
        if max_size is not None and out_size > max_size:
            raise CodecError(f"int8 payload decodes to {out_size} bytes, over {max_size}")
        if kind == INT8_RAW:
            return body
        blocks = -(-n // self.block)
        width = {INT8_FP16_SCALES: 2, INT8_FP32_SCALES: 4}.get(kind)
        if width is None or len(body) != blocks * self.block + blocks * width:
            raise CodecError(f"int8 payload (kind {kind}, n {n}) has {len(body)} bytes")
        q = np.frombuffer(body, dtype=np.int8, count=blocks * self.block)
        scales = np.frombuffer(
            body, dtype=np.float16 if width == 2 else np.float32, offset=blocks * self.block
        ).astype(np.float32)
        x = (q.reshape(blocks, self.block).astype(np.float32) * scales[:, None]).reshape(-1)
        return from_float(x[:n], self.source)
