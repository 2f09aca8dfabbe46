"""Encode buffers into chunk objects (with dedup) and read row ranges back.

Writers hash, encode and upload chunks on a thread pool (xxhash, zstd and numpy release the
GIL); a chunk of the parent checkpoint's (the index the coordinator hands each rank), or
one already written by this save, is not uploaded again — any other chunk is put, and counts
as new only if no object had its key (docs/format.md). Readers fetch only the chunks that
overlap the rows asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np

from ckptstore.backend.base import Cancel, again, cancel_scope
from ckptstore.codecs.base import Buffer, byte_view
from ckptstore.codecs.pipeline import Pipeline
from ckptstore.codecs.quantize import QuantStats
from ckptstore.errors import (
    BackendError,
    ChunkNotFoundError,
    CkptStoreError,
    CorruptChunkError,
    ObjectNotFoundError,
    UnknownCodecError,
)
from ckptstore.store import layout
from ckptstore.store.chunks import content_key, frame, frame_parts, row_ranges, unframe
from ckptstore.store.delta import apply_delta
from ckptstore.store.delta_choice import PROCESS_DELTA_STATE, DeltaBases, DeltaState, Parent
from ckptstore.store.manifest import Blob, ChunkRef
from ckptstore.store.repository import Repository


class ChunkIndex:
    """Which chunks one rank's writer may name without writing them.

    - chunks of the parent it was handed: a committed manifest names them, and the save
      lease (taken before the parent was read) keeps gc from deleting them (the dropped
      parent's manifest waits in ``trash/``);
    - chunks this writer wrote.

    Any other chunk is put again, whether it exists or not (docs/format.md rule 7): only a
    put made under this save's lease gives the object a modification time that every gc
    honours while the save runs — an object found in storage and merely reused could be
    garbage that a gc starting after the commit check deletes. The put also heals an object
    someone damaged. Whether the object existed (written vs. reused, for the figures) comes
    from the put itself (:meth:`Backend.put_fresh`: on S3 a create-only PUT, and a plain one
    only where the key was taken). Cost: one put per chunk the parent does not have —
    proportional to what changed, never to the number of checkpoints in the store.
    """

    def __init__(self, repo: Repository, known: Mapping[bytes, int] | None = None) -> None:
        self.repo = repo
        self._known: dict[bytes, int] = dict(known or {})
        self._lock = threading.Lock()

    def get(self, key: bytes) -> int | None:
        """Stored size of a chunk this save may name without a put, or None."""
        with self._lock:
            return self._known.get(key)

    def add(self, key: bytes, stored: int) -> None:
        with self._lock:
            self._known[key] = stored


class BlobWriter:
    """Turns buffers into :class:`Blob` records, writing new chunks to the store.

    One writer serves one save on one rank. ``index`` says which chunks exist already
    (:class:`ChunkIndex`); chunks written by this writer join it as they complete.
    ``delta_state`` decides the delta chunks of a delta save and remembers what the next
    save needs (store/delta_choice.py); default: the process's own.
    """

    def __init__(
        self,
        repo: Repository,
        index: ChunkIndex,
        *,
        chunk_bytes: int | None = None,
        inline_bytes: int | None = None,
        threads: int | None = None,
        delta_state: DeltaState | None = None,
    ) -> None:
        self.repo = repo
        self.delta_state = PROCESS_DELTA_STATE if delta_state is None else delta_state
        settings = repo.settings.replace(
            chunk_bytes=chunk_bytes, inline_bytes=inline_bytes, threads=threads
        )
        self.delta_chain = settings.delta_chain
        self.cache_bytes = settings.delta_cache_bytes
        self.delta_chunks = 0
        self.delta_bytes_saved = 0
        self._reader: BlobReader | None = None
        self.chunk_bytes = settings.chunk_bytes
        self.inline_bytes = settings.inline_bytes
        self.threads = settings.threads
        self.index = index
        self._pending: dict[bytes, Future[int]] = {}
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ckptstore-enc")
        self.chunks_written = 0
        self._uploads: set[Future[bool]] = set()
        self.cancel = Cancel()
        """Set with the first chunk that fails for good: no chunk is encoded or sent after
        it, and no request of the save is tried again (see :class:`Cancel`)."""

    def close(self) -> None:
        """Wait for every encode and upload this writer started."""
        self.pool.shutdown(wait=True)
        with self._lock:
            uploads = list(self._uploads)
        wait(uploads)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        raw: Buffer,
        pipeline: Pipeline,
        *,
        rows: int,
        first_row: int = 0,
        keep_alive: object = None,
        bases: DeltaBases | None = None,
    ) -> Future[Blob]:
        """Start encoding ``raw`` (``rows`` equal rows) into a Blob; returns its future.

        ``raw`` must stay valid until the future completes (``keep_alive`` is held for
        that). ``first_row`` is the global index of row 0, to align chunk boundaries.
        ``bases`` (a lossless ``pipeline`` only): store each chunk as a delta against the
        parent chunk of the same global rows when that is smaller (None: no delta).
        """
        view = byte_view(raw)
        del raw  # only ``view`` (and keep_alive) may hold the buffer from here on
        nbytes = len(view)
        if nbytes <= self.inline_bytes:
            lossy, tail = pipeline.split()
            stats = None
            if lossy is None:
                payload = pipeline.encode(view)
            else:
                body, stats = lossy.quantize(view)
                payload = tail.encode(body)
            done: Future[Blob] = Future()
            done.set_result(
                Blob(pipeline.config, nbytes, rows, inline=frame(payload), qstats=stats)
            )
            return done
        row_bytes = nbytes // rows if rows else nbytes
        ranges = row_ranges(rows, row_bytes, self.chunk_bytes, first_row)
        delta = bases is not None and pipeline.lossless
        futures = [
            self._start_chunk(
                view[a * row_bytes : b * row_bytes],
                pipeline,
                a,
                b,
                delta=(bases.get((first_row + a, first_row + b)) if bases else None)
                if delta
                else False,
            )
            for a, b in ranges
        ]
        return self._gather(futures, pipeline, nbytes, rows, held=[keep_alive, view])

    def submit_quantized(
        self,
        quantize_rows: Callable[[int, int], tuple[bytes, QuantStats]],
        pipeline: Pipeline,
        *,
        nbytes: int,
        rows: int,
        first_row: int = 0,
    ) -> Future[Blob]:
        """Like :meth:`submit` for a lossy ``pipeline`` whose first stage the caller runs
        itself, chunk by chunk — on the GPU, before the copy to host: ``quantize_rows(a, b)``
        returns that stage's output (and error) for rows [a, b). It is called here, on the
        caller's thread, with the same chunk boundaries :meth:`submit` would cut."""
        lossy, tail = pipeline.split()
        if lossy is None:
            raise ValueError("submit_quantized needs a pipeline with a lossy first stage")
        if nbytes <= self.inline_bytes:
            body, stats = quantize_rows(0, rows)
            done: Future[Blob] = Future()
            blob = Blob(pipeline.config, nbytes, rows, inline=frame(tail.encode(body)))
            blob.qstats = stats
            done.set_result(blob)
            return done
        row_bytes = nbytes // rows if rows else nbytes
        futures = [
            self._start_chunk(memoryview(b""), pipeline, a, b, pre=quantize_rows(a, b))
            for a, b in row_ranges(rows, row_bytes, self.chunk_bytes, first_row)
        ]
        return self._gather(futures, pipeline, nbytes, rows, held=[])

    def _gather(
        self,
        futures: list[Future[ChunkRef]],
        pipeline: Pipeline,
        nbytes: int,
        rows: int,
        held: list[object],
    ) -> Future[Blob]:
        """One Blob future from its chunks' futures; ``held`` is released when done."""
        result: Future[Blob] = Future()
        remaining = [len(futures)]
        lock = threading.Lock()

        def on_done(_: Future[ChunkRef]) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            held.clear()  # no reference cycle keeps a staged host copy alive after this
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                result.set_exception(errors[0])
            else:
                chunks = [f.result() for f in futures]
                blob = Blob(pipeline.config, nbytes, rows, chunks=chunks)
                blob.qstats = _sum_stats(c.stats for c in chunks)
                result.set_result(blob)
            futures.clear()

        for f in futures:
            f.add_done_callback(on_done)
        return result

    def _start_chunk(
        self,
        piece: memoryview,
        pipeline: Pipeline,
        start: int,
        stop: int,
        pre: tuple[bytes, QuantStats] | None = None,
        delta: Parent | None | bool = False,
    ) -> Future[ChunkRef]:
        """Hash and encode ``piece`` on the pool; its future completes once the chunk is
        stored (the upload runs on the backend's I/O pool, so encoders move on).
        ``delta``: False (no delta), None (delta save, no base for these rows) or the
        parent chunk to try as base."""
        out: Future[ChunkRef] = Future()

        def run() -> None:
            try:
                self.cancel.check()  # queued behind a chunk that failed: not even encoded
                self._write_chunk(piece, pipeline, start, stop, out, pre, delta)
            except BaseException as exc:
                if not out.done():
                    out.set_exception(self._first(exc))

        self.pool.submit(run)
        return out

    def _write_chunk(
        self,
        piece: memoryview,
        pipeline: Pipeline,
        start: int,
        stop: int,
        out: Future[ChunkRef],
        pre: tuple[bytes, QuantStats] | None = None,
        delta: Parent | None | bool = False,
    ) -> None:
        lossy, tail = pipeline.split()
        encoded: Buffer | None = None
        chain: tuple[bytes, ...] = ()
        if lossy is None:
            body, stats, key = piece, None, content_key(pipeline, piece)
            if delta is not False:
                if self.index.get(key) is None and delta is not None:
                    found = self.delta_state.choose(
                        piece,
                        pipeline,
                        tail,
                        key,
                        delta,
                        delta_chain=self.delta_chain,
                        cache_bytes=self.cache_bytes,
                        read_base=self._read_base,
                    )
                    if found is not None:
                        key, chain, encoded, saved = found
                        if saved is not None:
                            with self._lock:
                                self.delta_chunks += 1
                                self.delta_bytes_saved += saved
                        if encoded is None:  # unchanged: the parent's own delta chunk
                            self.delta_state.bases.put(key, piece, self.cache_bytes)
                            size = delta[2]
                            out.set_result(ChunkRef(key, start, stop, size, False, base=chain))
                            return
                self.delta_state.bases.put(key, piece, self.cache_bytes)
        else:  # the key hashes what the lossy stage produced: equal input → equal output
            body, stats = pre if pre is not None else lossy.quantize(piece)
            key = content_key(pipeline, body)
        with self._lock:
            size = self.index.get(key)
            if size is not None:
                out.set_result(ChunkRef(key, start, stop, size, new=False, stats=stats, base=chain))
                return
            pending = self._pending.get(key)
            if pending is None:
                mine: Future[int] = Future()
                self._pending[key] = mine
        if pending is not None:  # the same bytes are being written by another thread now

            def shared(f: Future[int]) -> None:
                exc = f.exception()
                if exc is not None:
                    out.set_exception(exc)
                else:
                    out.set_result(ChunkRef(key, start, stop, f.result(), False, stats, base=chain))

            pending.add_done_callback(shared)
            return

        def failed(exc: BaseException) -> None:
            exc = self._first(exc)
            with self._lock:
                self._pending.pop(key, None)
            mine.set_exception(exc)
            out.set_exception(exc)

        try:
            stored = frame(encoded) if encoded is not None else frame_parts(tail.encode_parts(body))
            # put even when it exists: under the lease, so gc keeps it (ChunkIndex)
            upload = self.repo.backend.put_fresh_async(
                layout.chunk_key(key.hex()), stored, cancel=self.cancel
            )
        except BaseException as exc:
            failed(exc)
            raise
        with self._lock:
            self._uploads.add(upload)

        def uploaded(f: Future[bool]) -> None:
            with self._lock:
                self._uploads.discard(f)
            exc = f.exception()
            if exc is not None:
                failed(exc)
                return
            created = f.result()
            self.index.add(key, len(stored))
            with self._lock:
                self._pending.pop(key, None)
                self.chunks_written += 1
            mine.set_result(len(stored))
            out.set_result(
                ChunkRef(key, start, stop, len(stored), new=created, stats=stats, base=chain)
            )

        upload.add_done_callback(uploaded)

    def _first(self, exc: BaseException) -> BaseException:
        """What a failed chunk reports: ``exc`` if it is the save's first failure (which
        then stops the rest), else a copy of that first one — so whichever chunk the caller
        looks at first names the object that failed, not one stopped after it."""
        self.cancel.set(exc)
        first = self.cancel.error
        return exc if first is exc or first is None else again(first)

    def _read_base(
        self, key: bytes, chain: tuple[bytes, ...], pipeline: Pipeline, nbytes: int
    ) -> np.ndarray:
        """Raw bytes of delta base ``key`` (chain ``chain``) read back from the store."""
        with self._lock:
            if self._reader is None:
                self._reader = BlobReader(self.repo, threads=1)
            reader = self._reader
        return reader.decode_chain(key, chain, pipeline, nbytes, "a delta base")


def _sum_stats(parts: Iterable[QuantStats | None]) -> QuantStats | None:
    total: QuantStats | None = None
    for part in parts:
        if part is not None:
            if total is None:
                total = QuantStats()
            total.add(part)
    return total


class BlobReader:
    """Reads rows of blobs back, checking every chunk's checksum."""

    def __init__(self, repo: Repository, *, threads: int | None = None) -> None:
        self.repo = repo
        self.threads = repo.settings.threads if threads is None else threads
        self.bytes_fetched = 0
        self.objects_fetched = 0
        self._lock = threading.Lock()
        self.cancel = Cancel()
        """Set with the first read that fails for good on a storage error (a dead server,
        refused credentials): no chunk read of this reader starts after it, and none is
        tried again. A missing or damaged chunk does not set it (``verify`` reads on)."""

    def fetch_chunk(self, ref: ChunkRef, pipeline: Pipeline, row_bytes: int, where: str) -> Buffer:
        """Fetch, check and decode one chunk; returns its raw bytes."""
        return self.fetch_chunk_parts(ref, pipeline, row_bytes, where)[1]

    def fetch_chunk_parts(
        self, ref: ChunkRef, pipeline: Pipeline, row_bytes: int, where: str
    ) -> tuple[Buffer, Buffer]:
        """Fetch and check one chunk; returns (what its key hashes, its raw bytes): the
        lossy stage's output and its decoding, or the raw bytes twice when lossless (a
        delta chunk is decoded through its chain)."""
        expected = (ref.row_stop - ref.row_start) * row_bytes
        if ref.base:
            raw = self.decode_chain(ref.key, ref.base, pipeline, expected, where)
            return raw, raw
        payload, loc = self._fetch(ref.key, where)
        body, raw = self._decode(payload, pipeline, expected, loc)
        if content_key(pipeline, body) != ref.key:  # e.g. two chunk objects swapped
            raise CorruptChunkError(
                f"chunk {loc} does not hold the content its key names (overwritten or "
                "swapped with another object)"
            )
        return body, raw

    def fetch_chunk_into(
        self, ref: ChunkRef, pipeline: Pipeline, row_bytes: int, where: str, out: np.ndarray
    ) -> None:
        """Fetch, check and decode one chunk straight into ``out`` — a writable C-contiguous
        uint8 array of exactly the chunk's raw size, e.g. the destination tensor's memory —
        with no raw-sized intermediate copy for the default lossless chains. The checksum and
        the key are checked as :meth:`fetch_chunk_parts` does (the key against the bytes in
        ``out``); on any error ``out`` may hold anything."""
        expected = (ref.row_stop - ref.row_start) * row_bytes
        if out.size != expected:
            raise ValueError(f"chunk of {expected} raw bytes into a buffer of {out.size}")
        if ref.base:
            self.decode_chain(ref.key, ref.base, pipeline, expected, where, out=out)
            return
        payload, loc = self._fetch(ref.key, where)
        body = self._decode_into(payload, pipeline, out, loc)
        if content_key(pipeline, body) != ref.key:  # e.g. two chunk objects swapped
            raise CorruptChunkError(
                f"chunk {loc} does not hold the content its key names (overwritten or "
                "swapped with another object)"
            )

    @staticmethod
    def _decode_into(payload: memoryview, pipeline: Pipeline, out: np.ndarray, loc: str) -> Buffer:
        try:  # bounded by out.size, as _decode
            return pipeline.decode_into(payload, out)
        except (CkptStoreError, ValueError, TypeError) as exc:
            raise CorruptChunkError(f"chunk {loc} cannot be decoded: {exc}") from exc

    def _fetch(self, key: bytes, where: str) -> tuple[memoryview, str]:
        """The checked payload of chunk object ``key`` and its name for messages."""
        name = layout.chunk_key(key.hex())
        self.cancel.check()
        try:
            with cancel_scope(self.cancel):
                stored = self.repo.backend.get(name)
        except ObjectNotFoundError:
            raise ChunkNotFoundError(
                f"chunk {self.repo.backend.describe(name)} of {where} is missing"
            ) from None
        except BackendError as exc:
            if not self.cancel.set(exc) and self.cancel.error is not exc:
                raise again(self.cancel.error) from exc  # the read that failed first
            raise
        with self._lock:
            self.bytes_fetched += len(stored)
            self.objects_fetched += 1
        loc = f"{self.repo.backend.describe(name)} of {where}"
        return unframe(stored, loc), loc

    @staticmethod
    def _decode(
        payload: memoryview, pipeline: Pipeline, expected: int, loc: str
    ) -> tuple[Buffer, Buffer]:
        try:  # never allocates more than the declared raw size (a zstd bomb is refused)
            body, raw = pipeline.decode_parts(payload, expected_size=expected)
        except (CkptStoreError, ValueError, TypeError) as exc:
            raise CorruptChunkError(f"chunk {loc} cannot be decoded: {exc}") from exc
        if byte_view(raw).nbytes != expected:
            raise CorruptChunkError(
                f"chunk {loc} decoded to {byte_view(raw).nbytes} bytes, expected {expected}"
            )
        return body, raw

    def decode_chain(
        self,
        key: bytes,
        chain: tuple[bytes, ...],
        pipeline: Pipeline,
        expected: int,
        where: str,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Raw bytes of chunk ``key`` whose delta chain is ``chain`` ([direct base, …,
        root]; empty for a standalone chunk), all under the lossless ``pipeline``: the root
        is decoded, then each delta applied to it in turn (store/delta.py) — two chunk-sized
        buffers — and every level's key checked against the bytes rebuilt so far. A base that
        is missing or damaged is a CorruptChunkError naming the chunk's key and the base's.

        ``out`` (a writable C-contiguous uint8 array of ``expected`` bytes): rebuild there
        (the root decoded straight into it, each delta applied in place) and return it;
        without it, a new array."""
        levels = [key, *chain]
        root = levels[-1]
        acc: np.ndarray | None = None
        for i in range(len(levels) - 1, -1, -1):
            k = levels[i]
            what = where if i == 0 else f"delta base {k.hex()} of chunk {key.hex()} of {where}"
            try:
                payload, loc = self._fetch(k, what)
                if acc is None:
                    acc = np.empty(expected, dtype=np.uint8) if out is None else out
                    self._decode_into(payload, pipeline, acc, loc)
                    ok = content_key(pipeline, acc) == root
                else:
                    try:  # bounded by acc.size, as _decode
                        ok = apply_delta(pipeline, payload, acc, levels[i + 1]) == k
                    except (CkptStoreError, ValueError, TypeError) as exc:
                        raise CorruptChunkError(f"chunk {loc} cannot be decoded: {exc}") from exc
                del payload
                if not ok:
                    raise CorruptChunkError(
                        f"chunk {loc} does not hold the content its key names (overwritten, "
                        "swapped with another object, or a base of its chain is wrong)"
                    )
            except (ChunkNotFoundError, CorruptChunkError) as exc:
                if i == 0 and not chain:
                    raise
                if i == 0:
                    if isinstance(exc, ChunkNotFoundError):
                        raise
                    raise CorruptChunkError(
                        f"delta chunk {key.hex()} of {where} (base {levels[1].hex()}): {exc}"
                    ) from exc
                state = "missing" if isinstance(exc, ChunkNotFoundError) else "corrupt"
                raise CorruptChunkError(
                    f"delta chunk {key.hex()} of {where} cannot be rebuilt: its base "
                    f"{k.hex()} is {state}: {exc}"
                ) from exc
        assert acc is not None
        return acc

    def read_rows(
        self,
        blob: Blob,
        row_start: int,
        row_stop: int,
        where: str,
        pool: ThreadPoolExecutor | None = None,
    ) -> np.ndarray:
        """Raw bytes of rows [row_start, row_stop) of ``blob`` as a uint8 array."""
        try:
            pipeline = Pipeline.from_config(blob.codec)
        except UnknownCodecError as exc:  # (a validated manifest has none: defence in depth)
            raise UnknownCodecError(f"{where}: {exc}") from None
        row_bytes = blob.nbytes // blob.rows if blob.rows else blob.nbytes
        if blob.inline is not None:
            loc = f"inline data of {where}"
            try:
                decoded = pipeline.decode(unframe(blob.inline, loc), expected_size=blob.nbytes)
            except (CkptStoreError, ValueError, TypeError) as exc:
                raise CorruptChunkError(f"{loc} cannot be decoded: {exc}") from exc
            raw = np.frombuffer(decoded, dtype=np.uint8)
            if raw.size != blob.nbytes:
                raise CorruptChunkError(
                    f"{loc} decoded to {raw.size} bytes, expected {blob.nbytes}"
                )
            return raw[row_start * row_bytes : row_stop * row_bytes]
        out = np.empty((row_stop - row_start) * row_bytes, dtype=np.uint8)
        wanted = [c for c in blob.chunks if c.row_start < row_stop and c.row_stop > row_start]

        def one(ref: ChunkRef) -> None:
            a, b = max(ref.row_start, row_start), min(ref.row_stop, row_stop)
            dst = out[(a - row_start) * row_bytes : (b - row_start) * row_bytes]
            if (a, b) == (ref.row_start, ref.row_stop):  # the whole chunk: decoded in place
                self.fetch_chunk_into(ref, pipeline, row_bytes, where, dst)
                return
            raw = np.frombuffer(self.fetch_chunk(ref, pipeline, row_bytes, where), dtype=np.uint8)
            dst[:] = raw[(a - ref.row_start) * row_bytes : (b - ref.row_start) * row_bytes]

        _run_all(one, wanted, pool)
        return out


def _run_all(
    fn: Callable[[ChunkRef], None], items: list[ChunkRef], pool: ThreadPoolExecutor | None
) -> None:
    if pool is None or len(items) <= 1:
        for it in items:
            fn(it)
        return
    for f in [pool.submit(fn, it) for it in items]:
        f.result()
