"""A whole manifest's shard tables as one set of columns, for the coordinator's per-rank
work at scale: find the saved shard behind each of a rank's reads and hand the rank just
those shards (:class:`ShardSlice`), or the parent's chunks that overlap a rank's boxes
(``session.ParentIndex``) — with numpy over all tensors at once, no object per shard.

Tensors whose boxes split along one dimension other than dim 0, or along several, are
looked up per box by the callers' general paths; dim-0 slabs (FSDP, DDP's one box) are the
fast path.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from ckptstore.store.shard_table import I8, KEY, ShardTable


def ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The indices [starts[i], stops[i]) for every i, end to end."""
    lens = stops - starts
    total = int(lens.sum())
    if not total:
        return np.zeros(0, I8)
    ends = np.cumsum(lens)
    return np.repeat(starts - (ends - lens), lens) + np.arange(total, dtype=I8)


def gather_keys(keys: bytes, idx: np.ndarray) -> bytes:
    """The 16-byte keys at ``idx`` of ``keys`` (keys end to end), end to end."""
    if not len(idx):
        return b""
    return np.frombuffer(keys, np.uint8).reshape(-1, KEY)[idx].tobytes()


class ManifestColumns:
    """Every tensor's shard table end to end (tensor order), with the index arrays the
    lookups need. Built once per manifest by the coordinator."""

    def __init__(self, names: list[str], dtypes: list[str], shapes: list[list[int]], tables):
        self.names = names
        self.dtypes = dtypes
        self.shapes = shapes
        self.tid_of = {n: i for i, n in enumerate(names)}
        self.ndims = np.array([len(s) for s in shapes], I8)
        maxd = int(self.ndims.max()) if len(names) else 0
        self.maxd = maxd
        counts = np.array([len(t) for t in tables], I8)
        n = int(counts.sum())
        self.shard_base = np.zeros(len(names) + 1, I8)
        np.cumsum(counts, out=self.shard_base[1:])
        self.tid = np.repeat(np.arange(len(names), dtype=I8), counts)
        self.offsets = np.zeros((n, maxd), I8)
        self.sizes = np.zeros((n, maxd), I8)
        chains: list[Any] = []
        spec_index: dict[bytes, int] = {}
        codec = []
        for i, t in enumerate(tables):
            a, z = self.shard_base[i], self.shard_base[i + 1]
            nd = len(shapes[i])
            if nd:
                self.offsets[a:z, :nd] = t.offsets
                self.sizes[a:z, :nd] = t.sizes
            remap = []
            for chain in t.chains:
                spec = msgpack.packb(chain)
                j = spec_index.get(spec)
                if j is None:
                    j = spec_index[spec] = len(chains)
                    chains.append(chain)
                remap.append(j)
            codec.append(np.asarray(remap or [0], I8)[t.codec])
        self.chains = chains
        self.specs = list(spec_index)
        self.codec = np.concatenate(codec) if codec else np.zeros(0, I8)

        def cat(name: str, dtype=I8, width: int = 0) -> np.ndarray:
            parts = [getattr(t, name) for t in tables]
            if not parts:
                return np.zeros((0, width) if width else 0, dtype)
            return np.concatenate(parts)

        self.nbytes = cat("nbytes")
        self.rows = cat("rows")
        self.inline_len = cat("inline_len")
        self.nchunks = cat("nchunks")
        self.inline = b"".join(t.inline for t in tables)
        self.inline_at = np.zeros(n + 1, I8)
        np.cumsum(np.maximum(self.inline_len, 0), out=self.inline_at[1:])
        self.first = np.zeros(n + 1, I8)
        np.cumsum(self.nchunks, out=self.first[1:])
        self.row_start = cat("row_start")
        self.row_stop = cat("row_stop")
        self.stored = cat("stored")
        self.new = cat("new", np.uint8)
        self.keys = b"".join(t.keys for t in tables)
        m = len(self.row_start)
        if any(t.nbases is not None for t in tables):
            self.nbases = np.concatenate(
                [t.nbases if t.nbases is not None else np.zeros(t.chunk_count, I8) for t in tables]
            )
            self.bases = b"".join(t.bases or b"" for t in tables)
        else:
            self.nbases = None
            self.bases = b""
        self.base_at = np.zeros(m + 1, I8)
        if self.nbases is not None:
            np.cumsum(self.nbases, out=self.base_at[1:])
        if any(t.qmask is not None for t in tables):
            self.qmask = np.concatenate(
                [t.qmask if t.qmask is not None else np.zeros(len(t), np.uint8) for t in tables]
            )
            self.qf = np.concatenate(
                [t.qf if t.qf is not None else np.zeros((len(t), 3)) for t in tables]
            )
            self.qi = np.concatenate(
                [t.qi if t.qi is not None else np.zeros((len(t), 2), I8) for t in tables]
            )
        else:
            self.qmask = self.qf = self.qi = None
        # which tensors are dim-0 slabs: every split dimension is dim 0 (or one box)
        inner_same = np.ones(n, bool)
        if maxd > 1:
            shp = np.zeros((len(names), maxd), I8)
            for i, s in enumerate(shapes):
                shp[i, : len(s)] = s
            inner_same = np.all(self.offsets[:, 1:] == 0, axis=1) & np.all(
                self.sizes[:, 1:] == shp[self.tid, 1:], axis=1
            )
        bad = np.zeros(len(names), bool)
        np.logical_or.at(bad, self.tid, ~inner_same)
        self.slabs = ~bad & (self.ndims > 0)
        # shards sorted by (tensor, first row): the composite key of the lookups
        off0 = self.offsets[:, 0] if maxd else np.zeros(n, I8)
        top = int(off0.max()) + 2 if n else 2
        self.scale = top if top < (1 << 62) // max(len(names), 1) else 0
        if self.scale:
            keyed = self.tid * self.scale + off0
            self.order = np.argsort(keyed, kind="stable")
            self.sorted_keys = keyed[self.order]
        # chunks of slab tensors by global row, for the parent lookup
        self.chunk_shard = np.repeat(np.arange(n, dtype=I8), self.nchunks)
        gfirst = off0[self.chunk_shard] if m else np.zeros(0, I8)
        self.gstart = gfirst + self.row_start
        self.gstop = gfirst + self.row_stop

    @classmethod
    def of(cls, manifest: Any) -> ManifestColumns:
        ts = manifest.tensors
        return cls(
            list(ts),
            [t.dtype for t in ts.values()],
            [list(t.shape) for t in ts.values()],
            [t.table for t in ts.values()],
        )

    # -- load: the saved shard behind each read --------------------------------------------
    def find(self, fqns: list[str], offsets: list[tuple[int, ...]]) -> np.ndarray:
        """Global shard index of the shard of tensor ``fqns[i]`` whose corner is
        ``offsets[i]``; -1 where there is none."""
        q = len(fqns)
        out = np.full(q, -1, I8)
        if not q:
            return out
        tid = np.array([self.tid_of.get(f, -1) for f in fqns], I8)
        pad = np.zeros((q, self.maxd), I8)
        nd = np.array([len(o) for o in offsets], I8)
        ok = (tid >= 0) & (nd == np.where(tid >= 0, self.ndims[tid], -1))
        for i in np.flatnonzero(ok & (nd > 0)).tolist():
            pad[i, : nd[i]] = offsets[i]
        if self.scale and len(self.order):
            keyed = tid * self.scale + (pad[:, 0] if self.maxd else 0)
            pos = np.searchsorted(self.sorted_keys, keyed)
            pos = np.minimum(pos, len(self.order) - 1)
            cand = self.order[pos]
            hit = ok & (self.sorted_keys[pos] == keyed) & np.all(self.offsets[cand] == pad, axis=1)
            out[hit] = cand[hit]
        for i in np.flatnonzero(ok & (out < 0)).tolist():  # grids, 0-d, duplicates on dim 0
            t = int(tid[i])
            a, z = int(self.shard_base[t]), int(self.shard_base[t + 1])
            same = np.flatnonzero(np.all(self.offsets[a:z] == pad[i], axis=1))
            if len(same):
                out[i] = a + int(same[0])
        return out

    def slice(self, shards: np.ndarray) -> ShardSlice:
        """The shards at global indices ``shards`` (no repeats), packed for one rank."""
        g = np.asarray(shards, I8)
        chunks = ranges(self.first[g], self.first[g + 1])
        il = self.inline_len[g]
        inline = b"".join(
            self.inline[int(self.inline_at[i]) : int(self.inline_at[i + 1])]
            for i in g[il >= 0].tolist()
        )
        nbases = bases = None
        if self.nbases is not None and len(chunks) and self.nbases[chunks].any():
            nbases = self.nbases[chunks]
            bases = b"".join(
                self.bases[int(self.base_at[c]) * KEY : int(self.base_at[c + 1]) * KEY]
                for c in chunks[nbases > 0].tolist()
            )
        q = {}
        if self.qmask is not None:
            q = {"qmask": self.qmask[g], "qf": self.qf[g], "qi": self.qi[g]}
        table = ShardTable(
            ndim=self.maxd,
            offsets=self.offsets[g],
            sizes=self.sizes[g],
            codec=self.codec[g],
            nbytes=self.nbytes[g],
            rows=self.rows[g],
            inline_len=il,
            inline=inline,
            nchunks=self.nchunks[g],
            keys=gather_keys(self.keys, chunks),
            row_start=self.row_start[chunks],
            row_stop=self.row_stop[chunks],
            stored=self.stored[chunks],
            new=self.new[chunks],
            nbases=nbases,
            bases=bases or b"",
            chains=self.chains,
            **q,
        )
        tids = self.tid[g].tolist()
        return ShardSlice(
            [self.names[t] for t in tids],
            [self.dtypes[t] for t in tids],
            self.ndims[self.tid[g]],
            table,
        )


class ShardSlice:
    """The saved shards one rank reads, packed: a mapping from (fqn, corner) to
    ``(fqn, dtype, Shard)``, whose objects are built on the rank, on first use."""

    def __init__(self, fqns: list[str], dtypes: list[str], ndims: np.ndarray, table: ShardTable):
        self.fqns = fqns
        self.dtypes = dtypes
        self.ndims = ndims
        self.table = table
        self._index: dict[tuple[str, tuple[int, ...]], int] | None = None
        self._made: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"fqns": self.fqns, "dtypes": self.dtypes, "ndims": self.ndims, "t": self.table}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["fqns"], state["dtypes"], state["ndims"], state["t"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.fqns)

    def _key_index(self) -> dict[tuple[str, tuple[int, ...]], int]:
        if self._index is None:
            offs = self.table.offsets.tolist()
            nds = self.ndims.tolist()
            self._index = {
                (f, tuple(o[:nd])): i
                for i, (f, o, nd) in enumerate(zip(self.fqns, offs, nds, strict=True))
            }
        return self._index

    def get(self, key: tuple[str, Any], default: Any = None) -> Any:
        i = self._key_index().get(key)  # type: ignore[arg-type]
        if i is None:
            return default
        rec = self._made.get(i)
        if rec is None:
            shard = self.table.shard(i)
            nd = int(self.ndims[i])
            shard.offsets, shard.sizes = shard.offsets[:nd], shard.sizes[:nd]
            rec = self._made[i] = (self.fqns[i], self.dtypes[i], shard)
        return rec


class RankRecords:
    """What one rank's load plan carries: its object values' blobs and its shards."""

    def __init__(self, objects: dict[Any, Any], shards: ShardSlice | None) -> None:
        self.objects = objects
        self.shards = shards

    def __len__(self) -> int:
        return len(self.objects) + (len(self.shards) if self.shards is not None else 0)

    def get(self, key: Any, default: Any = None) -> Any:
        rec = self.objects.get(key)
        if rec is None and self.shards is not None:
            rec = self.shards.get(key)
        return default if rec is None else rec
