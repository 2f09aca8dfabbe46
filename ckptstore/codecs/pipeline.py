"""A chain of codecs applied in order on encode and in reverse on decode, plus the choice of
the default lossless chain for each element type."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from ckptstore import knobs
from ckptstore.codecs.base import Buffer, Codec
from ckptstore.codecs.bytegroup import ByteGroup
from ckptstore.codecs.registry import get_codec
from ckptstore.codecs.zstd import Zstd

# element type name → (bytes per element, is floating point); names follow torch's dtypes
DTYPES: dict[str, tuple[int, bool]] = {
    "float64": (8, True),
    "float32": (4, True),
    "float16": (2, True),
    "bfloat16": (2, True),
    "complex128": (16, True),
    "complex64": (8, True),
    "complex32": (4, True),
    "float8_e4m3fn": (1, True),
    "float8_e5m2": (1, True),
    "float8_e4m3fnuz": (1, True),
    "float8_e5m2fnuz": (1, True),
    "int64": (8, False),
    "int32": (4, False),
    "int16": (2, False),
    "int8": (1, False),
    "uint64": (8, False),
    "uint32": (4, False),
    "uint16": (2, False),
    "uint8": (1, False),
    "bool": (1, False),
}


class Pipeline:
    """An ordered list of codecs; its spec is stored in the manifest and hashed into keys."""

    def __init__(self, codecs: Sequence[Codec]) -> None:
        self.codecs = list(codecs)
        self.config: list[dict[str, Any]] = [c.get_config() for c in self.codecs]
        self.spec: bytes = msgpack.packb(self.config)  # canonical: configs are ordered dicts

    @classmethod
    def from_config(cls, config: Sequence[dict[str, Any]]) -> Pipeline:
        return cls([get_codec(c) for c in config])

    @property
    def lossless(self) -> bool:
        return all(c.lossless for c in self.codecs)

    def encode(self, data: Buffer) -> Buffer:
        for codec in self.codecs:
            data = codec.encode(data)
        return data

    def decode(self, data: Buffer) -> Buffer:
        for codec in reversed(self.codecs):
            data = codec.decode(data)
        return data

    def short(self) -> str:
        """Compact label, e.g. ``group4+rot>zstd-entropy``."""
        return ">".join(c.short() for c in self.codecs) or "raw"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return " → ".join(repr(c) for c in self.codecs) or "identity"


def default_pipeline(dtype: str) -> Pipeline:
    """The lossless chain for elements of ``dtype`` ("bytes" for serialized objects).

    Floats: sign rotation + byte grouping + zstd as entropy coder, one frame per plane.
    Wider integers: byte grouping + zstd level 1 (the matcher finds runs in counters/ids).
    One-byte types and object bytes: zstd level 1.
    """
    level = knobs.get("ZSTD_LEVEL")
    if dtype not in DTYPES:
        return Pipeline([Zstd(level=level)])
    itemsize, floating = DTYPES[dtype]
    if itemsize == 1:
        return Pipeline([Zstd(level=level)])
    if floating:
        width = itemsize // 2 if dtype.startswith("complex") else itemsize
        return Pipeline(
            [ByteGroup(width, rotate=width in (2, 4, 8)), Zstd(segments=width, entropy=True)]
        )
    return Pipeline([ByteGroup(itemsize), Zstd(level=level, segments=1)])
