"""A chain of codecs applied in order on encode and in reverse on decode, plus the choice of
the default lossless chain for each element type."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack
import numpy as np

from ckptstore.codecs.base import Buffer, Codec
from ckptstore.codecs.bytegroup import ByteGroup, group_into, scratch
from ckptstore.codecs.quantize import Cast, Int8Block, LossyCodec
from ckptstore.codecs.registry import get_codec
from ckptstore.codecs.zstd import Zstd
from ckptstore.errors import CodecError


class DType(NamedTuple):
    """What the store knows of an element type. ``DTYPES`` is the one dtype table: torch-free;
    the torch mapping (``ckptstore.dcp.bridge``) and export's safetensors codes derive from
    it."""

    itemsize: int
    """Bytes per element."""
    kind: str
    """"float", "complex", "int", "uint" or "bool"."""
    safetensors: str | None = None
    """The safetensors dtype code; None where safetensors has none."""

    @property
    def floating(self) -> bool:
        """Floating point, complex included."""
        return self.kind in ("float", "complex")


# element type name → its DType; names follow torch's dtypes (manifests store these names)
DTYPES: dict[str, DType] = {
    "float64": DType(8, "float", "F64"),
    "float32": DType(4, "float", "F32"),
    "float16": DType(2, "float", "F16"),
    "bfloat16": DType(2, "float", "BF16"),
    "complex128": DType(16, "complex"),
    "complex64": DType(8, "complex", "C64"),
    "complex32": DType(4, "complex"),
    "float8_e4m3fn": DType(1, "float", "F8_E4M3"),
    "float8_e5m2": DType(1, "float", "F8_E5M2"),
    "float8_e4m3fnuz": DType(1, "float"),
    "float8_e5m2fnuz": DType(1, "float"),
    "int64": DType(8, "int", "I64"),
    "int32": DType(4, "int", "I32"),
    "int16": DType(2, "int", "I16"),
    "int8": DType(1, "int", "I8"),
    "uint64": DType(8, "uint", "U64"),
    "uint32": DType(4, "uint", "U32"),
    "uint16": DType(2, "uint", "U16"),
    "uint8": DType(1, "uint", "U8"),
    "bool": DType(1, "bool", "BOOL"),
}


class Pipeline:
    """An ordered list of codecs; its spec is stored in the manifest and hashed into keys."""

    def __init__(self, codecs: Sequence[Codec]) -> None:
        self.codecs = list(codecs)
        if any(isinstance(c, LossyCodec) for c in self.codecs[1:]):
            raise ValueError("a lossy codec may only be the first of a pipeline")
        self.config: list[dict[str, Any]] = [c.get_config() for c in self.codecs]
        self.spec: bytes = msgpack.packb(self.config)  # canonical: configs are ordered dicts

    @classmethod
    def from_config(cls, config: Sequence[dict[str, Any]]) -> Pipeline:
        return cls([get_codec(c) for c in config])

    @property
    def lossless(self) -> bool:
        return all(c.lossless for c in self.codecs)

    def split(self) -> tuple[LossyCodec | None, Pipeline]:
        """The lossy first stage (or None) and the lossless rest of the chain."""
        if self.codecs and isinstance(self.codecs[0], LossyCodec):
            return self.codecs[0], Pipeline(self.codecs[1:])
        return None, self

    def encode(self, data: Buffer) -> Buffer:
        parts = self.encode_parts(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def encode_parts(self, data: Buffer) -> list[Buffer]:
        """:meth:`encode`'s output as pieces that, joined, make it — for a caller that adds
        a header (a chunk's frame) with one copy instead of two. Pieces may be views of
        this thread's scratch memory: join them before this thread encodes again."""
        codecs = self.codecs
        if len(codecs) == 2 and type(codecs[0]) is ByteGroup and type(codecs[1]) is Zstd:
            # the default chains: the planes go to this thread's scratch buffer (no fresh
            # chunk-sized allocation), which zstd compresses or hands back as raw views
            group, zstd = codecs
            arr = np.frombuffer(data, dtype=np.uint8)
            if group.width > 1 and arr.size and arr.size % group.width == 0:
                planes = scratch(arr.size, "planes")
                group_into(arr, group.width, group.rotate, planes)
                return zstd.encode_parts(planes)
        if len(codecs) == 1 and type(codecs[0]) is Zstd:
            return codecs[0].encode_parts(data)
        for codec in codecs:
            data = codec.encode(data)
        return [data]

    def decode(self, data: Buffer, expected_size: int | None = None) -> Buffer:
        """Invert :meth:`encode`.

        With ``expected_size`` (the raw size the caller's manifest declares) decoding never
        allocates more than that bound at any stage — a zstd frame declaring more is refused
        before it is inflated — and an output of any other size is refused: every failure is
        a ``CodecError``. Without it, each codec decodes unbounded and raises its own
        ``ValueError`` (``CodecError`` included) on malformed input.
        """
        return self.decode_parts(data, expected_size)[1]

    def decode_parts(self, data: Buffer, expected_size: int | None = None) -> tuple[Buffer, Buffer]:
        """Like :meth:`decode`, returning ``(keyed, raw)``: the bytes a chunk key hashes
        (the lossy first stage's output, or the raw bytes of a lossless chain) and the raw
        bytes."""
        if expected_size is None:
            keyed = data
            for i in range(len(self.codecs) - 1, -1, -1):
                data = self.codecs[i].decode(data)
                if i > 0 or self.codecs[i].lossless:
                    keyed = data
            return keyed, data
        if isinstance(expected_size, bool) or not isinstance(expected_size, int):
            raise TypeError(f"expected_size must be an int, not {type(expected_size).__name__}")
        if expected_size < 0:
            raise ValueError(f"expected_size must be >= 0, got {expected_size}")
        # limits[i]: the most bytes codec i's decode may output
        limits: list[int | None] = [expected_size]
        for codec in self.codecs[:-1]:
            prev = limits[-1]
            limits.append(None if prev is None else codec.max_encoded_size(prev))
        keyed = data
        try:
            for i in range(len(self.codecs) - 1, -1, -1):
                codec, limit = self.codecs[i], limits[i]
                data = codec.decode(data) if limit is None else codec.decode_bounded(data, limit)
                if i > 0 or codec.lossless:
                    keyed = data
        except CodecError:
            raise
        except (ValueError, TypeError) as exc:
            raise CodecError(f"cannot be decoded with {self.short()}: {exc}") from exc
        size = memoryview(data).nbytes
        if size != expected_size:
            raise CodecError(f"decoded to {size} bytes, expected {expected_size}")
        return keyed, data

    def decode_into(self, data: Buffer, out: np.ndarray) -> Buffer:
        """Decode ``data`` into ``out`` — a writable C-contiguous uint8 array of exactly the
        raw size, e.g. the destination tensor's own memory — bounded as :meth:`decode` with
        ``expected_size=out.size`` (every failure a ``CodecError``; ``out`` may then hold
        anything). Returns the bytes the chunk key hashes: ``out`` itself when lossless.

        The default chains decode with no intermediate raw-sized copy: zstd's segments (the
        byte planes) are scattered straight into ``out``. Other chains decode as
        :meth:`decode_parts` does and copy the result in."""
        expected = out.size
        codecs = self.codecs
        try:
            if len(codecs) == 2 and type(codecs[0]) is ByteGroup and type(codecs[1]) is Zstd:
                group, zstd = codecs
                planes = scratch(expected, "dplanes")  # frames decode here, not fresh bytes
                parts = zstd.decode_segments(
                    data, group.max_encoded_size(expected), memoryview(planes)
                )
                group.decode_into(parts, out)
                return out
            if len(codecs) == 1 and type(codecs[0]) is Zstd:
                parts = codecs[0].decode_segments(data, expected)
                got = sum(memoryview(p).nbytes for p in parts)
                if got != expected:
                    raise CodecError(f"decoded to {got} bytes, expected {expected}")
                pos = 0
                for part in parts:
                    piece = np.frombuffer(part, dtype=np.uint8)
                    out[pos : pos + piece.size] = piece
                    pos += piece.size
                return out
        except CodecError:
            raise
        except (ValueError, TypeError) as exc:
            raise CodecError(f"cannot be decoded with {self.short()}: {exc}") from exc
        keyed, raw = self.decode_parts(data, expected)
        if memoryview(raw).nbytes:
            out[:] = np.frombuffer(raw, dtype=np.uint8)
        return keyed

    def short(self) -> str:
        """Compact label, e.g. ``group4+rot>zstd-entropy``."""
        return ">".join(c.short() for c in self.codecs) or "raw"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return " → ".join(repr(c) for c in self.codecs) or "identity"


def default_pipeline(dtype: str, *, zstd_level: int = 1) -> Pipeline:
    """The lossless chain for elements of ``dtype`` ("bytes" for serialized objects).

    Floats: sign rotation + byte grouping + zstd as entropy coder, one frame per plane.
    Wider integers: byte grouping + zstd level 1 (the matcher finds runs in counters/ids).
    One-byte types and object bytes: zstd level 1. ``zstd_level`` (part of the chunk key)
    applies to the integer and byte chains.
    """
    level = zstd_level
    if dtype not in DTYPES:
        return Pipeline([Zstd(level=level)])
    itemsize, kind, _ = DTYPES[dtype]
    if itemsize == 1:
        return Pipeline([Zstd(level=level)])
    if kind in ("float", "complex"):
        width = itemsize // 2 if kind == "complex" else itemsize
        return Pipeline(
            [ByteGroup(width, rotate=width in (2, 4, 8)), Zstd(segments=width, entropy=True)]
        )
    return Pipeline([ByteGroup(itemsize), Zstd(level=level, segments=1)])


QUANTIZERS = ("fp16", "bf16", "int8")


def quantized_pipeline(name: str, dtype: str, *, zstd_level: int = 1) -> Pipeline:
    """The chain for quantizer ``name`` ("fp16", "bf16", "int8" or "int8:<block>") applied
    to elements of ``dtype``; raises ValueError for names or dtypes it cannot apply to."""
    kind, _, arg = name.partition(":")
    if kind in ("fp16", "bf16"):
        if arg:
            raise ValueError(f"quantizer {name!r} takes no parameter")
        target = "float16" if kind == "fp16" else "bfloat16"
        return Pipeline(
            [Cast(dtype, target), ByteGroup(2, rotate=True), Zstd(segments=2, entropy=True)]
        )
    if kind == "int8":
        block = int(arg) if arg else 64
        return Pipeline([Int8Block(dtype, block), Zstd(level=zstd_level)])
    raise ValueError(
        f"unknown quantizer {name!r}: use one of {', '.join(QUANTIZERS)} or int8:<block>"
    )
