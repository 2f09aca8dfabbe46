"""Fuzzing the read side (in the spirit of safetensors' fuzzing): whatever bytes a manifest
or a chunk object holds, reading gives the saved data, a validated manifest, or an error
from the ckptstore tree — never another exception, never different chunk data, never an
allocation beyond the declared sizes.

The store is built from ``Manifest`` objects and real encoded chunks (no torch), and every
chunk is read the way the store reads it: frame check → decode bounded by the declared raw
size → content-key check.
"""

from __future__ import annotations

import copy
import os
import struct
import tracemalloc
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptstore.codecs.pipeline import Pipeline, default_pipeline, quantized_pipeline
from ckptstore.errors import CkptStoreError, CodecError, CorruptChunkError, ManifestError
from ckptstore.store.chunks import content_key, frame, unframe
from ckptstore.store.manifest import (
    Blob,
    ChunkRef,
    Manifest,
    SchemaError,
    Shard,
    TensorEntry,
)

FUZZ = settings(
    max_examples=int(os.environ.get("CKPTSTORE_FUZZ_EXAMPLES", "200")),  # more: a campaign
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class SampleStore:
    manifest: Manifest
    chunks: dict[bytes, bytes]  # key → stored chunk object
    raw: dict[bytes, bytes]  # key → the raw bytes a read of that chunk must give


def _blob(pipe: Pipeline, raw: bytes, rows: int, store: SampleStore, chunk_rows: int = 0) -> Blob:
    if not chunk_rows:
        return Blob(pipe.config, len(raw), rows, inline=frame(pipe.encode(raw)))
    row_bytes = len(raw) // rows
    lossy, tail = pipe.split()
    refs = []
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        piece = raw[start * row_bytes : stop * row_bytes]
        keyed = piece if lossy is None else lossy.quantize(piece)[0]
        payload = tail.encode(keyed)
        key = content_key(pipe, keyed)
        stored = frame(payload)
        store.chunks[key] = stored
        store.raw[key] = bytes(pipe.decode(payload))
        refs.append(ChunkRef(key, start, stop, len(stored), True))
    return Blob(pipe.config, len(raw), rows, chunks=refs)


def sample_store() -> SampleStore:
    """A small checkpoint with every kind of blob: dim-0 shards cut into chunks, a 2-d grid
    of shards, inline tensors, a 0-d and an empty tensor (legacy rows), int8 and fp16
    chains, objects, planner_data with list indices and int dict keys."""
    rng = np.random.default_rng(7)
    store = SampleStore(Manifest("step-000000000001", 1, 1700000000.0, {}, {}), {}, {})
    f32 = default_pipeline("float32")

    w = (rng.standard_normal((64, 16)) * 0.02).astype(np.float32)
    store.manifest.tensors["model.w"] = TensorEntry(
        "float32",
        [64, 16],
        [
            Shard([0, 0], [32, 16], _blob(f32, w[:32].tobytes(), 32, store, chunk_rows=8)),
            Shard([32, 0], [32, 16], _blob(f32, w[32:].tobytes(), 32, store, chunk_rows=8)),
        ],
    )
    g = rng.standard_normal((4, 6)).astype(np.float32)
    grid = [
        Shard(
            [r, c],
            [2, 3],
            _blob(f32, np.ascontiguousarray(g[r : r + 2, c : c + 3]).tobytes(), 2, store),
        )
        for r in (0, 2)
        for c in (0, 3)
    ]
    store.manifest.tensors["model.grid"] = TensorEntry("float32", [4, 6], grid)
    q = rng.standard_normal((32, 8)).astype(np.float32)
    int8 = quantized_pipeline("int8", "float32")
    store.manifest.tensors["model.q"] = TensorEntry(
        "float32", [32, 8], [Shard([0, 0], [32, 8], _blob(int8, q.tobytes(), 32, store, 16))]
    )
    c = rng.standard_normal((16, 4)).astype(np.float32)
    fp16 = quantized_pipeline("fp16", "float32")
    store.manifest.tensors["model.c"] = TensorEntry(
        "float32", [16, 4], [Shard([0, 0], [16, 4], _blob(fp16, c.tobytes(), 16, store, 5))]
    )
    b = rng.standard_normal(16).astype(np.float32).tobytes()
    store.manifest.tensors["model.b"] = TensorEntry(
        "float32", [16], [Shard([0], [16], _blob(f32, b, 16, store))]
    )
    h = rng.integers(0, 2**16, (8, 8), dtype=np.uint16).tobytes()  # bf16 bit patterns
    store.manifest.tensors["model.h"] = TensorEntry(
        "bfloat16",
        [8, 8],
        [Shard([0, 0], [8, 8], _blob(default_pipeline("bfloat16"), h, 8, store))],
    )
    step = np.array(1000, dtype=np.int64).tobytes()
    store.manifest.tensors["optim.state.0.step"] = TensorEntry(
        "int64", [], [Shard([], [], _blob(default_pipeline("int64"), step, 1, store))]
    )
    empty = Blob(f32.config, 0, 1, inline=frame(f32.encode(b"")))  # early v1 writers: rows 1
    store.manifest.tensors["model.empty"] = TensorEntry(
        "float32", [0, 4], [Shard([0, 0], [0, 4], empty)]
    )
    obj = default_pipeline("bytes")
    lr = b"\x80\x02G?PbM\xd2\xf1\xa9\xfc." * 3
    store.manifest.objects["optim.lr"] = _blob(obj, lr, len(lr), store)
    big = bytes(rng.integers(0, 4, 3000, dtype=np.uint8))
    store.manifest.objects["extra.0"] = _blob(obj, big, len(big), store, chunk_rows=1024)
    store.manifest.objects["extra.1"] = _blob(obj, b"tag", 3, store)
    store.manifest.planner_data = {
        "model.w": ["model", "w"],
        "model.grid": ["model", "grid"],
        "model.q": ["model", "q"],
        "model.c": ["model", "c"],
        "model.b": ["model", "b"],
        "model.h": ["model", "h"],
        "model.empty": ["model", "empty"],
        "optim.state.0.step": ["optim", "state", "0", "step"],
        "optim.lr": ["optim", "lr"],
        "extra.0": ["extra", 0],
        "extra.1": ["extra", 1],
    }
    store.manifest.int_keys = [["optim", "state", "0"]]
    store.manifest.writer = "ckptstore 0.1.0"
    return store


_SAMPLE = sample_store()
_ENCODED = _SAMPLE.manifest.encode()
_DICT = msgpack.unpackb(_ENCODED[12:], raw=False)


def reframe(body: bytes) -> bytes:
    """A manifest frame for ``body`` with a valid checksum."""
    return b"CKM1" + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + body


def _decode_manifest(data: bytes) -> Manifest | None:
    """Decode; a ManifestError (or FormatVersionError, for a changed format number) is a
    fine answer, but not one produced by the safety net for unexpected exceptions."""
    try:
        return Manifest.decode(data, "fuzz.msgpack")
    except ManifestError as exc:
        cause = exc.__cause__
        assert (
            cause is None
            or isinstance(cause, (SchemaError, CkptStoreError))
            or ("cannot be parsed" in str(exc))
        ), f"raw {type(cause).__name__} behind: {exc}"
        assert "fuzz.msgpack" in str(exc)
        return None
    except CkptStoreError as exc:  # FormatVersionError
        assert "format version" in str(exc)
        return None


def read_chunk(stored: bytes, key: bytes, pipe: Pipeline, expected: int) -> bytes:
    """Read one chunk object as the store does: frame, bounded decode, key check."""
    payload = unframe(stored, "fuzz")
    keyed, raw = pipe.decode_parts(payload, expected_size=expected)
    if content_key(pipe, keyed) != key:
        raise CorruptChunkError("chunk does not hold the content its key names")
    return bytes(raw)


def _read_inline(blob: Blob, pipe: Pipeline) -> bytes:
    assert blob.inline is not None
    return bytes(pipe.decode(unframe(blob.inline, "fuzz"), expected_size=blob.nbytes))


def _bounded(fn, limit: int):
    """Run ``fn``; assert that it allocated at most ``limit`` bytes (Python and numpy
    buffers, zstd output included) at its peak."""
    tracemalloc.start()
    try:
        try:
            return fn()
        finally:
            _, peak = tracemalloc.get_traced_memory()
            assert peak <= limit, f"allocated {peak} bytes, more than {limit}"
    finally:
        tracemalloc.stop()


def _use(m: Manifest, store: SampleStore) -> None:
    """Everything a reader does with a validated manifest must give the saved data or a
    ckptstore error."""
    assert Manifest.decode(m.encode(), "again") == m  # validated manifests re-encode
    m.chunk_keys(), m.logical_bytes, m.chunk_bytes, m.new_chunk_bytes  # noqa: B018
    for _, blob in m.blobs():
        pipe = Pipeline.from_config(blob.codec)
        row_bytes = blob.nbytes // blob.rows if blob.rows else 0
        if blob.inline is not None:
            try:
                out = _bounded(
                    lambda b=blob, p=pipe: _read_inline(b, p), 4 * blob.nbytes + (1 << 20)
                )
                assert len(out) == blob.nbytes
            except CkptStoreError:
                pass
            continue
        for ref in blob.chunks:
            stored = store.chunks.get(ref.key)
            if stored is None:
                continue  # a missing object: ChunkNotFoundError in the store
            expected = (ref.row_stop - ref.row_start) * row_bytes
            try:
                out = _bounded(
                    lambda s=stored, k=ref.key, p=pipe, n=expected: read_chunk(s, k, p, n),
                    4 * expected + (1 << 20),
                )
            except CkptStoreError:
                continue
            assert out == store.raw[ref.key], "a chunk read gave data other than saved"
    try:
        from ckptstore.api import _unflatten
    except ImportError:  # torch-free install
        return
    flat = {fqn: fqn for fqn in [*m.tensors, *m.objects]}
    _unflatten(flat, m.planner_data, m.int_keys)


def test_sample_store_reads_back():
    m = Manifest.decode(_ENCODED, "sample")
    assert m == _SAMPLE.manifest
    _use(m, _SAMPLE)


# -- manifests: raw bytes ---------------------------------------------------------------


@FUZZ
@given(st.data())
def test_manifest_byte_mutations(data):
    buf = bytearray(_ENCODED)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
        else:
            del buf[pos : pos + data.draw(st.integers(1, 9))]
        if not buf:
            break
    rechecksum = data.draw(st.booleans())
    out = bytes(reframe(bytes(buf[12:])) if rechecksum and len(buf) >= 12 else buf)
    m = _decode_manifest(out)
    if m is not None:
        _use(m, _SAMPLE)


# -- manifests: structure, re-checksummed ----------------------------------------------

_INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 16, 255, 2**31, 2**32, 2**53, 2**63 - 1, 2**64 - 1]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(_INTERESTING_INTS),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=6),
    st.binary(max_size=20),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node, prefix=()):
    """Every (container path, key) in a msgpack tree."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        out.append((*prefix, k))
        if isinstance(v, (dict, list)):
            out += _paths(v, (*prefix, k))
    return out


def _at(root, path):
    for k in path:
        root = root[k]
    return root


@FUZZ
@given(st.data())
def test_manifest_structure_mutations(data):
    d = copy.deepcopy(_DICT)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(d)
        path = paths[data.draw(st.integers(0, len(paths) - 1))]
        parent, key = _at(d, path[:-1]), path[-1]
        value = parent[key]
        op = data.draw(st.sampled_from(["replace", "nudge", "delete", "add", "dup", "swap"]))
        if op == "nudge" and type(value) is int:
            parent[key] = value + data.draw(st.sampled_from([-1, 1, -2, 2, 8, 2**40, -(2**40)]))
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(value, dict):
            value[data.draw(st.text(max_size=8))] = data.draw(_VALUES)
        elif op == "add" and isinstance(value, list):
            value.insert(data.draw(st.integers(0, len(value))), data.draw(_VALUES))
        elif op == "dup" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(value))
        elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
            other = data.draw(st.integers(0, len(parent) - 1))
            parent[key], parent[other] = parent[other], parent[key]
        elif op == "swap" and isinstance(parent, dict) and len(parent) > 1:
            other = data.draw(st.sampled_from(sorted(parent)))
            parent[key], parent[other] = parent[other], parent[key]
        else:
            parent[key] = data.draw(_VALUES)
    m = _decode_manifest(reframe(msgpack.packb(d, use_bin_type=True)))
    if m is not None:
        _use(m, _SAMPLE)


# -- chunk objects ------------------------------------------------------------------------

_CHUNKS = [
    (key, stored, ref, Pipeline.from_config(blob.codec), blob)
    for _, blob in _SAMPLE.manifest.blobs()
    for ref in blob.chunks
    for key, stored in [(ref.key, _SAMPLE.chunks[ref.key])]
]
_INLINE = [blob for _, blob in _SAMPLE.manifest.blobs() if blob.inline is not None and blob.nbytes]
_BOMB = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # 64 MiB of zeros, ~2 KiB


def _zstd_segments(payload: bytes) -> list[tuple[int, int, int]]:
    """(header offset, kind, payload offset) of each segment of a zstd container."""
    n = payload[0]
    pos, out = 1 + 9 * n, []
    for i in range(n):
        kind, length = struct.unpack_from("<BQ", payload, 1 + 9 * i)
        out.append((1 + 9 * i, kind, pos))
        pos += length
    return out


def _mutate_payload(data, payload: bytes) -> bytes:
    buf = bytearray(payload)
    op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "bomb", "length", "kind"]))
    if op in ("bomb", "length", "kind"):
        try:
            segments = _zstd_segments(payload)
        except (IndexError, struct.error):
            segments = []
        if segments:
            at, kind, start = segments[data.draw(st.integers(0, len(segments) - 1))]
            length = struct.unpack_from("<Q", buf, at + 1)[0]
            if op == "bomb":  # a valid frame that inflates to 64 MiB in place of the segment
                buf[start : start + length] = _BOMB
                struct.pack_into("<BQ", buf, at, 1, len(_BOMB))
            elif op == "length":
                new = data.draw(st.sampled_from([0, 1, length - 1, length + 1, 2**63, 2**64 - 1]))
                struct.pack_into("<Q", buf, at + 1, max(0, new))
            else:
                buf[at] = data.draw(st.integers(0, 3))
            return bytes(buf)
    if not buf:
        return data.draw(st.binary(max_size=16))
    pos = data.draw(st.integers(0, len(buf) - 1))
    if op == "flip":
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "set":
        buf[pos] = data.draw(st.integers(0, 255))
    elif op == "cut":
        del buf[pos:]
    else:
        buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    return bytes(buf)


@FUZZ
@given(st.data())
def test_chunk_mutations(data):
    key, stored, ref, pipe, blob = data.draw(st.sampled_from(_CHUNKS))
    row_bytes = blob.nbytes // blob.rows
    expected = (ref.row_stop - ref.row_start) * row_bytes
    if data.draw(st.booleans()):  # the stored object itself: its frame checksum catches it
        mutated = bytearray(stored)
        for _ in range(data.draw(st.integers(1, 3))):
            pos = data.draw(st.integers(0, len(mutated) - 1))
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        obj = bytes(mutated)
    else:  # a payload with a valid frame (a bad writer, or an object put under a wrong key)
        obj = frame(_mutate_payload(data, bytes(unframe(stored, "x"))))
    try:
        out = _bounded(lambda: read_chunk(obj, key, pipe, expected), 4 * expected + (1 << 20))
    except CkptStoreError:
        return
    assert out == _SAMPLE.raw[key]


@FUZZ
@given(st.data())
def test_inline_mutations(data):
    blob = data.draw(st.sampled_from(_INLINE))
    pipe = Pipeline.from_config(blob.codec)
    mutated = Blob(
        blob.codec,
        blob.nbytes,
        blob.rows,
        frame(_mutate_payload(data, bytes(unframe(blob.inline, "x")))),
    )
    try:
        out = _bounded(lambda: _read_inline(mutated, pipe), 4 * blob.nbytes + (1 << 20))
    except CkptStoreError:
        return
    assert len(out) == blob.nbytes  # inline data has no key: only its size can be checked


def test_bomb_alone_is_refused_before_inflating():
    pipe = default_pipeline("bytes")
    payload = b"\x01" + struct.pack("<BQ", 1, len(_BOMB)) + _BOMB
    with pytest.raises(CodecError, match="bomb"):
        _bounded(lambda: pipe.decode(payload, expected_size=1 << 20), 1 << 20)
