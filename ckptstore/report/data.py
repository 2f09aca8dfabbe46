"""What the report page shows, collected from a store. Torch-free: the catalog, the manifests
of the latest checkpoints and, for the change heat map, chunks decoded with numpy.

- **Sizes** (every checkpoint, from the catalog listing: no manifest is read): logical,
  stored and new bytes, the delta share.
- **Quantization error** (the latest ``max_checkpoints`` manifests): what each lossy tensor
  was stored with — ‖x−x̂‖/‖x‖ and max |x−x̂| as the save measured them (``qstats``, see
  docs/quantization.md). The originals are gone; nothing is recomputed.
- **Changes** (the same window): for consecutive checkpoints a and b and each tensor of the
  same dtype and shape in both, ‖b−a‖/‖a‖ over elements finite in both. Chunks with the same
  key and rows in a and b contribute 0 without being decoded; any other chunk of b is decoded
  with the rows of a it covers, so memory stays a few chunks per thread (tensors whose shard
  boxes differ between a and b are assembled whole: two copies of that tensor).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptstore import Blob, CheckpointSummary, ChunkRef, Manifest, Store, TensorEntry
from ckptstore.errors import CkptStoreError

Progress = Callable[[int, int], None]
"""``progress(done, total)``: bytes of tensors compared so far, and in all."""

_NUMPY = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "complex128": np.complex128,
    "complex64": np.complex64,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint64": np.uint64,
    "uint32": np.uint32,
    "uint16": np.uint16,
    "uint8": np.uint8,
    "bool": np.bool_,
}
_BLOCK = 1 << 18
"""Elements widened to float64 at a time when summing."""


def comparable(dtype: str) -> bool:
    """Whether the change heat map can decode this dtype with numpy (not float8, complex32)."""
    return dtype == "bfloat16" or dtype in _NUMPY


# -- what the page shows ------------------------------------------------------------------
@dataclass
class QuantRow:
    """One lossy tensor of a checkpoint and the error it was stored with."""

    fqn: str
    dtype: str
    codec: str
    """The lossy stage, e.g. ``int8/64``, ``fp16``, ``bf16``."""
    logical_bytes: int
    rel_l2: float | None
    """‖x−x̂‖/‖x‖ recorded at save time (None: the manifest records no error)."""
    max_abs: float | None
    fallback_chunks: int


@dataclass
class QuantInfo:
    checkpoint: str
    """The newest checkpoint of the window that holds lossy tensors: the one shown."""
    step: int | None
    rows: list[QuantRow]
    omitted: int = 0
    """Lossy tensors of it left out (beyond ``max_tensors``, the smallest first)."""
    lossy_checkpoints: int = 0
    """Checkpoints of the window holding lossy tensors."""
    worst: tuple[str, str, float] | None = None
    """(checkpoint, tensor, rel. L2) of the worst recorded error in the window."""


@dataclass
class ChangeMap:
    """Relative L2 change of each tensor between consecutive checkpoints of the window."""

    checkpoints: list[str]
    """The window, oldest first; column j compares checkpoints[j] with checkpoints[j + 1]."""
    steps: list[int | None]
    tensors: list[str]
    """Rows: the largest tensors, in the order of the newest checkpoint."""
    values: list[list[float | None]] = field(default_factory=list)
    """[row][column]: ‖b−a‖/‖a‖; None where not comparable (see ``notes``)."""
    notes: list[list[str]] = field(default_factory=list)
    """[row][column]: why a value is None, or how it was found ("identical chunks")."""
    omitted: int = 0
    """Tensors left out (beyond ``max_tensors``)."""
    omitted_bytes: int = 0
    decoded_bytes: int = 0
    """Raw tensor bytes decoded (both sides counted)."""
    skipped_bytes: int = 0
    """Raw bytes of b found equal to a by chunk key alone, not decoded."""


@dataclass
class ReportData:
    url: str
    checkpoints: list[CheckpointSummary]
    """Every committed checkpoint, oldest first (from the catalog)."""
    window: list[str] = field(default_factory=list)
    """The latest ``max_checkpoints`` readable checkpoints, whose manifests were read."""
    quant: QuantInfo | None = None
    changes: ChangeMap | None = None
    notes: list[str] = field(default_factory=list)
    """What the page must say: unreadable checkpoints, limits applied, what was skipped."""
    unreadable: dict[str, str] = field(default_factory=dict)


# -- collecting ---------------------------------------------------------------------------
def collect(
    url: str | Store,
    *,
    storage_options: dict[str, Any] | None = None,
    max_checkpoints: int = 50,
    max_tensors: int = 50,
    changes: bool = True,
    threads: int | None = None,
    progress: Progress | None = None,
) -> ReportData:
    """Everything the page shows, from the store at ``url``; see the module docstring."""
    if max_checkpoints < 1 or max_tensors < 1:
        raise ValueError("max_checkpoints and max_tensors must be at least 1")
    store = url if isinstance(url, Store) else Store(url, storage_options)
    summaries, bad = store.scan()
    data = ReportData(store.url, summaries, unreadable={n: str(e) for n, e in bad.items()})
    for name, err in data.unreadable.items():
        data.notes.append(f"Checkpoint {name!r} is unreadable and left out: {err}")
    if not summaries:
        return data
    names = [s.name for s in summaries[-max_checkpoints:]]
    if len(summaries) > max_checkpoints:
        data.notes.append(
            f"Quantization and changes cover the latest {max_checkpoints} of "
            f"{len(summaries)} checkpoints (--max-checkpoints); sizes cover all."
        )

    def read(name: str) -> Manifest | None:
        try:
            return store.manifest(name=name)
        except CkptStoreError as exc:  # removed or damaged since the listing
            data.unreadable[name] = str(exc)
            data.notes.append(f"Checkpoint {name!r} could not be read and is left out: {exc}")
            return None

    with ThreadPoolExecutor(min(store.settings.threads, len(names))) as pool:
        manifests = [m for m in pool.map(read, names) if m is not None]
    data.window = [m.name for m in manifests]
    data.quant = _quant_info(manifests, max_tensors)
    if data.quant is not None and data.quant.omitted:
        data.notes.append(
            f"The quantization figure shows the {len(data.quant.rows)} largest of "
            f"{len(data.quant.rows) + data.quant.omitted} lossy tensors (--max-tensors)."
        )
    if not changes:
        data.notes.append("Changes between checkpoints were not computed (--no-changes).")
    elif len(manifests) < 2:
        data.notes.append("Changes need at least two checkpoints.")
    else:
        n = threads if threads is not None else min(4, store.settings.threads)
        data.changes = _ChangeWalk(store, max(1, n), progress).run(manifests, max_tensors)
        if data.changes.omitted:
            data.notes.append(
                f"The change heat map shows the {len(data.changes.tensors)} largest tensors; "
                f"{data.changes.omitted} smaller ones ({_mib(data.changes.omitted_bytes)}) are "
                "left out (--max-tensors)."
            )
    return data


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _quant_info(manifests: list[Manifest], max_tensors: int) -> QuantInfo | None:
    shown: QuantInfo | None = None
    lossy = 0
    worst: tuple[str, str, float] | None = None
    for m in manifests:
        rows = [r for fqn, t in m.tensors.items() if (r := _quant_row(fqn, t)) is not None]
        if not rows:
            continue
        lossy += 1
        for r in rows:
            if r.rel_l2 is not None and (worst is None or r.rel_l2 > worst[2]):
                worst = (m.name, r.fqn, r.rel_l2)
        shown = QuantInfo(m.name, m.step, rows)
    if shown is None:
        return None
    if len(shown.rows) > max_tensors:
        keep = {r.fqn for r in sorted(shown.rows, key=lambda r: -r.logical_bytes)[:max_tensors]}
        shown.omitted = len(shown.rows) - max_tensors
        shown.rows = [r for r in shown.rows if r.fqn in keep]
    shown.lossy_checkpoints = lossy
    shown.worst = worst
    return shown


def _quant_row(fqn: str, t: TensorEntry) -> QuantRow | None:
    stages = {lossy for s in t.shards if (lossy := Store.lossy_codec(s.blob)) is not None}
    if not stages:
        return None
    err = t.error
    return QuantRow(
        fqn=fqn,
        dtype=t.dtype,
        codec=", ".join(sorted(stages)),
        logical_bytes=t.logical_bytes,
        rel_l2=None if err is None else err.rel_l2,
        max_abs=None if err is None else err.max_abs,
        fallback_chunks=0 if err is None else err.fallback,
    )


# -- the change heat map ------------------------------------------------------------------
@dataclass
class _Sums:
    diff: float = 0.0
    """Σ|b−a|² over elements finite in both."""
    ref: float = 0.0
    """Σ|a|² over finite elements of a."""
    decoded: int = 0
    skipped: int = 0

    def add(self, o: _Sums) -> None:
        self.diff += o.diff
        self.ref += o.ref
        self.decoded += o.decoded
        self.skipped += o.skipped


@dataclass
class _Work:
    """One unit of a tensor's comparison: rows [r0, r1) of a shard (or the whole tensor)."""

    fqn: str
    dtype: str
    names: tuple[str, str]
    """The checkpoints compared (for messages)."""
    a: Blob | TensorEntry
    b: Blob | TensorEntry
    r0: int = 0
    r1: int = 0
    same: ChunkRef | None = None
    """a's chunk with the key and rows of b's: the rows are equal, not decoded."""
    a_chunk: ChunkRef | None = None
    """a's chunk of exactly these rows (its Σ|a|² is cached under its key)."""
    b_chunk: ChunkRef | None = None
    nbytes: int = 0


class _ChangeWalk:
    def __init__(self, store: Store, threads: int, progress: Progress | None) -> None:
        self.store = store
        self.threads = threads
        self.progress = progress
        self._ref: dict[tuple[bytes, str], float] = {}
        """(chunk key, dtype) → Σ|x|² of its finite elements: a chunk seen as b in one pair
        is a in the next, and an unchanged chunk is never decoded again."""
        self._lock = threading.Lock()

    def run(self, manifests: list[Manifest], max_tensors: int) -> ChangeMap:
        size: dict[str, int] = {}
        for m in reversed(manifests):  # rows in the newest checkpoint's order
            for fqn, t in m.tensors.items():
                size[fqn] = max(size.get(fqn, 0), t.logical_bytes)
        ranked = sorted(size, key=lambda f: -size[f])
        keep = set(ranked[:max_tensors])
        cmap = ChangeMap(
            checkpoints=[m.name for m in manifests],
            steps=[m.step for m in manifests],
            tensors=[f for f in size if f in keep],
            omitted=max(0, len(size) - max_tensors),
            omitted_bytes=sum(size[f] for f in ranked[max_tensors:]),
        )
        pairs = list(zip(manifests, manifests[1:], strict=False))
        total = sum(
            tb.logical_bytes
            for ma, mb in pairs
            for f in cmap.tensors
            if (tb := mb.tensors.get(f)) is not None and _why_not(ma.tensors.get(f), tb) is None
        )
        done = 0
        self._report(done, total)
        columns: list[tuple[list[float | None], list[str]]] = []
        row = {f: i for i, f in enumerate(cmap.tensors)}
        with ThreadPoolExecutor(self.threads, thread_name_prefix="ckptstore-report") as pool:
            for ma, mb in pairs:
                values, notes, work, identical = _plan(ma, mb, cmap.tensors)
                cmap.skipped_bytes += identical
                done += identical
                self._report(done, total)
                sums = {f: _Sums() for f in work}
                items = [w for ws in work.values() for w in ws]
                # pool.map runs at most `threads` items at once: memory is bounded per thread
                for w, s in zip(items, pool.map(self._compute, items), strict=True):
                    sums[w.fqn].add(s)
                    done += w.nbytes
                    self._report(done, total)
                for fqn, s in sums.items():
                    cmap.decoded_bytes += s.decoded
                    cmap.skipped_bytes += s.skipped
                    values[row[fqn]], notes[row[fqn]] = _ratio(s)
                columns.append((values, notes))
        cmap.values = [[col[0][i] for col in columns] for i in range(len(cmap.tensors))]
        cmap.notes = [[col[1][i] for col in columns] for i in range(len(cmap.tensors))]
        return cmap

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    def _compute(self, w: _Work) -> _Sums:
        dtype = w.dtype
        where, where_b = (f"{w.fqn!r} of checkpoint {n!r}" for n in w.names)
        if isinstance(w.a, TensorEntry):  # shard boxes differ: whole tensors
            assert isinstance(w.b, TensorEntry)
            va = _whole(self.store, w.a, where)
            vb = _whole(self.store, w.b, where_b)
            diff, ref, _ = _sums(va, vb, w.a.dtype)
            return _Sums(diff, ref, decoded=2 * w.nbytes)
        assert isinstance(w.b, Blob)
        if w.same is not None:  # same chunk in both: only Σ|a|² is needed
            ref = self._ref_of(w.a, w.same, dtype, where)
            return _Sums(0.0, ref, skipped=w.nbytes)
        xa = self.store.read_rows(w.a, w.r0, w.r1, where=where)
        xb = self.store.read_rows(w.b, w.r0, w.r1, where=where_b)
        diff, ref, ref_b = _sums(xa, xb, dtype)
        with self._lock:
            if w.a_chunk is not None:
                self._ref[(w.a_chunk.key, dtype)] = ref
            if w.b_chunk is not None:
                self._ref[(w.b_chunk.key, dtype)] = ref_b
        return _Sums(diff, ref, decoded=2 * w.nbytes)

    def _ref_of(self, blob: Blob, ref: ChunkRef, dtype: str, where: str) -> float:
        with self._lock:
            known = self._ref.get((ref.key, dtype))
        if known is not None:
            return known
        raw = self.store.read_rows(blob, ref.row_start, ref.row_stop, where=where)
        value = _sumsq(_values(raw, dtype))
        with self._lock:
            self._ref[(ref.key, dtype)] = value
        return value


def _plan(
    ma: Manifest, mb: Manifest, fqns: list[str]
) -> tuple[list[float | None], list[str], dict[str, list[_Work]], int]:
    """One column from the manifests alone: the values known without decoding (tensors not
    comparable, tensors with the very same chunks), the work the others need, and the bytes
    of the identical ones."""
    values: list[float | None] = []
    notes: list[str] = []
    work: dict[str, list[_Work]] = {}
    identical = 0
    for fqn in fqns:
        ta, tb = ma.tensors.get(fqn), mb.tensors.get(fqn)
        why = _why_not(ta, tb)
        if why is not None:
            values.append(None)
            notes.append(why)
            continue
        assert ta is not None and tb is not None
        if _same_pieces(ta, tb):
            values.append(0.0)
            notes.append("identical chunks")
            identical += tb.logical_bytes
            continue
        values.append(None)  # filled in once computed
        notes.append("")
        work[fqn] = _tensor_work(fqn, (ma.name, mb.name), ta, tb)
    return values, notes, work, identical


def _why_not(ta: TensorEntry | None, tb: TensorEntry | None) -> str | None:
    """Why a tensor cannot be compared between two checkpoints (None: it can)."""
    if ta is None and tb is None:
        return "absent from both"
    if ta is None:
        return "added"
    if tb is None:
        return "removed"
    if ta.dtype != tb.dtype:
        return f"dtype changed ({ta.dtype} → {tb.dtype})"
    if list(ta.shape) != list(tb.shape):
        return f"shape changed ({list(ta.shape)} → {list(tb.shape)})"
    if not comparable(tb.dtype):
        return f"not compared ({tb.dtype} is not decoded here)"
    return None


def _boxes(t: TensorEntry) -> dict[tuple[tuple[int, ...], tuple[int, ...]], Blob]:
    return {(tuple(s.offsets), tuple(s.sizes)): s.blob for s in t.shards}


def _pieces(b: Blob) -> Any:
    if b.inline is not None:
        return ("inline", b.inline)
    return [(c.key, c.row_start, c.row_stop) for c in b.chunks]


def _same_pieces(ta: TensorEntry, tb: TensorEntry) -> bool:
    """Both hold the very same chunks (or inline bytes) in the same boxes: no change."""
    ba, bb = _boxes(ta), _boxes(tb)
    if ba.keys() != bb.keys():
        return False
    return all(_pieces(ba[k]) == _pieces(bb[k]) and ba[k].codec == bb[k].codec for k in ba)


def _tensor_work(fqn: str, names: tuple[str, str], ta: TensorEntry, tb: TensorEntry) -> list[_Work]:
    ba, bb = _boxes(ta), _boxes(tb)
    if ba.keys() != bb.keys() or len(ba) != len(ta.shards) or len(bb) != len(tb.shards):
        return [_Work(fqn, tb.dtype, names, ta, tb, nbytes=tb.logical_bytes)]
    out: list[_Work] = []
    for box, b in bb.items():
        a = ba[box]
        row_bytes = b.nbytes // b.rows if b.rows else 0
        if b.inline is not None or not b.chunks:
            out.append(_Work(fqn, tb.dtype, names, a, b, 0, b.rows, nbytes=b.nbytes))
            continue
        a_rows = {} if a.inline is not None else {(c.row_start, c.row_stop): c for c in a.chunks}
        for c in b.chunks:
            ca = a_rows.get((c.row_start, c.row_stop))
            same = ca if ca is not None and ca.key == c.key else None
            n = (c.row_stop - c.row_start) * row_bytes
            out.append(_Work(fqn, tb.dtype, names, a, b, c.row_start, c.row_stop, same, ca, c, n))
    return out


def _ratio(s: _Sums) -> tuple[float | None, str]:
    if s.diff == 0.0:
        return 0.0, "identical chunks" if s.decoded == 0 else "equal values"
    if s.ref == 0.0:
        return None, "the earlier checkpoint holds only zeros"
    if not math.isfinite(s.diff) or not math.isfinite(s.ref):
        return None, "overflows float64"
    note = "" if s.skipped == 0 else "some chunks identical"
    return math.sqrt(s.diff) / math.sqrt(s.ref), note


def _values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The elements of raw bytes of ``dtype`` as a numpy array (bfloat16 as float32: numpy
    has no bfloat16, whose bits are the upper half of a float32's)."""
    if dtype == "bfloat16":
        return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=_NUMPY[dtype])


def _widen(x: np.ndarray) -> np.ndarray:
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _sq(x: np.ndarray) -> float:
    return float(np.vdot(x, x).real)


def _sumsq(v: np.ndarray) -> float:
    total = 0.0
    for i in range(0, v.size, _BLOCK):
        x = _widen(v[i : i + _BLOCK])
        fin = np.isfinite(x)
        total += _sq(x if fin.all() else x[fin])
    return total


def _sums(raw_a: np.ndarray, raw_b: np.ndarray, dtype: str) -> tuple[float, float, float]:
    """Σ|b−a|² over elements finite in both, Σ|a|² and Σ|b|² over their finite elements."""
    va, vb = _values(raw_a, dtype), _values(raw_b, dtype)
    diff = ref_a = ref_b = 0.0
    for i in range(0, va.size, _BLOCK):
        a = _widen(va[i : i + _BLOCK])
        b = _widen(vb[i : i + _BLOCK])
        fa, fb = np.isfinite(a), np.isfinite(b)
        both = fa & fb
        ref_a += _sq(a if fa.all() else a[fa])
        ref_b += _sq(b if fb.all() else b[fb])
        d = b - a if both.all() else b[both] - a[both]
        diff += _sq(d)
    return diff, ref_a, ref_b


def _whole(store: Store, t: TensorEntry, where: str) -> np.ndarray:
    """Raw bytes of a whole tensor, assembled from its shard boxes."""
    item = 2 if t.dtype == "bfloat16" else np.dtype(_NUMPY[t.dtype]).itemsize
    full = np.empty([*t.shape, item], dtype=np.uint8)
    for s in t.shards:
        if not all(s.sizes):
            continue
        raw = store.read_rows(s.blob, 0, s.blob.rows, where=where)
        box = tuple(slice(o, o + n) for o, n in zip(s.offsets, s.sizes, strict=True))
        full[box] = raw.reshape([*s.sizes, item])
    return full.reshape(-1)
