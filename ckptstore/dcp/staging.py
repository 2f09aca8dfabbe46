"""Host staging of GPU tensors: a bounded pool of pinned buffers, copies on a side stream,
and the snapshot ``async_save`` takes (docs/gpu.md).

- **Save** (:class:`DeviceToHost`): a GPU tensor is copied to the host chunk by chunk, each
  chunk into a buffer of the process-wide :class:`PinnedPool` (``Settings.pin_bytes``), on a
  side stream that first waits for the caller's stream; each copy records an event. A
  buffer is handed to the encoder (``BlobWriter.submit``) only once its event completed,
  and goes back to the pool when its chunk is stored; the copies of later chunks run while
  earlier ones are hashed, encoded and uploaded. No host memory is allocated per chunk.
- **async_save** (:class:`Snapshot`, a DCP ``AsyncStager``): GPU tensors are copied into a
  pinned arena (reused by the next async save) and the call returns when those copies are
  done — or, with ``Settings.device_snapshot``, cloned on the device, so the call returns at
  once and the background save copies the clones through the pool. Everything else is
  staged as DCP's default stager does.
- **Load** (``Reader``): a chunk bound for a GPU tensor is decoded into a pool buffer and
  copied to its destination rows from there.

Every device operation goes through :class:`DeviceOps`; :func:`ops_for` picks
:class:`CudaOps` for CUDA tensors and None (the plain host path, unchanged) for CPU ones.
Tests replace it with fakes whose copies complete only when their event is waited for
(tests/test_staging.py), which is how the ordering is checked without a GPU.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager

from ckptstore.codecs.pipeline import Pipeline
from ckptstore.codecs.quantize import QuantStats
from ckptstore.knobs import Settings
from ckptstore.nested import leaves
from ckptstore.store.blobs import BlobWriter
from ckptstore.store.chunks import row_ranges
from ckptstore.store.manifest import Blob


# -- the device runtime ---------------------------------------------------------------------
class DeviceOps:
    """What staging needs of a device runtime. Copies are asynchronous: each returns an
    event, and the bytes may be read (or the source changed) only after :meth:`wait`."""

    key: Hashable = None
    """Identity of the device: one pinned pool per key."""

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A new page-locked host buffer of ``nbytes`` (uint8)."""
        raise NotImplementedError

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        """Start copying device bytes ``src`` into host bytes ``dst``, ordered after the
        work already queued on the caller's current stream; returns an event."""
        raise NotImplementedError

    def to_device(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        """Start copying host bytes ``src`` into device bytes ``dst``; returns an event."""
        raise NotImplementedError

    def order_after_producer(self) -> None:
        """Later copies run after the work queued so far on the caller's current stream."""
        raise NotImplementedError

    def wait(self, event: Any) -> None:
        """Block until the copy that returned ``event`` is complete."""
        raise NotImplementedError

    def snapshot(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` on its device, taken in stream order: the caller's later work
        on ``t`` cannot change it, and the host does not wait for it."""
        raise NotImplementedError


_STREAMS: dict[int, Any] = {}
_STREAMS_LOCK = threading.Lock()


class CudaOps(DeviceOps):
    """:class:`DeviceOps` on one CUDA device, with one side stream per device."""

    def __init__(self, device: torch.device) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.key = ("cuda", index)
        with _STREAMS_LOCK:
            stream = _STREAMS.get(index)
            if stream is None:
                stream = _STREAMS[index] = torch.cuda.Stream(device=self.device)
        self.stream = stream

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def order_after_producer(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        self.order_after_producer()
        return self._copy(dst, src)

    def to_device(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        return self._copy(dst, src)

    def wait(self, event: Any) -> None:
        event.synchronize()

    def snapshot(self, t: torch.Tensor) -> torch.Tensor:
        self.order_after_producer()
        with torch.cuda.stream(self.stream):
            # contiguous, so the background save copies it as is, on this same stream
            src = t.detach().resolve_conj().resolve_neg()
            copy = src.clone(memory_format=torch.contiguous_format)
        # the caller's stream (training) waits for the clone on the GPU; the host does not
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return copy


_OPS: dict[Any, CudaOps] = {}


def ops_for(tensor: torch.Tensor) -> DeviceOps | None:
    """The device runtime of ``tensor``; None for host tensors (their path is unchanged)."""
    if tensor.device.type != "cuda":
        return None
    ops = _OPS.get(tensor.device)
    if ops is None:
        ops = _OPS[tensor.device] = CudaOps(tensor.device)
    return ops


# -- the pinned pool --------------------------------------------------------------------------
class PinnedPool:
    """At most ``count`` host buffers of ``buffer_bytes`` each, allocated on first use and
    reused: :meth:`acquire` blocks while all are taken."""

    def __init__(self, buffer_bytes: int, count: int, alloc: Callable[[int], torch.Tensor]) -> None:
        if count < 1 or buffer_bytes < 1:
            raise ValueError("a pinned pool needs at least one buffer of at least one byte")
        self.buffer_bytes = buffer_bytes
        self.count = count
        self._alloc = alloc
        self._free: list[torch.Tensor] = []
        self._cond = threading.Condition()
        self.allocated = 0
        """Buffers allocated so far (never more than ``count``)."""
        self.in_use = 0
        self.peak_in_use = 0

    def available(self) -> bool:
        """Whether :meth:`acquire` would return without waiting."""
        with self._cond:
            return bool(self._free) or self.allocated < self.count

    def acquire(self) -> torch.Tensor:
        with self._cond:
            while not self._free and self.allocated >= self.count:
                self._cond.wait()
            buf = self._free.pop() if self._free else None
            if buf is None:
                self.allocated += 1
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        if buf is None:
            try:
                buf = self._alloc(self.buffer_bytes)
            except BaseException:
                with self._cond:
                    self.allocated -= 1
                    self.in_use -= 1
                    self._cond.notify()
                raise
        return buf

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buf)
            self.in_use -= 1
            self._cond.notify()

    def clear(self) -> None:
        """Free the buffers not in use (those in use are freed when released after)."""
        with self._cond:
            self.allocated -= len(self._free)
            self._free.clear()


_POOLS: dict[Hashable, PinnedPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_size(settings: Settings) -> tuple[int, int]:
    """(bytes per buffer, buffers) of the pinned pool under ``settings``: a buffer holds a
    chunk and a small tail merged into it (:func:`segments`); (0, 0) when ``pin_bytes`` is
    less than one buffer (staging through pinned memory off)."""
    buffer_bytes = settings.chunk_bytes + settings.inline_bytes
    return buffer_bytes, settings.pin_bytes // buffer_bytes


def pool_for(ops: DeviceOps, settings: Settings) -> PinnedPool | None:
    """The process-wide pool of ``ops``'s device under ``settings`` (one per device: new
    settings replace it, buffers in use stay valid until released); None when off."""
    buffer_bytes, count = pool_size(settings)
    if count < 1:
        return None
    with _POOLS_LOCK:
        pool = _POOLS.get(ops.key)
        if pool is None or (pool.buffer_bytes, pool.count) != (buffer_bytes, count):
            if pool is not None:
                pool.clear()
            pool = _POOLS[ops.key] = PinnedPool(buffer_bytes, count, ops.host_buffer)
        return pool


def release_pinned() -> None:
    """Free the pinned memory ckptstore keeps for reuse (pools and async arenas) that no
    save or load is using now."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.clear()
        _POOLS.clear()
    with _ARENAS_LOCK:
        _ARENAS.clear()


# -- save: device to host, chunk by chunk -----------------------------------------------------
def segments(
    rows: int, row_bytes: int, chunk_bytes: int, inline_bytes: int, first_row: int, limit: int
) -> list[tuple[int, int]] | None:
    """The row ranges a tensor is staged in: the chunks ``BlobWriter`` cuts (same global
    grid), a chunk of at most ``inline_bytes`` merged into its neighbour (a piece that
    small would be stored inline, not as a chunk). None when a range exceeds ``limit``
    bytes (rows larger than a pool buffer)."""
    out: list[tuple[int, int]] = []
    for a, b in row_ranges(rows, row_bytes, chunk_bytes, first_row):
        if out and (
            (b - a) * row_bytes <= inline_bytes
            or (out[-1][1] - out[-1][0]) * row_bytes <= inline_bytes
        ):
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    if any((b - a) * row_bytes > limit for a, b in out):
        return None
    return out


class _Gather:
    """One tensor's Blob from its staged segments' Blobs (rows shifted into place)."""

    def __init__(self, parts: int, pipeline: Pipeline, nbytes: int, rows: int) -> None:
        self.future: Future[Blob] = Future()
        self._parts: list[tuple[int, Blob] | None] = [None] * parts
        self._left = parts
        self._lock = threading.Lock()
        self._done = False
        self._pipeline, self._nbytes, self._rows = pipeline, nbytes, rows

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self.future.set_exception(exc)

    def part(self, index: int, first: int, done: Future[Blob]) -> None:
        exc = done.exception()
        if exc is not None:
            self.fail(exc)
            return
        with self._lock:
            self._parts[index] = (first, done.result())
            self._left -= 1
            if self._left or self._done:
                return
            self._done = True
        try:  # (an error here must fail the future: a done-callback's would be lost)
            self.future.set_result(self._merge())
        except BaseException as exc:
            self.future.set_exception(exc)

    def _merge(self) -> Blob:
        chunks = []
        stats: QuantStats | None = None
        for entry in self._parts:
            assert entry is not None
            first_row, blob = entry
            if blob.inline is not None:
                raise RuntimeError("a staged segment was stored inline (smaller than expected)")
            chunks += [
                dataclasses.replace(
                    c, row_start=c.row_start + first_row, row_stop=c.row_stop + first_row
                )
                for c in blob.chunks
            ]
            if blob.qstats is not None:
                stats = stats or QuantStats()
                stats.add(blob.qstats)
        blob = Blob(self._pipeline.config, self._nbytes, self._rows, chunks=chunks)
        blob.qstats = stats
        return blob


@dataclass
class _Copy:
    """A segment whose copy to a pinned buffer was started and not yet handed over."""

    ops: DeviceOps
    event: Any
    buf: torch.Tensor
    nbytes: int
    source: torch.Tensor  # held until the copy is complete
    gather: _Gather
    index: int
    first: int
    stop: int
    submit: Callable[[Any, int, int], Future[Blob]]


class DeviceToHost:
    """Copies GPU tensors into a save through ``pool``: one per ``write_data``, driven by
    the thread calling it. :meth:`flush` hands over what is still in flight; :meth:`abort`
    (after an error) waits for the copies started and returns their buffers."""

    def __init__(self, writer: BlobWriter, pool: PinnedPool) -> None:
        self.writer = writer
        self.pool = pool
        self._inflight: deque[_Copy] = deque()
        self.segments = 0
        self.lookahead = max(2, writer.threads)
        """Copies started ahead of the one the encoders get next."""

    def add(
        self,
        tensor: torch.Tensor,
        ops: DeviceOps,
        pipeline: Pipeline,
        *,
        rows: int,
        first_row: int = 0,
        bases: Mapping[Any, Any] | None = None,
    ) -> Future[Blob] | None:
        """Stage ``tensor`` (on ``ops``'s device) and encode it; its Blob's future. None
        when it cannot go this way (small enough to be inline, or rows larger than a pool
        buffer): the caller then copies it whole, as for a host tensor."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes <= self.writer.inline_bytes or rows < 1:
            return None
        row_bytes = nbytes // rows
        cut = segments(
            rows,
            row_bytes,
            self.writer.chunk_bytes,
            self.writer.inline_bytes,
            first_row,
            self.pool.buffer_bytes,
        )
        if cut is None:
            return None
        t = tensor.detach().resolve_conj().resolve_neg()
        if not t.is_contiguous():
            t = t.contiguous()  # on the device: one temporary of the tensor's size
        flat = t.reshape(-1).view(torch.uint8)
        gather = _Gather(len(cut), pipeline, nbytes, rows)
        extra = {} if bases is None else {"bases": bases}

        def submit(view: Any, a: int, b: int) -> Future[Blob]:
            return self.writer.submit(view, pipeline, rows=b - a, first_row=first_row + a, **extra)

        for i, (a, b) in enumerate(cut):
            # hand the oldest copies over once ``lookahead`` are in flight (the encoders
            # stay fed), and before waiting for a buffer: never wait for one that only a
            # copy this thread has not handed over yet would free
            while self._inflight and (
                len(self._inflight) >= self.lookahead or not self.pool.available()
            ):
                self._hand_over()
            buf = self.pool.acquire()
            n = (b - a) * row_bytes
            src = flat[a * row_bytes : b * row_bytes]
            try:
                event = ops.to_host(buf[:n], src)
            except BaseException as exc:
                self.pool.release(buf)
                gather.fail(exc)
                raise
            self._inflight.append(_Copy(ops, event, buf, n, src, gather, i, a, b, submit))
            self.segments += 1
        return gather.future

    def _hand_over(self) -> None:
        c = self._inflight.popleft()
        try:
            c.ops.wait(c.event)  # the encoder must not read the buffer before this
            c.source = None  # type: ignore[assignment]
            fut = c.submit(c.buf[: c.nbytes].numpy(), c.first, c.stop)
        except BaseException as exc:
            self.pool.release(c.buf)
            c.gather.fail(exc)
            raise
        fut.add_done_callback(lambda _, buf=c.buf: self.pool.release(buf))
        fut.add_done_callback(lambda f, c=c: c.gather.part(c.index, c.first, f))

    def flush(self) -> None:
        """Hand every copy still in flight to the encoder (waiting for each)."""
        while self._inflight:
            self._hand_over()

    def abort(self, exc: BaseException | None = None) -> None:
        """After an error: wait for the copies started (the device may still be writing
        into their buffers), return the buffers, fail their tensors' futures."""
        while self._inflight:
            c = self._inflight.popleft()
            try:
                c.ops.wait(c.event)
            except BaseException:
                pass
            self.pool.release(c.buf)
            c.gather.fail(exc or RuntimeError("save aborted"))


# -- async_save: the snapshot -----------------------------------------------------------------
_ARENAS: list[torch.Tensor] = []
_ARENAS_LOCK = threading.Lock()
_ALIGN = 512
_ARENA_ROUND = 64 * 1024 * 1024


def _take_arena(nbytes: int, ops: DeviceOps) -> torch.Tensor:
    """A pinned arena of at least ``nbytes``: a free one if big enough (the smaller free
    ones are dropped, so at most one arena per async save in flight is kept)."""
    with _ARENAS_LOCK:
        for i, arena in enumerate(_ARENAS):
            if arena.numel() >= nbytes:
                return _ARENAS.pop(i)
        _ARENAS.clear()
    size = -(-nbytes // _ARENA_ROUND) * _ARENA_ROUND
    return ops.host_buffer(size)


def _give_arena(arena: torch.Tensor) -> None:
    with _ARENAS_LOCK:
        _ARENAS.append(arena)


def device_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in nested dicts/lists/tuples that :func:`ops_for` puts on a device (a
    DTensor's local shard for a DTensor)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    for _, x in leaves(obj, torch.Tensor):
        local = getattr(x, "_local_tensor", None)
        t = local if isinstance(local, torch.Tensor) else x
        if id(t) not in seen and ops_for(t) is not None:
            seen.add(id(t))
            found.append(t)
    return found


def _copy_rest(state_dict: Any, memo: dict[int, Any]) -> Any:
    """A copy of ``state_dict`` with the tensors in ``memo`` replaced by their staged
    copies, and the rest staged as DCP's default stager stages it (host copies)."""
    try:
        from torch.distributed.checkpoint._state_dict_stager import StateDictStager

        stager = StateDictStager(pin_memory=False, share_memory=False)
        copy = stager.deepcopy_with_tensor_offload
    except (ImportError, AttributeError):  # an older torch: plain host copies
        import copy as copy_module

        for t in _all_tensors(state_dict):
            if id(t) not in memo:
                memo[id(t)] = t.detach().to("cpu", copy=True)
        return copy_module.deepcopy(state_dict, memo)
    return copy(state_dict, memo)


def _all_tensors(obj: Any) -> list[torch.Tensor]:
    return [t for _, t in leaves(obj, torch.Tensor)]


class Snapshot(AsyncStager):
    """DCP's stager for a ``ckptstore.async_save`` whose state holds GPU tensors.

    ``stage`` returns once the state is safe from training: GPU tensors copied into a pinned
    arena (host memory: their bytes, rounded up to 64 MiB, kept for the next async save), or
    with ``device_snapshot`` cloned on their device in stream order (GPU memory: their
    bytes, until the save is done; host memory: the pinned pool). Other values are staged by
    DCP's own default stager. :meth:`done` (when the save finished) returns the arena."""

    _synchronize_after_execute = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._arena: torch.Tensor | None = None
        self.blocked_bytes = 0
        """Bytes copied before ``stage`` returned (host mode)."""

    def stage(self, state_dict: Any) -> Any:
        gpu = device_tensors(state_dict)
        memo: dict[int, Any] = {}
        if self.settings.device_snapshot:
            for t in gpu:
                ops = ops_for(t)
                assert ops is not None
                memo[id(t)] = ops.snapshot(t)
        elif gpu:
            sizes = [t.numel() * t.element_size() for t in gpu]
            total = sum(-(-n // _ALIGN) * _ALIGN for n in sizes)
            first = ops_for(gpu[0])
            assert first is not None
            arena = self._arena = _take_arena(total, first)
            copies = []
            pos = 0
            try:
                for t, n in zip(gpu, sizes, strict=True):
                    ops = ops_for(t)
                    assert ops is not None
                    host = arena[pos : pos + n]
                    if n:
                        src = t.detach().resolve_conj().resolve_neg().contiguous()
                        copies.append(
                            (ops, ops.to_host(host, src.reshape(-1).view(torch.uint8)), src)
                        )
                    memo[id(t)] = (
                        host.view(t.dtype).reshape(t.shape)
                        if n
                        else t.new_empty(t.shape, device="cpu")
                    )
                    pos += -(-n // _ALIGN) * _ALIGN
            finally:
                for ops, event, _ in copies:  # the training thread waits for these only
                    ops.wait(event)
            self.blocked_bytes = pos
        return _copy_rest(state_dict, memo)

    def done(self) -> None:
        """The save that used the staged state is over: its arena serves the next one."""
        arena, self._arena = self._arena, None
        if arena is not None:
            _give_arena(arena)

    def close(self) -> None:
        self.done()
