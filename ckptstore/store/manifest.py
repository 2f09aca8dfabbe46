"""The checkpoint manifest: schema, msgpack encoding and validation (docs/format.md).

A manifest is plain msgpack maps, lists, ints, floats, strings and bytes — never pickle — in
a frame that carries a checksum, so a truncated or bit-flipped manifest is refused rather
than half-read.
"""

from __future__ import annotations

import bisect
import heapq
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import xxhash

from ckptstore.codecs.bytegroup import ByteGroup
from ckptstore.codecs.pipeline import DTYPES, Pipeline
from ckptstore.codecs.quantize import Cast, QuantStats
from ckptstore.errors import (
    FormatVersionError,
    ManifestCodecError,
    ManifestError,
    UnknownCodecError,
)
from ckptstore.store.layout import check_name
from ckptstore.store.shard_table import ShardTable, TableError

MANIFEST_MAGIC = b"CKM1"
MANIFEST_FORMAT = 2
"""The manifest format this ckptstore writes: per-tensor shard tables (docs/format.md)."""
READ_FORMATS = (1, 2)
"""Manifest formats this ckptstore reads: 1 (one map per shard, ckptstore ≤ 0.2) and 2."""
_HEADER = struct.Struct("<4sQ")


class SchemaError(ValueError):
    """A manifest field has the wrong type or an inconsistent value. The message starts
    with the field's path, e.g. ``tensors['w'].shards[1].codec: …``; ``Manifest.decode``
    turns it into a ``ManifestError`` that also names the manifest."""


_MAX_INT = 2**63 - 1  # sizes, rows and offsets: what an int64 (and torch) can hold
MAX_EXPANSION = 1 << 20
"""No chunk (or inline blob) may declare more raw bytes than this many times its stored
size. zstd cannot exceed ~32768:1 (an RLE block per 128 KiB), int8 of float64 adds 8×: the
most any v1 chain can reach is ~2^18, so a larger claim is refused before anything is read."""


def _type_name(v: Any) -> str:
    return "nil" if v is None else type(v).__name__


def _req(m: dict[Any, Any], key: str, where: str) -> Any:
    if key not in m:
        raise SchemaError(f"{where}: missing required field {key!r}")
    return m[key]


def _int(v: Any, where: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    if type(v) is not int:  # not bool, not float
        raise SchemaError(f"{where}: expected an int, got {_type_name(v)} {v!r:.60}")
    if not lo <= v <= hi:
        raise SchemaError(f"{where}: {v} is outside [{lo}, {hi}]")
    return v


def _float(v: Any, where: str) -> float:
    if type(v) not in (int, float):
        raise SchemaError(f"{where}: expected a number, got {_type_name(v)} {v!r:.60}")
    if not math.isfinite(v):
        raise SchemaError(f"{where}: {v} is not finite")
    return float(v)


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise SchemaError(f"{where}: expected a str, got {_type_name(v)} {v!r:.60}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise SchemaError(f"{where}: expected a bool, got {_type_name(v)} {v!r:.60}")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise SchemaError(f"{where}: expected an array, got {_type_name(v)} {v!r:.60}")
    return v


def _map(v: Any, where: str, str_keys: bool = True) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise SchemaError(f"{where}: expected a map, got {_type_name(v)} {v!r:.60}")
    if str_keys:
        for k in v:
            if not isinstance(k, str):
                raise SchemaError(f"{where}: key {k!r:.60} is not a str")
    return v


def _ints(v: Any, where: str) -> list[int]:
    return [_int(x, f"{where}[{i}]") for i, x in enumerate(_list(v, where))]


def _path(v: Any, where: str) -> list[str | int]:
    """A planner_data / int_keys path: a non-empty array of str dict keys and int indices."""
    out = _list(v, where)
    if not out:
        raise SchemaError(f"{where}: empty path")
    for i, x in enumerate(out):
        if type(x) is not int and not isinstance(x, str):
            raise SchemaError(f"{where}[{i}]: expected a str or int, got {_type_name(x)}")
    return out


MAX_CHAIN = 64
"""Longest delta chain (bases of one chunk) a reader accepts; writers use Settings.delta_chain."""


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
    base: tuple[bytes, ...] = ()
    """Delta chunk: its base chain [direct base, its base, …, root]; the root is a standalone
    chunk. Empty for a standalone chunk (the 5-element entry of ckptstore 0.1)."""

    def pack(self) -> list[Any]:
        out: list[Any] = [self.key, self.row_start, self.row_stop, self.stored, self.new]
        if self.base:
            out.append(list(self.base))
        return out

    @classmethod
    def unpack(cls, v: Any, where: str = "chunk") -> ChunkRef:
        v = _list(v, where)
        if len(v) not in (5, 6):
            raise SchemaError(f"{where}: expected 5 or 6 elements, got {len(v)}")
        key, start, stop, stored, new = v[:5]
        if not isinstance(key, bytes) or len(key) != 16:
            raise SchemaError(f"{where}[0]: bad chunk key {key!r:.60}")
        base: tuple[bytes, ...] = ()
        if len(v) == 6:
            chain = _list(v[5], f"{where}[5]")
            if not 1 <= len(chain) <= MAX_CHAIN:
                raise SchemaError(
                    f"{where}[5]: a delta chain of {len(chain)} bases (1 to {MAX_CHAIN})"
                )
            for i, b in enumerate(chain):
                if not isinstance(b, bytes) or len(b) != 16:
                    raise SchemaError(f"{where}[5][{i}]: bad base key {b!r:.60}")
            if key in chain or len(set(chain)) != len(chain):
                raise SchemaError(f"{where}[5]: the delta chain repeats a key")
            base = tuple(chain)
        return cls(
            key,
            _int(start, f"{where}[1]"),
            _int(stop, f"{where}[2]"),
            _int(stored, f"{where}[3]"),
            _bool(new, f"{where}[4]"),
            base=base,
        )

    @property
    def depth(self) -> int:
        """Delta links to the standalone root (0 for a standalone chunk)."""
        return len(self.base)


def _qstats(v: Any, where: str) -> QuantStats:
    v = _list(v, where)
    if len(v) != 5:
        raise SchemaError(f"{where}: expected 5 elements, got {len(v)}")
    sq_err, sq_ref, max_abs, fallback, chunks = v
    for i, x in enumerate((sq_err, sq_ref, max_abs)):  # sums may overflow to inf, or be NaN
        if type(x) not in (int, float):
            raise SchemaError(f"{where}[{i}]: expected a number, got {_type_name(x)}")
    return QuantStats(
        float(sq_err),
        float(sq_ref),
        float(max_abs),
        _int(fallback, f"{where}[3]"),
        _int(chunks, f"{where}[4]"),
    )


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
    def unpack(cls, v: Any, codecs: list[list[dict[str, Any]]], where: str = "blob") -> Blob:
        v = _map(v, where, str_keys=False)
        index = _int(_req(v, "codec", where), f"{where}.codec")
        if index >= len(codecs):
            raise SchemaError(
                f"{where}.codec: index {index} is outside the codec table ({len(codecs)} entries)"
            )
        nbytes = _int(_req(v, "nbytes", where), f"{where}.nbytes")
        rows = _int(_req(v, "rows", where), f"{where}.rows")
        inline = v.get("inline")
        chunks: list[ChunkRef] = []
        if inline is not None:
            if not isinstance(inline, bytes):
                raise SchemaError(f"{where}.inline: expected bin, got {_type_name(inline)}")
        else:
            raw = _list(_req(v, "chunks", where), f"{where}.chunks")
            chunks = [ChunkRef.unpack(c, f"{where}.chunks[{i}]") for i, c in enumerate(raw)]
        qs = v.get("qstats")
        qstats = None if qs is None else _qstats(qs, f"{where}.qstats")
        return cls(codecs[index], nbytes, rows, inline, chunks, qstats)


@dataclass
class Shard:
    """One saved piece of a tensor: its box in the global tensor and its blob."""

    offsets: list[int]
    sizes: list[int]
    blob: Blob


class TensorEntry:
    """One tensor: dtype, global shape and its shards — held as a packed
    :class:`~ckptstore.store.shard_table.ShardTable` (decoded format 2, or packed for a
    commit) or as ``Shard`` objects (built by a writer, or asked for by a caller). Either
    form is made from the other on first use; once a caller has the objects (which it may
    change) they are the truth until the table is asked for again."""

    def __init__(
        self,
        dtype: str,
        shape: list[int],
        shards: list[Shard] | None = None,
        requires_grad: bool = False,
        *,
        table: ShardTable | None = None,
    ) -> None:
        self.dtype = dtype
        self.shape = shape
        self.requires_grad = requires_grad
        self._shards = shards if shards is not None or table is not None else []
        self._table = table

    @property
    def shards(self) -> list[Shard]:
        if self._shards is None:
            assert self._table is not None
            self._shards = self._table.to_shards()
        self._table = None  # the caller may change the objects
        return self._shards

    @shards.setter
    def shards(self, value: list[Shard]) -> None:
        self._shards, self._table = value, None

    @property
    def table(self) -> ShardTable:
        """The shards as columns (raises ``TableError`` for shards the format cannot
        hold: a caller validates first)."""
        if self._table is None:
            assert self._shards is not None
            self._table = ShardTable.from_shards(self._shards, len(self.shape))
            self._shards = None
        return self._table

    @property
    def packed(self) -> ShardTable | None:
        """The table when that is the form held (no objects handed out), else None."""
        return self._table if self._shards is None else None

    @property
    def shard_count(self) -> int:
        return len(self._shards) if self._shards is not None else len(self._table)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorEntry):
            return NotImplemented
        return (self.dtype, self.shape, self.requires_grad, self.shards) == (
            other.dtype,
            other.shape,
            other.requires_grad,
            other.shards,
        )

    def __repr__(self) -> str:
        return (
            f"TensorEntry({self.dtype!r}, {self.shape!r}, <{self.shard_count} shards>, "
            f"requires_grad={self.requires_grad})"
        )

    @property
    def logical_bytes(self) -> int:
        if (t := self.packed) is not None:
            return t.logical_bytes()
        return sum(s.blob.nbytes for s in self.shards)

    @property
    def error(self) -> QuantStats | None:
        """Quantization error over all shards, or None for a lossless tensor."""
        if (t := self.packed) is not None:
            return t.error()
        total: QuantStats | None = None
        for s in self.shards:
            if s.blob.qstats is not None:
                total = total or QuantStats()
                total.add(s.blob.qstats)
        return total


class _CodecTable:
    """The codec chains a manifest names, each once, in first-use order: calling it with a
    chain gives the chain's index in ``chains``."""

    def __init__(self) -> None:
        self.chains: list[list[dict[str, Any]]] = []
        self._index: dict[bytes, int] = {}

    def __call__(self, cfg: list[dict[str, Any]]) -> int:
        k = msgpack.packb(cfg)
        if k not in self._index:
            self._index[k] = len(self.chains)
            self.chains.append(cfg)
        return self._index[k]


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

    def _tables(self) -> tuple[list[ShardTable], list[Blob]]:
        """The packed tables, and the blobs of everything held as objects."""
        tables, blobs = [], []
        for t in self.tensors.values():
            if (tab := t.packed) is not None:
                tables.append(tab)
            else:
                blobs += [s.blob for s in t.shards]
        return tables, blobs + list(self.objects.values())

    @property
    def chunk_bytes(self) -> int:
        """Stored bytes of the chunk objects this checkpoint names (each use counted).

        Inline data is not included: it lives in the manifest, whose size callers add.
        """
        tables, blobs = self._tables()
        return sum(t.chunk_bytes() for t in tables) + sum(c.stored for b in blobs for c in b.chunks)

    @property
    def new_chunk_bytes(self) -> int:
        """Stored bytes of the chunk objects this checkpoint's save uploaded."""
        tables, blobs = self._tables()
        return sum(t.new_chunk_bytes() for t in tables) + sum(
            c.stored for b in blobs for c in b.chunks if c.new
        )

    @property
    def stored_bytes(self) -> int:
        """What the checkpoint occupies: the chunks it names (each use counted) plus its
        manifest, which holds the inline data. ``manifest_bytes`` must be known."""
        return self.chunk_bytes + self.manifest_bytes

    @property
    def new_bytes(self) -> int:
        """What its save wrote: the chunks it uploaded plus its manifest."""
        return self.new_chunk_bytes + self.manifest_bytes

    @property
    def chunk_count(self) -> int:
        """Chunk references (each use counted)."""
        tables, blobs = self._tables()
        return sum(t.chunk_count for t in tables) + sum(len(b.chunks) for b in blobs)

    @property
    def new_chunk_count(self) -> int:
        """Chunk objects its save uploaded."""
        tables, blobs = self._tables()
        return sum(t.new_chunk_count() for t in tables) + sum(
            1 for b in blobs for c in b.chunks if c.new
        )

    def chunk_sizes(self) -> dict[bytes, int]:
        """Stored size of each distinct chunk it names."""
        tables, blobs = self._tables()
        out: dict[bytes, int] = {}
        for t in tables:
            out.update(zip(t.key_list(), t.stored.tolist(), strict=True))
        out.update((c.key, c.stored) for b in blobs for c in b.chunks)
        return out

    def chunk_keys(self) -> set[bytes]:
        """Every chunk object a load of this checkpoint reads: the chunks it names and the
        bases of their delta chains — what gc keeps, trash protects and a commit checks."""
        tables, blobs = self._tables()
        out: set[bytes] = set()
        for t in tables:
            out.update(t.key_list())
            out.update(t.base_list())
        for b in blobs:
            for c in b.chunks:
                out.add(c.key)
                if c.base:
                    out.update(c.base)
        return out

    @property
    def delta_chunk_bytes(self) -> int:
        """Stored bytes of the delta chunks it names (each use counted)."""
        tables, blobs = self._tables()
        return sum(t.delta_chunk_bytes() for t in tables) + sum(
            c.stored for b in blobs for c in b.chunks if c.base
        )

    @property
    def max_chain(self) -> int:
        """Longest delta chain of its chunks (0: none is a delta)."""
        tables, blobs = self._tables()
        return max(
            [t.max_chain() for t in tables] + [len(c.base) for b in blobs for c in b.chunks],
            default=0,
        )

    # -- encoding -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The manifest as format-1 maps (one map per shard): what ckptstore 0.2 wrote,
        and what tests edit to build manifests a reader must refuse."""
        codec_index = _CodecTable()
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
        return self._maps(1, codec_index, tensors)

    def to_dict_packed(self) -> dict[str, Any]:
        """The manifest as format-2 maps: each tensor's shards as one shard table of
        packed columns (docs/format.md, "Shard tables")."""
        codec_index = _CodecTable()
        tensors = {}
        for fqn, t in self.tensors.items():
            table = t.table
            remap = np.array([codec_index(c) for c in table.chains] or [0], np.int64)
            tensors[fqn] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "requires_grad": t.requires_grad,
                "shards": table.pack(remap),
            }
        return self._maps(MANIFEST_FORMAT, codec_index, tensors)

    def _maps(self, format: int, codecs: _CodecTable, tensors: dict[str, Any]) -> dict[str, Any]:
        """The top-level map of either format around its ``tensors`` (objects are packed
        here, after the tensors, so codec indexes come in the same order)."""
        objects = {fqn: b.pack(codecs(b.codec)) for fqn, b in self.objects.items()}
        return {
            "format": format,
            "name": self.name,
            "step": self.step,
            "created": self.created,
            "writer": self.writer,
            "dcp_version": self.dcp_version,
            "seconds": self.seconds,
            "planner_data": self.planner_data,
            "user": self.user,
            "int_keys": self.int_keys,
            "codecs": codecs.chains,
            "tensors": tensors,
            "objects": objects,
        }

    def encode(self, format: int = 2) -> bytes:
        """The manifest object: frame and msgpack body, in format 2 (or 1, for tests and
        tools that write for older readers). The body is packed tensor by tensor (the same
        bytes as one ``packb`` of the whole map), so encoding holds about the manifest's
        size twice — its parts, then the frame — not a growing buffer's copies."""
        d = self.to_dict_packed() if format == 2 else self.to_dict()
        packer = msgpack.Packer(use_bin_type=True)
        parts = [packer.pack_map_header(len(d))]
        for k, v in d.items():
            parts.append(packer.pack(k))
            if k == "tensors":
                parts.append(packer.pack_map_header(len(v)))
                for fqn, entry in v.items():
                    parts.append(packer.pack(fqn))
                    parts.append(packer.pack(entry))
            else:
                parts.append(packer.pack(v))
        del d
        check = xxhash.xxh3_64()
        for part in parts:
            check.update(part)
        return b"".join([_HEADER.pack(MANIFEST_MAGIC, check.intdigest()), *parts])

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
        if type(version) is not int:
            raise ManifestError(
                f"manifest {where} does not follow the v1 schema: format: expected an int, "
                f"got {_type_name(version)}"
            )
        if version not in READ_FORMATS:
            raise FormatVersionError(
                f"manifest {where} has format version {version!r}; this ckptstore reads "
                f"versions {', '.join(map(str, READ_FORMATS))} — upgrade ckptstore to read it"
            )
        try:
            manifest = cls._from_dict(d, version)
            manifest.validate()
            return manifest
        except UnknownCodecError as exc:
            raise ManifestCodecError(f"manifest {where}: {exc}") from exc
        except SchemaError as exc:
            raise ManifestError(
                f"manifest {where} does not follow the v{version} schema: {exc}"
            ) from exc
        except (
            KeyError,
            TypeError,
            ValueError,
            IndexError,
            AttributeError,
            OverflowError,
            RecursionError,
        ) as exc:  # a safety net: the checks above are meant to leave nothing for it
            raise ManifestError(
                f"manifest {where} does not follow the v{version} schema: {exc!r}"
            ) from exc

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Everything a reader relies on (docs/format.md, "Validation"): dtypes, shard boxes
        inside the shape and exactly tiling it, sizes and rows, chunk rows tiling each blob,
        codec chains this reader can build and that fit the dtype, and planner_data/int_keys
        paths that rebuild a state dict. Raises ``SchemaError`` (a ValueError) naming the
        field, or ``UnknownCodecError`` for a chain this reader cannot build."""
        pipelines: dict[bytes, Pipeline] = {}
        for fqn, t in self.tensors.items():
            where = f"tensors[{_q(fqn)}]"
            info = DTYPES.get(t.dtype) if isinstance(t.dtype, str) else None
            if info is None:
                raise SchemaError(f"{where}.dtype: unknown dtype {t.dtype!r:.60}")
            itemsize = info[0]
            _list(t.shape, f"{where}.shape")
            for d, dim in enumerate(t.shape):
                _int(dim, f"{where}.shape[{d}]")
            numel = math.prod(t.shape)
            if numel * itemsize > _MAX_INT:
                raise SchemaError(
                    f"{where}.shape: {t.shape} of {t.dtype} is {numel * itemsize} bytes, more "
                    "than any tensor can hold"
                )
            self._check_tensor(where, t, itemsize, numel, pipelines)
        for fqn, blob in self.objects.items():
            where = f"objects[{_q(fqn)}]"
            if blob.nbytes and blob.rows != blob.nbytes:
                raise SchemaError(
                    f"{where}.rows: {blob.rows} rows, expected {blob.nbytes} (one per byte)"
                )
            self._check_blob(where, blob, None, pipelines)
        self._check_paths()

    def _check_tensor(
        self,
        where: str,
        t: TensorEntry,
        itemsize: int,
        numel: int,
        pipelines: dict[bytes, Pipeline],
    ) -> None:
        """The tensor's shards: vectorized over its table; where a rule is broken (or the
        boxes form a grid), the per-shard checks name the shard and field."""
        try:
            table = t.table
        except TableError:
            self._check_shards(where, t, itemsize, numel, pipelines)
            raise SchemaError(f"{where}.shards: cannot be packed") from None
        broken = table.check(where, t.shape, itemsize, numel)
        if broken is None:
            broken = self._check_table_chains(where, t, table, pipelines)
        if broken is None:
            return
        table_only = (
            "nchunks add up",
            "inline lengths",
            "both inline",
            "delta chain lengths",
            "a negative count",
            "codec: ",
        )
        if broken.startswith(table_only):  # counts that per-shard objects cannot express
            raise SchemaError(
                f"{where}.shards{'.' if broken.startswith('codec') else ': '}{broken}"
            )
        self._check_shards(where, t, itemsize, numel, pipelines)
        if broken != "grid":
            raise SchemaError(f"{where}.shards: {broken}")

    @staticmethod
    def _check_table_chains(
        where: str, t: TensorEntry, table: ShardTable, pipelines: dict[bytes, Pipeline]
    ) -> str | None:
        """Each codec chain the table uses fits the dtype; delta chunks sit under lossless
        chains with sound base chains (None when all hold)."""
        used = np.unique(table.codec).tolist() if len(table) else []
        lossless = {}
        for i in used:
            chain = table.chains[i]
            try:
                _check_chain(f"{where}.shards", chain, t.dtype, pipelines)
            except (SchemaError, UnknownCodecError):
                return "a codec chain that does not build or fit"
            lossless[i] = pipelines[msgpack.packb(chain)].lossless
        if table.nbases is None or not table.nbases.any():
            return None
        shard_of = np.repeat(np.arange(len(table)), table.nchunks)
        at = table.base_at()
        for c in np.flatnonzero(table.nbases).tolist():
            if not lossless[int(table.codec[shard_of[c]])]:
                return "a delta chunk under a lossy codec"
            key = table.keys[c * 16 : (c + 1) * 16]
            chain = [table.bases[x * 16 : (x + 1) * 16] for x in range(at[c], at[c + 1])]
            if key in chain or len(set(chain)) != len(chain):
                return "bad delta chain"
        return None

    def _check_shards(
        self,
        where: str,
        t: TensorEntry,
        itemsize: int,
        numel: int,
        pipelines: dict[bytes, Pipeline],
    ) -> None:
        """The per-shard checks of format 1, naming the first shard and field that break
        a rule."""
        for k, s in enumerate(t.shards):
            sw = f"{where}.shards[{k}]"
            _list(s.offsets, f"{sw}.offsets")
            _list(s.sizes, f"{sw}.sizes")
            if len(s.offsets) != len(t.shape) or len(s.sizes) != len(t.shape):
                raise SchemaError(
                    f"{sw}: box {s.offsets}+{s.sizes} has a rank unlike shape {t.shape}"
                )
            for d, (off, size, dim) in enumerate(zip(s.offsets, s.sizes, t.shape, strict=True)):
                _int(off, f"{sw}.offsets[{d}]")
                _int(size, f"{sw}.sizes[{d}]")
                if off + size > dim:
                    raise SchemaError(f"{sw}: box {s.offsets}+{s.sizes} exceeds {t.shape}")
            expect = math.prod(s.sizes) * itemsize
            if s.blob.nbytes != expect:
                raise SchemaError(
                    f"{sw}.nbytes: holds {s.blob.nbytes} bytes, expected {expect} "
                    f"({s.sizes} of {t.dtype})"
                )
            rows = s.sizes[0] if s.sizes else 1
            if s.blob.rows != rows and s.blob.nbytes:
                raise SchemaError(f"{sw}.rows: {s.blob.rows} rows, expected {rows}")
            self._check_blob(sw, s.blob, t.dtype, pipelines)
            if s.blob.inline is None:
                for i, c in enumerate(s.blob.chunks):
                    _check_ref(f"{sw}.chunks[{i}]", c)
            elif not isinstance(s.blob.inline, bytes):
                raise SchemaError(f"{sw}.inline: expected bin")
        _check_tiling(where, t.shape, t.shards, numel)

    @staticmethod
    def _check_blob(
        where: str, blob: Blob, dtype: str | None, pipelines: dict[bytes, Pipeline]
    ) -> None:
        _int(blob.nbytes, f"{where}.nbytes")
        _int(blob.rows, f"{where}.rows")
        if blob.rows == 0 and blob.nbytes or blob.rows and blob.nbytes % blob.rows:
            raise SchemaError(f"{where}: {blob.nbytes} bytes do not split into {blob.rows} rows")
        _check_chain(where, blob.codec, dtype, pipelines)
        if blob.inline is not None:
            if blob.nbytes > MAX_EXPANSION * len(blob.inline):
                raise SchemaError(
                    f"{where}.nbytes: {blob.nbytes} bytes cannot come from "
                    f"{len(blob.inline)} inline bytes"
                )
            return
        row_bytes = blob.nbytes // blob.rows if blob.rows else 0
        expect = 0
        lossless = pipelines[msgpack.packb(blob.codec)].lossless
        for i, c in enumerate(blob.chunks):  # chunks must tile [0, rows) in order
            if c.base and not lossless:
                raise SchemaError(
                    f"{where}.chunks[{i}]: a delta chunk under a lossy codec (delta is for "
                    "lossless chunks only)"
                )
            if len(c.base) > MAX_CHAIN or c.key in c.base or len(set(c.base)) != len(c.base):
                raise SchemaError(f"{where}.chunks[{i}]: bad delta chain ({len(c.base)} bases)")
            if any(not isinstance(k, bytes) or len(k) != 16 for k in c.base):
                raise SchemaError(f"{where}.chunks[{i}]: a base key is not 16 bytes")
            if c.row_start != expect or c.row_stop <= c.row_start:
                raise SchemaError(
                    f"{where}.chunks[{i}]: rows [{c.row_start}, {c.row_stop}) do not continue "
                    f"the chunk rows at {expect}"
                )
            expect = c.row_stop
            raw = (c.row_stop - c.row_start) * row_bytes
            if raw > MAX_EXPANSION * c.stored:
                raise SchemaError(
                    f"{where}.chunks[{i}]: {raw} raw bytes cannot come from a chunk object "
                    f"of {c.stored} bytes"
                )
        if expect != blob.rows:
            raise SchemaError(f"{where}.chunks: cover {expect} of {blob.rows} rows")

    def _check_paths(self) -> None:
        """planner_data and int_keys must rebuild a state dict (api._unflatten) without
        conflict, and no list index may exceed the number of values in the checkpoint."""
        count = len(self.tensors) + len(self.objects)
        ints: set[tuple[Any, ...]] = set()
        for j, path in enumerate(self.int_keys):
            where = f"int_keys[{j}]"
            _path(path, where)
            last = path[-1]
            if isinstance(last, str):
                try:
                    int(last)
                except ValueError:
                    raise SchemaError(f"{where}: {last!r:.60} is not an int dict key") from None
            ints.add(tuple(path))
        if self.planner_data is None:
            return
        if not isinstance(self.planner_data, dict):
            raise SchemaError(f"planner_data: expected a map, got {_type_name(self.planner_data)}")
        for fqn, path in self.planner_data.items():
            where = f"planner_data[{_q(fqn)}]"
            _str(fqn, f"planner_data key {fqn!r:.60}")
            for i, p in enumerate(_path(path, where)):
                if type(p) is int and not 0 <= p < count:
                    raise SchemaError(
                        f"{where}[{i}]: list index {p} is outside [0, {count}) — the "
                        f"checkpoint holds {count} values"
                    )
        if not self.planner_data:
            return  # load_full keeps the flat names
        # A trie of every value's path: each node is a dict (keys) or a list (indices), and
        # no value sits where another path continues.
        root: list[Any] = ["key", {}, False]  # kind, children, holds a value
        for fqn in [*self.tensors, *self.objects]:
            path = self.planner_data.get(fqn, [fqn])
            where = f"planner_data[{_q(fqn)}]"
            node = root
            for i, p in enumerate(path):
                if isinstance(p, str) and tuple(path[: i + 1]) in ints:
                    key, kind = int(p), "key"
                else:
                    key, kind = p, "index" if type(p) is int else "key"
                if node[0] is None:
                    node[0] = kind
                elif node[0] != kind:
                    what = "a list index" if kind == "index" else "a dict key"
                    raise SchemaError(
                        f"{where}[{i}]: {p!r:.60} is {what} where another path has "
                        f"{'dict keys' if kind == 'index' else 'list indices'}"
                    )
                child = node[1].get(key)
                if child is None:
                    child = node[1][key] = [None, {}, False]
                if i == len(path) - 1:
                    if child[2] or child[1]:
                        raise SchemaError(f"{where}: path {path!r:.100} is taken by another value")
                    child[2] = True
                elif child[2]:
                    raise SchemaError(f"{where}: path {path!r:.100} runs through another value")
                node = child

    @classmethod
    def _from_dict(cls, d: dict[Any, Any], version: int = 1) -> Manifest:
        codecs = _list(_req(d, "codecs", "manifest"), "codecs")
        for i, chain in enumerate(codecs):
            for j, cfg in enumerate(_list(chain, f"codecs[{i}]")):
                _map(cfg, f"codecs[{i}][{j}]")
        tensors = {}
        for fqn, t in _map(_req(d, "tensors", "manifest"), "tensors").items():
            where = f"tensors[{_q(fqn)}]"
            t = _map(t, where, str_keys=False)
            dtype = _str(_req(t, "dtype", where), f"{where}.dtype")
            shape = _ints(_req(t, "shape", where), f"{where}.shape")
            requires_grad = _bool(_req(t, "requires_grad", where), f"{where}.requires_grad")
            if version >= 2:
                try:
                    table = ShardTable.unpack(
                        _req(t, "shards", where), len(shape), codecs, f"{where}.shards"
                    )
                except TableError as exc:
                    raise SchemaError(str(exc)) from None
                tensors[fqn] = TensorEntry(dtype, shape, None, requires_grad, table=table)
                continue
            shards = []
            for k, sv in enumerate(_list(_req(t, "shards", where), f"{where}.shards")):
                sw = f"{where}.shards[{k}]"
                sv = _map(sv, sw, str_keys=False)
                shards.append(
                    Shard(
                        _ints(_req(sv, "offsets", sw), f"{sw}.offsets"),
                        _ints(_req(sv, "sizes", sw), f"{sw}.sizes"),
                        Blob.unpack(sv, codecs, sw),
                    )
                )
            tensors[fqn] = TensorEntry(dtype, shape, shards, requires_grad)
        objects = {
            fqn: Blob.unpack(b, codecs, f"objects[{_q(fqn)}]")
            for fqn, b in _map(_req(d, "objects", "manifest"), "objects").items()
        }
        step = _req(d, "step", "manifest")
        planner = d.get("planner_data")
        if planner is not None:
            planner = {
                fqn: _path(p, f"planner_data[{_q(fqn)}]")
                for fqn, p in _map(planner, "planner_data").items()
            }
        dcp_version = d.get("dcp_version")
        user = d.get("user")
        int_keys = d.get("int_keys")
        return cls(
            name=_name(_req(d, "name", "manifest")),
            step=None if step is None else _int(step, "step"),
            created=_float(_req(d, "created", "manifest"), "created"),
            tensors=tensors,
            objects=objects,
            planner_data=planner,
            dcp_version=None if dcp_version is None else _str(dcp_version, "dcp_version"),
            writer=_str(d.get("writer", ""), "writer"),
            seconds=_float(d.get("seconds", 0.0), "seconds"),
            user={} if user is None else dict(_map(user, "user", str_keys=False)),
            int_keys=[]
            if int_keys is None
            else [_path(p, f"int_keys[{i}]") for i, p in enumerate(_list(int_keys, "int_keys"))],
        )


def _check_ref(where: str, c: ChunkRef) -> None:
    """A writer's chunk entry holds what the format allows (a reader's unpack checks the
    same while decoding)."""
    if not isinstance(c.key, bytes) or len(c.key) != 16:
        raise SchemaError(f"{where}[0]: bad chunk key {c.key!r:.60}")
    _int(c.row_start, f"{where}[1]")
    _int(c.row_stop, f"{where}[2]")
    _int(c.stored, f"{where}[3]")
    _bool(c.new, f"{where}[4]")


def _q(fqn: Any) -> str:
    """repr of a name for messages, cut short."""
    r = repr(fqn)
    return r if len(r) <= 80 else r[:76] + "…" + r[-1]


def _name(v: Any) -> str:
    try:
        return check_name(v)
    except ValueError as exc:
        raise SchemaError(f"name: {exc}") from None


def _check_chain(
    where: str, chain: Any, dtype: str | None, pipelines: dict[bytes, Pipeline]
) -> None:
    """The chain must be one this reader builds, stored canonically (every key, exact types),
    and fit what it encodes: a lossy stage only first, only on tensors of its source dtype;
    a bytegroup only as wide as an element (half of one for complex dtypes) or 1."""
    try:
        spec = msgpack.packb(chain)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SchemaError(f"{where}.codec: not a chain of codec configs: {exc}") from None
    pipe = pipelines.get(spec)
    if pipe is None:
        if not isinstance(chain, list) or not all(isinstance(c, dict) for c in chain):
            raise SchemaError(f"{where}.codec: not a chain of codec configs: {chain!r:.100}")
        try:
            pipe = Pipeline.from_config(chain)
        except UnknownCodecError as exc:
            raise UnknownCodecError(f"{where}.codec: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"{where}.codec: {exc}") from None
        for cfg, canon in zip(chain, pipe.config, strict=True):
            if set(cfg) != set(canon) or any(
                type(cfg[k]) is not type(v) or cfg[k] != v for k, v in canon.items()
            ):
                raise SchemaError(
                    f"{where}.codec: config {cfg!r:.100} is not canonical (expected {canon!r})"
                )
        pipelines[spec] = pipe
    lossy, rest = pipe.split()
    if dtype is None:
        if lossy is not None:
            raise SchemaError(f"{where}.codec: {lossy.short()} cannot encode an object value")
        widths = {1}
    elif lossy is not None:
        if getattr(lossy, "source", None) != dtype:
            raise SchemaError(
                f"{where}.codec: {lossy.short()} quantizes {getattr(lossy, 'source', '?')}, "
                f"not {dtype}"
            )
        widths = {1, 2} if isinstance(lossy, Cast) else {1}
    else:
        itemsize = DTYPES[dtype][0]
        widths = {1, itemsize}
        if dtype.startswith("complex"):
            widths.add(itemsize // 2)
    for c in rest.codecs:
        if isinstance(c, ByteGroup) and c.width not in widths:
            raise SchemaError(
                f"{where}.codec: bytegroup width {c.width} does not fit "
                f"{dtype or 'object bytes'} (element width {max(widths)})"
            )


def _check_tiling(where: str, shape: list[int], shards: list[Shard], numel: int) -> None:
    """The non-empty shard boxes must cover every element of the tensor exactly once.

    Every box already lies inside the shape, so: their volumes must add up to the tensor's,
    and no two may overlap. Overlaps are found after sorting: along the one dimension the
    boxes split (dim-0 slabs, the common case) by comparing neighbours; along two (a grid)
    by a sweep with the live boxes kept sorted (O(n log n)); along more, by a sweep along
    the dimension with the most distinct offsets that compares the live boxes."""
    if not shards:
        if numel:
            raise SchemaError(f"{where}.shards: none, for a tensor of {numel} elements")
        return
    boxes = [(s.offsets, s.sizes, k) for k, s in enumerate(shards) if all(s.sizes)]
    covered = sum(math.prod(sizes) for _, sizes, _ in boxes)
    if covered < numel:
        raise SchemaError(
            f"{where}.shards: the boxes cover {covered} of {numel} elements (some are uncovered)"
        )
    if len(boxes) < 2:
        return  # one box of the tensor's volume inside its shape: the whole tensor
    ndim = len(shape)
    split = [d for d in range(ndim) if any(off[d] or size[d] != shape[d] for off, size, _ in boxes)]

    def overlap(a: tuple[list[int], list[int], int], b: tuple[list[int], list[int], int]):
        return SchemaError(
            f"{where}.shards: box {b[0]}+{b[1]} (shard {b[2]}) overlaps box {a[0]}+{a[1]} "
            f"(shard {a[2]})"
        )

    if not split:  # several boxes, each the whole tensor
        raise overlap(boxes[0], boxes[1])
    if len(split) == 1:
        d = split[0]
        boxes.sort(key=lambda b: b[0][d])
        for a, b in zip(boxes, boxes[1:], strict=False):
            if b[0][d] < a[0][d] + a[1][d]:
                raise overlap(a, b)
    elif len(split) == 2:
        # Sweep along d; the boxes alive at the sweep point all cross it, so (without an
        # overlap so far) their intervals along e are disjoint: keep them sorted by start
        # and compare a new box with its two neighbours only.
        d, e = split
        boxes.sort(key=lambda b: b[0][d])
        ends: list[tuple[int, int]] = []  # heap of (end along d, start along e)
        starts: list[int] = []  # starts along e of the live boxes, sorted
        live: dict[int, tuple[list[int], list[int], int]] = {}
        for b in boxes:
            at = b[0][d]
            while ends and ends[0][0] <= at:
                gone = heapq.heappop(ends)[1]
                del starts[bisect.bisect_left(starts, gone)]
                del live[gone]
            lo, hi = b[0][e], b[0][e] + b[1][e]
            i = bisect.bisect_left(starts, lo)
            if i < len(starts) and starts[i] < hi:
                raise overlap(live[starts[i]], b)
            if i and (p := live[starts[i - 1]])[0][e] + p[1][e] > lo:
                raise overlap(p, b)
            starts.insert(i, lo)
            live[lo] = b
            heapq.heappush(ends, (at + b[1][d], lo))
    else:
        d = max(split, key=lambda e: len({off[e] for off, _, _ in boxes}))
        others = [e for e in split if e != d]
        boxes.sort(key=lambda b: b[0][d])
        active: list[tuple[list[int], list[int], int]] = []
        for b in boxes:
            start = b[0][d]
            active = [a for a in active if a[0][d] + a[1][d] > start]
            for a in active:
                if all(a[0][e] < b[0][e] + b[1][e] and b[0][e] < a[0][e] + a[1][e] for e in others):
                    raise overlap(a, b)
            active.append(b)
    if covered != numel:  # more volume than the tensor, yet no overlap: cannot happen
        raise SchemaError(f"{where}.shards: the boxes hold {covered} of {numel} elements")


def now() -> float:
    return time.time()
