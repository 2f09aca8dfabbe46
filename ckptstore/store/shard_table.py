"""A tensor's shards as packed columns: the per-tensor layout of manifest format 2.

At 1,024 ranks a 7B AdamW manifest holds ~1.2 M shards; one Python object per shard (and
per chunk) costs the coordinator minutes to decode, validate and plan with. Here each column
(shard offsets, sizes, codec, sizes in bytes, chunk rows, chunk keys …) is one little-endian
array, read with ``np.frombuffer`` over the msgpack ``bin`` it was stored in and checked
with a few numpy passes (docs/format.md, "Shard tables"). ``Shard``/``Blob``/``ChunkRef``
objects are built only for the shards a caller asks for (:meth:`ShardTable.shard`).
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from ckptstore.codecs.quantize import QuantStats

I8 = np.dtype("<i8")
F8 = np.dtype("<f8")
KEY = 16
MAX_CHAIN = 64
MAX_EXPANSION_LOG2 = 20
_MAX_INT = 2**63 - 1


class TableError(ValueError):
    """A column of a shard table is malformed (wrong type or length, a count that does not
    add up). The message starts with the field's path; ``manifest.SchemaError`` wraps it."""


def _bin(d: dict[Any, Any], key: str, where: str, *, required: bool = True) -> bytes | None:
    v = d.get(key)
    if v is None:
        if required:
            raise TableError(f"{where}: missing required field {key!r}")
        return None
    if not isinstance(v, bytes):
        raise TableError(f"{where}.{key}: expected bin, got {type(v).__name__}")
    return v


def _col(d: dict[Any, Any], key: str, where: str, n: int, dtype: np.dtype, width: int = 1):
    data = _bin(d, key, where)
    assert data is not None
    if len(data) != n * width * dtype.itemsize:
        raise TableError(
            f"{where}.{key}: {len(data)} bytes, expected {n * width * dtype.itemsize} "
            f"({n} × {width} × {dtype.itemsize})"
        )
    a = np.frombuffer(data, dtype)
    return a.reshape(n, width) if width != 1 else a


class ShardTable:
    """The shards of one tensor (n shards, m chunks, ndim dimensions) as columns.

    Per shard: ``offsets``/``sizes`` (n × ndim), ``codec`` (index into ``chains``),
    ``nbytes``, ``rows``, ``inline_len`` (-1: the blob is chunked), ``nchunks``; the inline
    frames end to end in ``inline``. Per chunk, in shard order then row order:
    ``keys`` (m × 16 bytes, end to end), ``row_start``, ``row_stop``, ``stored``, ``new``
    and ``nbases`` (delta chain length; its keys end to end in ``bases``). Optional per
    shard: ``qmask`` with ``qf`` (n × 3 floats) and ``qi`` (n × 2 ints), a lossy blob's
    error figures. Arrays are read-only views when decoded; a table is never mutated."""

    __slots__ = (
        "ndim",
        "offsets",
        "sizes",
        "codec",
        "nbytes",
        "rows",
        "inline_len",
        "inline",
        "nchunks",
        "keys",
        "row_start",
        "row_stop",
        "stored",
        "new",
        "nbases",
        "bases",
        "qmask",
        "qf",
        "qi",
        "chains",
        "_first",
        "_inline_at",
        "_base_at",
    )

    def __init__(self, **cols: Any) -> None:
        for k in self.__slots__:
            if not k.startswith("_"):
                setattr(self, k, cols.get(k))
        self._first: np.ndarray | None = None
        self._inline_at: np.ndarray | None = None
        self._base_at: np.ndarray | None = None

    # -- sizes ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.codec)

    @property
    def chunk_count(self) -> int:
        return len(self.row_start)

    def first_chunk(self) -> np.ndarray:
        """Index of each shard's first chunk (n + 1 entries, the last = m)."""
        if self._first is None:
            first = np.zeros(len(self) + 1, I8)
            np.cumsum(self.nchunks, out=first[1:])
            self._first = first
        return self._first

    def inline_at(self) -> np.ndarray:
        if self._inline_at is None:
            at = np.zeros(len(self) + 1, I8)
            np.cumsum(np.maximum(self.inline_len, 0), out=at[1:])
            self._inline_at = at
        return self._inline_at

    def base_at(self) -> np.ndarray:
        if self._base_at is None:
            at = np.zeros(self.chunk_count + 1, I8)
            if self.nbases is not None:
                np.cumsum(self.nbases, out=at[1:])
            self._base_at = at
        return self._base_at

    # -- building from objects -----------------------------------------------------------
    @classmethod
    def from_shards(cls, shards: list[Any], ndim: int) -> ShardTable:
        """Pack ``Shard`` objects (a writer's). Values that are not what the format allows
        (a float offset, a 15-byte key, a box of another rank) raise ``TableError``; the
        manifest's validation then names the field with the per-shard checks."""
        b = TableBuilder(ndim)
        for s in shards:
            b.add(s.offsets, s.sizes, s.blob)
        return b.build()

    # -- objects for callers that want them ----------------------------------------------
    def shard(self, i: int) -> Any:
        """Shard ``i`` as a ``Shard`` object (its blob and chunk entries)."""
        return self.shards_at([i])[0]

    def shards_at(self, idx: Any) -> list[Any]:
        from ckptstore.store.manifest import Blob, ChunkRef, Shard

        idx = [int(i) for i in idx]
        first = self.first_chunk()
        inline_at = self.inline_at()
        base_at = self.base_at()
        offsets = self.offsets[idx].tolist()
        sizes = self.sizes[idx].tolist()
        out = []
        for j, i in enumerate(idx):
            chain = self.chains[int(self.codec[i])]
            n = int(self.inline_len[i])
            qstats = None
            if self.qmask is not None and self.qmask[i]:
                f, q = self.qf[i].tolist(), self.qi[i].tolist()
                qstats = QuantStats(f[0], f[1], f[2], q[0], q[1])
            if n >= 0:
                a = int(inline_at[i])
                blob = Blob(
                    chain,
                    int(self.nbytes[i]),
                    int(self.rows[i]),
                    inline=self.inline[a : a + n],
                    qstats=qstats,
                )
            else:
                a, z = int(first[i]), int(first[i + 1])
                keys = self.keys
                chunks = []
                rs = self.row_start[a:z].tolist()
                re = self.row_stop[a:z].tolist()
                st = self.stored[a:z].tolist()
                nw = self.new[a:z].tolist()
                for k in range(z - a):
                    c = a + k
                    base: tuple[bytes, ...] = ()
                    if self.nbases is not None and self.nbases[c]:
                        p, q = int(base_at[c]), int(base_at[c + 1])
                        base = tuple(self.bases[x * KEY : (x + 1) * KEY] for x in range(p, q))
                    chunks.append(
                        ChunkRef(
                            keys[c * KEY : (c + 1) * KEY],
                            rs[k],
                            re[k],
                            st[k],
                            bool(nw[k]),
                            base=base,
                        )
                    )
                blob = Blob(chain, int(self.nbytes[i]), int(self.rows[i]), chunks=chunks)
                blob.qstats = qstats
            out.append(Shard(offsets[j], sizes[j], blob))
        return out

    def to_shards(self) -> list[Any]:
        return self.shards_at(range(len(self)))

    # -- figures -------------------------------------------------------------------------
    def key_list(self) -> list[bytes]:
        k = self.keys
        return [k[i : i + KEY] for i in range(0, len(k), KEY)]

    def base_list(self) -> list[bytes]:
        k = self.bases or b""
        return [k[i : i + KEY] for i in range(0, len(k), KEY)]

    def logical_bytes(self) -> int:
        return int(self.nbytes.sum())

    def chunk_bytes(self) -> int:
        return int(self.stored.sum())

    def new_chunk_bytes(self) -> int:
        return int(self.stored[self.new.astype(bool)].sum())

    def new_chunk_count(self) -> int:
        return int(np.count_nonzero(self.new))

    def delta_chunk_bytes(self) -> int:
        if self.nbases is None:
            return 0
        return int(self.stored[self.nbases > 0].sum())

    def max_chain(self) -> int:
        if self.nbases is None or not len(self.nbases):
            return 0
        return int(self.nbases.max())

    def inline_bytes(self) -> int:
        return len(self.inline)

    def error(self) -> QuantStats | None:
        if self.qmask is None or not self.qmask.any():
            return None
        sel = self.qmask.astype(bool)
        total = QuantStats()
        for f, q in zip(self.qf[sel].tolist(), self.qi[sel].tolist(), strict=True):
            total.add(QuantStats(f[0], f[1], f[2], q[0], q[1]))
        return total

    # -- encoding ------------------------------------------------------------------------
    def pack(self, codec_map: np.ndarray) -> dict[str, Any]:
        """The msgpack map of the table, its codec column mapped through ``codec_map``
        (this table's chain index → the manifest's codec table index)."""

        def raw(a: np.ndarray) -> memoryview | bytes:  # packed as bin without a copy
            if not a.size:
                return b""
            return memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B")

        out: dict[str, Any] = {
            "n": len(self),
            "offsets": raw(self.offsets.astype(I8, copy=False)),
            "sizes": raw(self.sizes.astype(I8, copy=False)),
            "codec": raw(codec_map[self.codec].astype(I8, copy=False)),
            "nbytes": raw(self.nbytes),
            "rows": raw(self.rows),
            "inline_len": raw(self.inline_len),
            "inline": self.inline,
            "nchunks": raw(self.nchunks),
            "keys": self.keys,
            "row_start": raw(self.row_start),
            "row_stop": raw(self.row_stop),
            "stored": raw(self.stored),
            "new": raw(self.new.astype(np.uint8, copy=False)),
        }
        if self.nbases is not None and self.nbases.any():
            out["nbases"] = self.nbases.tobytes()
            out["bases"] = bytes(self.bases)
        if self.qmask is not None and self.qmask.any():
            out["qmask"] = self.qmask.astype(np.uint8, copy=False).tobytes()
            out["qf"] = self.qf.tobytes()
            out["qi"] = self.qi.tobytes()
        return out

    @classmethod
    def unpack(
        cls, d: Any, ndim: int, chains: list[list[dict[str, Any]]], where: str
    ) -> ShardTable:
        """The table of a format-2 tensor entry's ``shards`` map: every column a bin of
        exactly its length (checked here); values are checked by ``check``."""
        if not isinstance(d, dict):
            raise TableError(f"{where}: expected a map, got {type(d).__name__}")
        n = d.get("n")
        if type(n) is not int or not 0 <= n <= _MAX_INT:
            raise TableError(f"{where}.n: expected an int ≥ 0, got {n!r:.60}")
        cols: dict[str, Any] = {"ndim": ndim, "chains": chains}
        cols["offsets"] = _col(d, "offsets", where, n, I8, ndim).reshape(n, ndim)
        cols["sizes"] = _col(d, "sizes", where, n, I8, ndim).reshape(n, ndim)
        for k in ("codec", "nbytes", "rows", "inline_len", "nchunks"):
            cols[k] = _col(d, k, where, n, I8)
        inline = _bin(d, "inline", where)
        cols["inline"] = inline
        keys = _bin(d, "keys", where)
        assert keys is not None
        if len(keys) % KEY:
            raise TableError(f"{where}.keys: {len(keys)} bytes, not a whole number of keys")
        m = len(keys) // KEY
        cols["keys"] = keys
        for k in ("row_start", "row_stop", "stored"):
            cols[k] = _col(d, k, where, m, I8)
        cols["new"] = _col(d, "new", where, m, np.dtype(np.uint8))
        if "nbases" in d or "bases" in d:
            cols["nbases"] = _col(d, "nbases", where, m, I8)
            bases = _bin(d, "bases", where)
            assert bases is not None
            if len(bases) % KEY:
                raise TableError(f"{where}.bases: {len(bases)} bytes, not a whole number of keys")
            cols["bases"] = bases
        if "qmask" in d or "qf" in d or "qi" in d:
            cols["qmask"] = _col(d, "qmask", where, n, np.dtype(np.uint8))
            cols["qf"] = _col(d, "qf", where, n, F8, 3)
            cols["qi"] = _col(d, "qi", where, n, I8, 2)
        return cls(**cols)

    # -- validation ----------------------------------------------------------------------
    def check(self, where: str, shape: list[int], itemsize: int, numel: int) -> str | None:
        """The rules of docs/format.md ("Validation") for this tensor's shards, as numpy
        passes over the columns. Returns None when they hold, else a short description of
        the first rule broken (the caller names the shard with the per-shard checks)."""
        n, m = len(self), self.chunk_count
        ndim = self.ndim
        if self.offsets.shape != (n, ndim) or self.sizes.shape != (n, ndim):
            return "a box has a rank unlike the shape"
        # counts first: every later index depends on them
        nch, il = self.nchunks, self.inline_len
        if n and (nch.min() < 0 or il.min() < -1):
            return "a negative count"
        if int(nch.sum()) != m:
            return f"nchunks add up to {int(nch.sum())}, the table has {m} chunks"
        if int(np.maximum(il, 0).sum()) != len(self.inline):
            return "inline lengths do not add up to the inline bytes"
        if np.any((il >= 0) & (nch != 0)):
            return "a blob both inline and chunked"
        nb = self.nbases
        if nb is not None:
            if m and (nb.min() < 0 or nb.max() > MAX_CHAIN):
                return "a delta chain length outside [0, 64]"
            if int(nb.sum()) * KEY != len(self.bases):
                return "delta chain lengths do not add up to the base keys"
        if self.qmask is not None:
            if n and self.qmask.max() > 1:
                return "qmask is not 0 or 1"
            sel = self.qmask.astype(bool)
            if np.any(self.qi[sel] < 0):
                return "a negative qstats count"
        if m and self.new.max() > 1:
            return "new is not 0 or 1"
        # boxes, sizes and rows
        off, siz = self.offsets, self.sizes
        if n:
            if off.size and (off.min() < 0 or siz.min() < 0):
                return "a negative offset or size"
            shp = np.asarray(shape, I8).reshape(1, ndim) if ndim else np.zeros((1, 0), I8)
            if np.any(siz > shp) or np.any(off > shp - siz):
                return "a box exceeds the shape"
            vol = np.prod(siz, axis=1, dtype=I8) if ndim else np.ones(n, I8)
            if np.any(self.nbytes != vol * itemsize):
                return "nbytes is not prod(sizes) × itemsize"
            rows = siz[:, 0] if ndim else np.ones(n, I8)
            nz = self.nbytes != 0
            if np.any(nz & (self.rows != rows)):
                return "rows is not sizes[0]"
            if self.rows.min() < 0 or np.any((self.rows == 0) & nz):
                return "bytes do not split into rows"
            safe_rows = np.where(self.rows == 0, 1, self.rows)
            if np.any(nz & (self.nbytes % safe_rows != 0)):
                return "bytes do not split into rows"
            bad = np.flatnonzero((self.codec < 0) | (self.codec >= len(self.chains)))
            if len(bad):
                i = int(bad[0])
                return (
                    f"codec: shard {i}: index {int(self.codec[i])} is outside the codec table "
                    f"({len(self.chains)} entries)"
                )
            inl = il >= 0
            if np.any(inl & ((self.nbytes >> MAX_EXPANSION_LOG2) > il)) or np.any(
                inl
                & ((self.nbytes >> MAX_EXPANSION_LOG2) == il)
                & ((self.nbytes & ((1 << MAX_EXPANSION_LOG2) - 1)) != 0)
            ):
                return "an inline blob declares more than 2^20 × its bytes"
        # chunk rows tile [0, rows) of each chunked blob, in order
        if m:
            rs, re = self.row_start, self.row_stop
            if rs.min() < 0 or self.stored.min() < 0:
                return "a negative chunk row or size"
            if np.any(re <= rs):
                return "an empty chunk"
            first = self.first_chunk()
            shard_of = np.repeat(np.arange(n), nch)
            starts = first[:-1][nch > 0]
            cont = rs[1:] == re[:-1]
            cont[starts[1:] - 1] = True  # a shard's first chunk does not continue the last
            if not cont.all() or np.any(rs[starts] != 0):
                return "chunk rows do not continue each other"
            lasts = first[1:][nch > 0] - 1
            if np.any(re[lasts] != self.rows[nch > 0]):
                return "chunks do not cover the rows"
            row_bytes = self.nbytes[shard_of] // np.where(self.rows == 0, 1, self.rows)[shard_of]
            raw = (re - rs) * row_bytes
            hi = raw >> MAX_EXPANSION_LOG2
            lo = (raw & ((1 << MAX_EXPANSION_LOG2) - 1)) != 0
            if np.any((hi > self.stored) | ((hi == self.stored) & lo)):
                return "a chunk declares more than 2^20 × its stored bytes"
        if n:
            chunked = (il < 0) & (self.rows > 0) & (nch == 0)
            if np.any(chunked):
                return "chunks do not cover the rows"
        return _tiling(shape, off, siz, numel)


def _tiling(shape: list[int], off: np.ndarray, siz: np.ndarray, numel: int) -> str | None:
    """The non-empty boxes tile the tensor: volumes add up, no two overlap (sort along the
    one split dimension, compare neighbours). For boxes split along several dimensions
    this returns "grid", and the caller runs the per-shard sweep."""
    n = len(off)
    if not n:
        return None if not numel else "no shards"
    ndim = off.shape[1]
    keep = np.all(siz > 0, axis=1) if ndim else np.ones(n, bool)
    off, siz = off[keep], siz[keep]
    vol = np.prod(siz, axis=1, dtype=I8) if ndim else np.ones(len(off), I8)
    if len(vol) and int(vol.max()) > (1 << 62) // max(len(vol), 1):
        covered = sum(vol.tolist())
    else:
        covered = int(vol.sum())
    if covered < numel:
        return "boxes leave elements uncovered"
    if len(off) < 2:
        return None
    shp = np.asarray(shape, I8)
    split = [d for d in range(ndim) if np.any(off[:, d] != 0) or np.any(siz[:, d] != shp[d])]
    if not split:
        return "boxes overlap"
    if len(split) > 1:
        return "grid"
    d = split[0]
    order = np.argsort(off[:, d], kind="stable")
    a = off[order, d]
    if np.any(a[1:] < a[:-1] + siz[order, d][:-1]):
        return "boxes overlap"
    if covered != numel:
        return "boxes overlap"
    return None


class TableBuilder:
    """Appends shards (offsets, sizes, blob) and packs them into a :class:`ShardTable`:
    how a writer's per-shard results become columns in one pass."""

    def __init__(self, ndim: int) -> None:
        self.ndim = ndim
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.codec: list[int] = []
        self.nbytes: list[int] = []
        self.rows: list[int] = []
        self.inline_len: list[int] = []
        self.inline: list[bytes] = []
        self.nchunks: list[int] = []
        self.keys: list[bytes] = []
        self.row_start: list[int] = []
        self.row_stop: list[int] = []
        self.stored: list[int] = []
        self.new: list[bool] = []
        self.nbases: list[int] = []
        self.bases: list[bytes] = []
        self.q: dict[int, Any] = {}
        self.chains: list[Any] = []
        self._chain_ids: dict[int, tuple[Any, int]] = {}
        self._chain_specs: dict[bytes, int] = {}
        self.bad = False

    def _chain(self, chain: Any) -> int:
        hit = self._chain_ids.get(id(chain))
        if hit is not None and hit[0] is chain:
            return hit[1]
        try:
            spec = msgpack.packb(chain)
        except (TypeError, ValueError, OverflowError):
            spec = repr(chain).encode()
        i = self._chain_specs.get(spec)
        if i is None:
            i = self._chain_specs[spec] = len(self.chains)
            self.chains.append(chain)
        self._chain_ids[id(chain)] = (chain, i)
        return i

    def add(self, offsets: Any, sizes: Any, blob: Any) -> None:
        self.add_many([(offsets, sizes, blob)])

    def add_many(self, shards: Any) -> None:
        """Append (offsets, sizes, blob) triples: one loop with its appends bound once —
        at 1,000 ranks a commit packs about a million shards."""
        ndim = self.ndim
        off_ext, size_ext = self.offsets.extend, self.sizes.extend
        codec_app, nbytes_app, rows_app = self.codec.append, self.nbytes.append, self.rows.append
        il_app, inl_app, nch_app = self.inline_len.append, self.inline.append, self.nchunks.append
        key_app, rs_app, re_app = self.keys.append, self.row_start.append, self.row_stop.append
        st_app, new_app, nb_app = self.stored.append, self.new.append, self.nbases.append
        chain_of = self._chain
        for offsets, sizes, blob in shards:
            if len(offsets) != ndim or len(sizes) != ndim:
                self.bad = True
                return
            off_ext(offsets)
            size_ext(sizes)
            codec_app(chain_of(blob.codec))
            nbytes_app(blob.nbytes)
            rows_app(blob.rows)
            if blob.qstats is not None:
                self.q[len(self.codec) - 1] = blob.qstats
            inline = blob.inline
            if inline is not None:
                il_app(len(inline) if isinstance(inline, bytes) else -2)
                inl_app(inline)
                nch_app(0)
                continue
            il_app(-1)
            chunks = blob.chunks
            nch_app(len(chunks))
            for c in chunks:
                key_app(c.key)
                rs_app(c.row_start)
                re_app(c.row_stop)
                st_app(c.stored)
                new_app(c.new)
                base = c.base
                nb_app(len(base))
                if base:
                    self.bases.extend(base)

    def build(self) -> ShardTable:
        if self.bad:
            raise TableError("a box has a rank unlike the shape")
        ints = [
            self.offsets,
            self.sizes,
            self.nbytes,
            self.rows,
            self.row_start,
            self.row_stop,
            self.stored,
        ]
        for col in ints:
            if not set(map(type, col)) <= {int}:
                raise TableError("a value that is not an int")
        if not set(map(type, self.new)) <= {bool}:
            raise TableError("new is not a bool")
        for keys in (self.keys, self.bases):
            if not set(map(type, keys)) <= {bytes} or not set(map(len, keys)) <= {KEY}:
                raise TableError("a key that is not 16 bytes")
        if not set(map(type, self.inline)) <= {bytes} or -2 in self.inline_len:
            raise TableError("inline data that is not bin")
        n = len(self.codec)
        try:
            arr = {
                k: np.array(getattr(self, k), I8)
                for k in (
                    "codec",
                    "nbytes",
                    "rows",
                    "inline_len",
                    "nchunks",
                    "row_start",
                    "row_stop",
                    "stored",
                    "nbases",
                )
            }
            offsets = np.array(self.offsets, I8).reshape(n, self.ndim)
            sizes = np.array(self.sizes, I8).reshape(n, self.ndim)
        except OverflowError:
            raise TableError("a value outside [0, 2^63 − 1]") from None
        qmask = qf = qi = None
        if self.q:
            qmask = np.zeros(n, np.uint8)
            qf = np.zeros((n, 3), F8)
            qi = np.zeros((n, 2), I8)
            for i, qs in self.q.items():
                qmask[i] = 1
                try:
                    qf[i] = (qs.sq_err, qs.sq_ref, qs.max_abs)
                    qi[i] = (qs.fallback, qs.chunks)
                except (TypeError, ValueError, OverflowError):
                    raise TableError("qstats that are not numbers") from None
            if qi.min() < 0:
                raise TableError("a negative qstats count")
        return ShardTable(
            ndim=self.ndim,
            offsets=offsets,
            sizes=sizes,
            codec=arr["codec"],
            nbytes=arr["nbytes"],
            rows=arr["rows"],
            inline_len=arr["inline_len"],
            inline=b"".join(self.inline),
            nchunks=arr["nchunks"],
            keys=b"".join(self.keys),
            row_start=arr["row_start"],
            row_stop=arr["row_stop"],
            stored=arr["stored"],
            new=np.array(self.new, np.uint8),
            nbases=arr["nbases"] if any(self.nbases) else None,
            bases=b"".join(self.bases),
            qmask=qmask,
            qf=qf,
            qi=qi,
            chains=self.chains,
        )
