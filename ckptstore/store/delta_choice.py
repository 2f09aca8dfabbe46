"""When a save tries a delta chunk, and what a process remembers between saves to decide.

``store/delta.py`` is the byte format (encode, apply, key); this module is the policy on top
of it that :class:`~ckptstore.store.blobs.BlobWriter` asks, chunk by chunk, in a delta save
(docs/benchmarks.md, "Delta": the heuristic):

- a chunk whose rows equal the parent's delta chunk is that chunk again (no encode);
- a chain already ``delta_chain`` long restarts with a standalone chunk;
- rows whose delta lost recently are stored standalone without trying (:class:`DeltaRules`:
  a near miss skips the next save's try, a wide loss — or a loss at a retry — the next 3);
- otherwise the delta is encoded against the parent's raw bytes, and taken without encoding
  the chunk standalone too when it is clearly smaller than those rows were standalone last
  time; else both are encoded and the smaller kept.

What it remembers lives in one explicit object, :class:`DeltaState`: the raw bytes of
recent chunks (the bases of the next save's deltas, :class:`RawCache`) and, per chunk
written, its rows' standalone size and how many saves in a row their delta lost
(:class:`SizeHistory`). Only the sizes of the stored bytes depend on it, never their
format: a cold state (a new process) reads bases back from the store and may encode a chunk
both ways where a warm one would not, and keeps the same chunk whichever is smaller.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ckptstore.codecs.base import Buffer, byte_view
from ckptstore.codecs.pipeline import Pipeline
from ckptstore.errors import CkptStoreError
from ckptstore.store.delta import delta_key, encode_delta

log = logging.getLogger(__name__)

Parent = tuple[bytes, tuple[bytes, ...], int]
"""A delta candidate: the parent chunk's key, its own base chain ([direct base, …, root];
empty when standalone) and its stored size."""

DeltaBases = Mapping[tuple[int, int], Parent]
"""A tensor shard's delta candidates: (first global row, stop) → :data:`Parent`, for parent
chunks of the same rows, box and codec."""

ReadBase = Callable[[bytes, tuple[bytes, ...], Pipeline, int], Buffer]
"""``read_base(key, chain, pipeline, nbytes)``: the raw bytes of chunk ``key`` (chain
``chain``, lossless ``pipeline``, ``nbytes`` long) read back from the store; raises
CkptStoreError when it cannot."""


@dataclass(frozen=True)
class DeltaRules:
    """The save-time schedule of delta tries (docs/benchmarks.md, "Delta": the heuristic)."""

    retry_lost: int = 4
    """Rows whose delta lost by more than 10%, or lost again when retried, are stored
    standalone without trying, except every this many saves; rows whose delta lost narrowly
    for the first time skip one save's try. 1: never skip a try."""
    sure_win: float = 1.0
    """A delta below this fraction of the rows' last standalone size is taken without
    encoding the chunk standalone too; otherwise both are encoded and the smaller kept. (0.9
    stored the same bytes to the byte on the fine-tune series and saved 13% slower: the
    estimate is at most ``delta_chain`` saves old, as every chain restart measures it
    again.) 0.0: always encode both."""


RULES = DeltaRules()
"""The rules saves use."""
EXACT_RULES = DeltaRules(retry_lost=1, sure_win=0.0)
"""Every changed chunk encoded both ways and the smaller kept, no try skipped (the delta
bench's ``--exact``)."""


class RawCache:
    """Raw bytes of chunks by key, least recently used first out: the bases of a delta
    save (the chunks this process wrote, or decoded as bases, last). Holds at most the
    ``limit`` of its latest :meth:`put` (``Settings.delta_cache_bytes``) plus the entries
    writers hold at that moment; entries are read-only copies."""

    def __init__(self) -> None:
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            raw = self._items.get(key)
            if raw is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return raw

    def put(self, key: bytes, raw: Buffer, limit: int) -> None:
        """Keep a copy of ``raw`` (read-only) under ``key``, within ``limit`` bytes. The
        memory of an entry it evicts is reused when it has the same size (a fresh large
        allocation costs page faults at ~1 GB/s; a copy into used memory runs ~5 GB/s)."""
        src = np.frombuffer(raw, dtype=np.uint8)
        size = src.nbytes
        if size > limit:
            return
        spare: np.ndarray | None = None
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return
            while self._items and self.nbytes + size > limit:
                _, old = self._items.popitem(last=False)
                self.nbytes -= old.nbytes
                # reused only when nobody holds it: a writer may be diffing with it right
                # now (this frame's ``old`` and getrefcount's argument are the 2 references)
                if (
                    spare is None
                    and old.nbytes == size
                    and old.base is None
                    and sys.getrefcount(old) <= 2
                ):
                    spare = old
                del old
            self.nbytes += size  # reserved now, filled below
        if spare is not None:
            spare.flags.writeable = True
            spare[:] = src
            copy = spare
        else:
            copy = src.copy()
        copy.flags.writeable = False
        with self._lock:
            if key in self._items:
                self.nbytes -= size
                return
            self._items[key] = copy

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


SIZES_MAX = 1 << 18
"""Entries a :class:`SizeHistory` keeps (~225 bytes each: at most ~60 MB)."""


class SizeHistory:
    """Chunk key → (the standalone encoded size of its rows, measured or carried forward;
    how many saves in a row a delta of those rows lost): what the next delta save of the
    same rows needs to decide without encoding the chunk twice. Least recently written
    first out, at most ``max_entries``; thread-safe."""

    def __init__(self, max_entries: int = SIZES_MAX) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[int, int] | None:
        with self._lock:
            return self._items.get(key)

    def remember(self, key: bytes, standalone: int, lost: int) -> None:
        with self._lock:
            self._items[key] = (standalone, lost)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class DeltaChoice(NamedTuple):
    """How one chunk is stored: under ``key`` with base chain ``chain`` (empty:
    standalone), its payload ``encoded`` (None: the parent's own delta chunk, unchanged,
    nothing to write); ``saved``: the bytes a new delta chunk saves against the standalone
    encoding (None when it is not a new delta chunk)."""

    key: bytes
    chain: tuple[bytes, ...]
    encoded: Buffer | None
    saved: int | None = None


class DeltaState:
    """What one process remembers between delta saves, and the choice made with it.

    Holds :attr:`bases` (:class:`RawCache`, bounded by ``Settings.delta_cache_bytes``),
    :attr:`sizes` (:class:`SizeHistory`, bounded by :data:`SIZES_MAX` entries) and the
    :attr:`rules` it applies. Its owner is the process: :data:`PROCESS_DELTA_STATE` is
    created at import and lives until the process ends, shared by every save (and every
    rank's writer) in it, so that save N+1 finds what save N wrote; a
    :class:`~ckptstore.store.blobs.BlobWriter` borrows it for one save (or is handed its
    own, e.g. a test's). Nothing in it is persisted and another process never sees it: a
    new process starts cold. Tests reset it with :meth:`clear` (both parts), or
    ``bases.clear()`` to read bases back from the store as a new process would.
    """

    def __init__(self, rules: DeltaRules = RULES, *, max_sizes: int = SIZES_MAX) -> None:
        self.bases = RawCache()
        self.sizes = SizeHistory(max_sizes)
        self.rules = rules

    def clear(self) -> None:
        """Forget everything: the state of a process that has saved nothing yet."""
        self.bases.clear()
        self.sizes.clear()

    def choose(
        self,
        piece: memoryview,
        pipeline: Pipeline,
        tail: Pipeline,
        key: bytes,
        parent: Parent,
        *,
        delta_chain: int,
        cache_bytes: int,
        read_base: ReadBase,
    ) -> DeltaChoice | None:
        """How to store ``piece`` (standalone key ``key``, lossless ``pipeline`` whose
        encoding stage is ``tail``) given the parent chunk ``parent`` of the same rows: as
        a delta against it when that is smaller than the standalone chunk; as the parent's
        own delta chunk when ``piece`` is its content unchanged; standalone, already
        encoded, when the delta lost (or is skipped); None to store it standalone the usual
        way (chain full, or base unreadable or of another size)."""
        rules = self.rules
        base_key, base_chain, base_stored = parent
        if base_chain and delta_key(pipeline, base_chain[0], piece) == base_key:
            return DeltaChoice(base_key, base_chain, None)
        if len(base_chain) + 1 > delta_chain:
            return None  # a standalone chunk every delta_chain + 1 links
        known = self.sizes.get(base_key)
        if known is None and not base_chain:
            # not seen by this process (the first delta save after a standalone one, or
            # after a restart): the parent's chunk of these rows is standalone, and its
            # size is what this one would take standalone within a few percent
            known = (base_stored, 0)
        if known is not None and known[1] % rules.retry_lost:  # lost last time: skip
            whole = tail.encode(piece)
            self.sizes.remember(key, byte_view(whole).nbytes, known[1] + 1)
            return DeltaChoice(key, (), whole)
        base_raw = self.bases.get(base_key)
        if base_raw is None:
            try:
                base_raw = np.frombuffer(
                    read_base(base_key, base_chain, pipeline, len(piece)), dtype=np.uint8
                )
            except CkptStoreError as exc:
                log.warning("delta base %s unreadable, chunk stored whole: %s", base_key.hex(), exc)
                return None
            self.bases.put(base_key, base_raw, cache_bytes)
        if base_raw.nbytes != len(piece):
            return None
        as_delta = encode_delta(tail, piece, base_raw)
        n_delta = byte_view(as_delta).nbytes
        if known is not None and n_delta < rules.sure_win * known[0]:
            # clearly smaller than these rows were standalone last save: taken without
            # encoding the chunk whole too
            standalone, whole = known[0], None
        else:
            whole = tail.encode(piece)
            standalone = byte_view(whole).nbytes
        if whole is not None and n_delta >= standalone:
            # lost by a wide margin, or again at its retry: skip the next 3 tries; a first
            # near miss: skip the next one
            again = known is not None and known[1] > 0
            wide = again or n_delta > 1.1 * standalone
            self.sizes.remember(key, standalone, 1 if wide else rules.retry_lost - 1)
            return DeltaChoice(key, (), whole)
        dkey = delta_key(pipeline, base_key, piece)
        self.sizes.remember(dkey, standalone, 0)
        return DeltaChoice(dkey, (base_key, *base_chain), bytes(as_delta), standalone - n_delta)


PROCESS_DELTA_STATE = DeltaState()
"""This process's delta state: the one every :class:`~ckptstore.store.blobs.BlobWriter`
uses unless handed another (see :class:`DeltaState`)."""
