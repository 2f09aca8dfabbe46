"""The checkpoint manifest: schema, msgpack encoding and validation (docs/format.md).

A manifest is plain msgpack maps, lists, ints, floats, strings and bytes — never pickle — in
a frame that carries a checksum, so a truncated or bit-flipped manifest is refused rather
than half-read.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

from ckptstore.codecs.pipeline import DTYPES
from ckptstore.codecs.quantize import QuantStats
from ckptstore.errors import FormatVersionError, ManifestError
from ckptstore.store.layout import FORMAT_VERSION

MANIFEST_MAGIC = b"CKM1"
_HEADER = struct.Struct("<4sQ")


@dataclass
class ChunkRef:
    """One chunk of a blob: rows [row_start, row_stop) of the shard (bytes, for objects)."""

    key: bytes
    row_start: int
    row_stop: int
    stored: int
    new: bool
    stats: QuantStats | None = field(default=None, compare=False)
    """Error of a lossy codec on this chunk, at save time only (not stored per chunk)."""

    def pack(self) -> list[Any]:
        return [self.key, self.row_start, self.row_stop, self.stored, self.new]

    @classmethod
    def unpack(cls, v: Any) -> ChunkRef:
        key, start, stop, stored, new = v
        if not isinstance(key, bytes) or len(key) != 16:
            raise ValueError(f"bad chunk key {key!r}")
        return cls(key, int(start), int(stop), int(stored), bool(new))


@dataclass
class Blob:
    """Encoded bytes of one tensor shard or one object: inline, or as a list of chunks.

    ``rows`` is the number of rows cut along dim 0 (bytes for objects); ``nbytes`` the raw
    size. Inline blobs hold the framed encoded payload (magic + checksum + payload).
    """

    codec: list[dict[str, Any]]
    nbytes: int
    rows: int
    inline: bytes | None = None
    chunks: list[ChunkRef] = field(default_factory=list)
    qstats: QuantStats | None = None
    """Error a lossy codec introduced in this blob (sums over its chunks)."""

    @property
    def stored_bytes(self) -> int:
        if self.inline is not None:
            return len(self.inline)
        return sum(c.stored for c in self.chunks)

    @property
    def new_bytes(self) -> int:
        if self.inline is not None:
            return len(self.inline)
        return sum(c.stored for c in self.chunks if c.new)

    def pack(self, codec_index: int) -> dict[str, Any]:
        out: dict[str, Any] = {"codec": codec_index, "nbytes": self.nbytes, "rows": self.rows}
        if self.inline is not None:
            out["inline"] = self.inline
        else:
            out["chunks"] = [c.pack() for c in self.chunks]
        if self.qstats is not None:
            out["qstats"] = self.qstats.pack()
        return out

    @classmethod
    def unpack(cls, v: dict[str, Any], codecs: list[list[dict[str, Any]]]) -> Blob:
        if not 0 <= v["codec"] < len(codecs):
            raise ValueError(f"codec index {v['codec']} outside the codec table")
        codec = codecs[v["codec"]]
        inline = v.get("inline")
        chunks = [] if inline is not None else [ChunkRef.unpack(c) for c in v["chunks"]]
        if inline is not None and not isinstance(inline, bytes):
            raise ValueError("inline payload is not bytes")
        qstats = QuantStats.unpack(v["qstats"]) if v.get("qstats") is not None else None
        return cls(codec, int(v["nbytes"]), int(v["rows"]), inline, chunks, qstats)


@dataclass
class Shard:
    """One saved piece of a tensor: its box in the global tensor and its blob."""

    offsets: list[int]
    sizes: list[int]
    blob: Blob


@dataclass
class TensorEntry:
    dtype: str
    shape: list[int]
    shards: list[Shard]
    requires_grad: bool = False

    @property
    def logical_bytes(self) -> int:
        return sum(s.blob.nbytes for s in self.shards)

    @property
    def error(self) -> QuantStats | None:
        """Quantization error over all shards, or None for a lossless tensor."""
        total: QuantStats | None = None
        for s in self.shards:
            if s.blob.qstats is not None:
                total = total or QuantStats()
                total.add(s.blob.qstats)
        return total


@dataclass
class Manifest:
    name: str
    step: int | None
    created: float
    tensors: dict[str, TensorEntry]
    objects: dict[str, Blob]
    planner_data: dict[str, list[Any]] | None = None
    dcp_version: str | None = None
    writer: str = ""
    seconds: float = 0.0
    user: dict[str, Any] = field(default_factory=dict)
    int_keys: list[list[Any]] = field(default_factory=list)
    """Paths (as in planner_data) whose last element was an int dict key before DCP's
    flattening turned it into a str — so load_full can give optimizer state its int keys."""
    manifest_bytes: int = 0
    """Size of the stored manifest object (set when read or committed; not serialized)."""

    # -- figures ------------------------------------------------------------------------
    def blobs(self) -> list[tuple[str, Blob]]:
        out = [(fqn, s.blob) for fqn, t in self.tensors.items() for s in t.shards]
        out += list(self.objects.items())
        return out

    @property
    def logical_bytes(self) -> int:
        return sum(t.logical_bytes for t in self.tensors.values())

    @property
    def chunk_bytes(self) -> int:
        """Stored bytes of the chunk objects this checkpoint names (each use counted).

        Inline data is not included: it lives in the manifest, whose size callers add.
        """
        return sum(c.stored for _, b in self.blobs() for c in b.chunks)

    @property
    def new_chunk_bytes(self) -> int:
        """Stored bytes of the chunk objects this checkpoint's save uploaded."""
        return sum(c.stored for _, b in self.blobs() for c in b.chunks if c.new)

    def chunk_keys(self) -> set[bytes]:
        return {c.key for _, b in self.blobs() for c in b.chunks}

    # -- encoding -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        codecs: list[list[dict[str, Any]]] = []
        index: dict[bytes, int] = {}

        def codec_index(cfg: list[dict[str, Any]]) -> int:
            k = msgpack.packb(cfg)
            if k not in index:
                index[k] = len(codecs)
                codecs.append(cfg)
            return index[k]

        tensors = {
            fqn: {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "requires_grad": t.requires_grad,
                "shards": [
                    {
                        "offsets": list(s.offsets),
                        "sizes": list(s.sizes),
                        **s.blob.pack(codec_index(s.blob.codec)),
                    }
                    for s in t.shards
                ],
            }
            for fqn, t in self.tensors.items()
        }
        objects = {fqn: b.pack(codec_index(b.codec)) for fqn, b in self.objects.items()}
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "step": self.step,
            "created": self.created,
            "writer": self.writer,
            "dcp_version": self.dcp_version,
            "seconds": self.seconds,
            "planner_data": self.planner_data,
            "user": self.user,
            "int_keys": self.int_keys,
            "codecs": codecs,
            "tensors": tensors,
            "objects": objects,
        }

    def encode(self) -> bytes:
        body = msgpack.packb(self.to_dict(), use_bin_type=True)
        return _HEADER.pack(MANIFEST_MAGIC, xxhash.xxh3_64_intdigest(body)) + body

    @classmethod
    def decode(cls, data: bytes, where: str) -> Manifest:
        if len(data) < _HEADER.size:
            raise ManifestError(f"manifest {where} is truncated ({len(data)} bytes)")
        magic, expect = _HEADER.unpack_from(data)
        if magic != MANIFEST_MAGIC:
            raise ManifestError(f"manifest {where} is not a ckptstore manifest (magic {magic!r})")
        body = memoryview(data)[_HEADER.size :]
        if xxhash.xxh3_64_intdigest(body) != expect:
            raise ManifestError(f"manifest {where} is truncated or corrupt (checksum mismatch)")
        try:
            d = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:
            raise ManifestError(f"manifest {where} cannot be parsed: {exc}") from exc
        if not isinstance(d, dict):
            raise ManifestError(f"manifest {where} is not a map")
        version = d.get("format")
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"manifest {where} has format version {version!r}; this ckptstore reads "
                f"version {FORMAT_VERSION} — upgrade ckptstore to read it"
            )
        try:
            manifest = cls._from_dict(d)
            manifest.validate()
            return manifest
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ManifestError(f"manifest {where} does not follow the v1 schema: {exc!r}") from exc

    def validate(self) -> None:
        """Structural checks a reader relies on; raises ValueError naming the problem."""
        for fqn, t in self.tensors.items():
            itemsize = DTYPES.get(t.dtype, (None, None))[0]
            if itemsize is None:
                raise ValueError(f"tensor {fqn!r} has unknown dtype {t.dtype!r}")
            for s in t.shards:
                if len(s.offsets) != len(t.shape) or len(s.sizes) != len(t.shape):
                    raise ValueError(f"shard of {fqn!r} has rank unlike shape {t.shape}")
                for off, size, dim in zip(s.offsets, s.sizes, t.shape, strict=True):
                    if off < 0 or size < 0 or off + size > dim:
                        raise ValueError(
                            f"shard {s.offsets}+{s.sizes} of {fqn!r} exceeds {t.shape}"
                        )
                numel = 1
                for size in s.sizes:
                    numel *= size
                if s.blob.nbytes != numel * itemsize:
                    raise ValueError(
                        f"shard of {fqn!r} holds {s.blob.nbytes} bytes, expected {numel * itemsize}"
                    )
                rows = s.sizes[0] if s.sizes else 1
                if s.blob.rows != rows and s.blob.nbytes:
                    raise ValueError(f"shard of {fqn!r} has {s.blob.rows} rows, expected {rows}")
        for fqn, blob in self.blobs():
            if blob.rows < 0 or blob.nbytes < 0 or (blob.rows and blob.nbytes % blob.rows):
                raise ValueError(f"{fqn!r}: {blob.nbytes} bytes do not split into {blob.rows} rows")
            if blob.inline is None:
                expect = 0
                for c in blob.chunks:  # chunks must tile [0, rows) in order
                    if c.row_start != expect or c.row_stop <= c.row_start:
                        raise ValueError(f"chunks of {fqn!r} do not tile its rows at {expect}")
                    expect = c.row_stop
                if expect != blob.rows:
                    raise ValueError(f"chunks of {fqn!r} cover {expect} of {blob.rows} rows")

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> Manifest:
        codecs = d["codecs"]
        tensors = {}
        for fqn, t in d["tensors"].items():
            shards = [
                Shard(
                    [int(x) for x in s["offsets"]],
                    [int(x) for x in s["sizes"]],
                    Blob.unpack(s, codecs),
                )
                for s in t["shards"]
            ]
            tensors[fqn] = TensorEntry(
                str(t["dtype"]), [int(x) for x in t["shape"]], shards, bool(t["requires_grad"])
            )
        objects = {fqn: Blob.unpack(b, codecs) for fqn, b in d["objects"].items()}
        step = d["step"]
        return cls(
            name=str(d["name"]),
            step=None if step is None else int(step),
            created=float(d["created"]),
            tensors=tensors,
            objects=objects,
            planner_data=d.get("planner_data"),
            dcp_version=d.get("dcp_version"),
            writer=str(d.get("writer", "")),
            seconds=float(d.get("seconds", 0.0)),
            user=dict(d.get("user") or {}),
            int_keys=[list(p) for p in d.get("int_keys") or []],
        )


def now() -> float:
    return time.time()
