"""Manifest format 2: each tensor's shards as one table of packed columns. Decoding is total
as for format 1 (a valid manifest or a ManifestError naming the field), format-1 manifests
keep loading, and a reader of format 1 only refuses format 2 cleanly."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from ckptstore.errors import FormatVersionError, ManifestError
from ckptstore.store import manifest as manifest_mod
from ckptstore.store.columns import ManifestColumns
from ckptstore.store.manifest import Blob, ChunkRef, Manifest, Shard, TensorEntry
from tests.test_fuzz import reframe, sample_store

WHERE = "checkpoints/t.msgpack"
DOC = Path(__file__).resolve().parent.parent / "docs" / "format.md"


@pytest.fixture
def d() -> dict:
    return msgpack.unpackb(sample_store().manifest.encode()[12:], raw=False)


def _decode(d: dict) -> Manifest:
    return Manifest.decode(reframe(msgpack.packb(d, use_bin_type=True)), WHERE)


def _col(d: dict, fqn: str, name: str) -> np.ndarray:
    return np.frombuffer(d["tensors"][fqn]["shards"][name], "<i8").copy()


def _set(d: dict, fqn: str, name: str, a: np.ndarray) -> None:
    d["tensors"][fqn]["shards"][name] = a.astype("<i8").tobytes()


def test_both_formats_decode_to_the_same_manifest():
    m = sample_store().manifest
    one, two = m.encode(format=1), m.encode()
    assert msgpack.unpackb(two[12:], raw=False)["format"] == 2
    a, b = Manifest.decode(one, WHERE), Manifest.decode(two, WHERE)
    assert b.tensors["model.w"].packed is not None  # decoded as columns, no shard objects
    assert a == b == m
    assert a.chunk_keys() == b.chunk_keys() == m.chunk_keys()
    assert (a.chunk_count, a.new_chunk_bytes, a.logical_bytes) == (
        b.chunk_count,
        b.new_chunk_bytes,
        b.logical_bytes,
    )


def test_a_format_one_reader_refuses_format_two(monkeypatch):
    monkeypatch.setattr(manifest_mod, "READ_FORMATS", (1,))
    with pytest.raises(FormatVersionError, match="format version 2; this ckptstore reads"):
        Manifest.decode(sample_store().manifest.encode(), WHERE)
    Manifest.decode(sample_store().manifest.encode(format=1), WHERE)


def test_column_of_wrong_length_is_refused(d):
    d["tensors"]["model.w"]["shards"]["rows"] += b"\0"
    with pytest.raises(ManifestError, match=r"tensors\['model.w'\]\.shards\.rows: 17 bytes"):
        _decode(d)


def test_column_not_bin_is_refused(d):
    d["tensors"]["model.w"]["shards"]["keys"] = [1, 2]
    with pytest.raises(ManifestError, match=r"shards\.keys: expected bin, got list"):
        _decode(d)


def test_chunk_counts_must_add_up(d):
    n = _col(d, "model.w", "nchunks")
    n[0] += 1
    _set(d, "model.w", "nchunks", n)
    with pytest.raises(ManifestError, match=r"shards: nchunks add up to 9"):
        _decode(d)


@pytest.mark.parametrize(
    "damage,match",
    [
        ("overlap", r"shards: box \[16, 0\]\+\[32, 16\] \(shard 1\) overlaps"),
        ("gap", r"shards\[0\]\.chunks\[1\]: rows \[9, 16\) do not continue"),
        ("codec", r"shards\.codec: shard 0: index 99 is outside the codec table"),
        ("negative", r"shards\[0\]\.offsets\[1\]: -1 is outside"),
        ("nbytes", r"shards\[1\]\.nbytes: holds 2044 bytes, expected 2048"),
        ("expansion", r"shards\[0\]\.chunks\[0\]: 512 raw bytes cannot come from a chunk"),
    ],
)
def test_broken_rules_name_the_shard(d, damage, match):
    """Numpy finds that a rule is broken; the per-shard checks then name shard and field,
    with the same messages as format 1."""
    if damage == "overlap":
        off = _col(d, "model.w", "offsets")
        off[2] = 16
        _set(d, "model.w", "offsets", off)
    elif damage == "gap":
        rs = _col(d, "model.w", "row_start")
        rs[1] += 1
        _set(d, "model.w", "row_start", rs)
    elif damage == "codec":
        c = _col(d, "model.w", "codec")
        c[0] = 99
        _set(d, "model.w", "codec", c)
    elif damage == "negative":
        off = _col(d, "model.w", "offsets")
        off[1] = -1
        _set(d, "model.w", "offsets", off)
    elif damage == "nbytes":
        nb = _col(d, "model.w", "nbytes")
        nb[1] -= 4
        _set(d, "model.w", "nbytes", nb)
    else:
        st = _col(d, "model.w", "stored")
        st[0] = 0
        _set(d, "model.w", "stored", st)
    with pytest.raises(ManifestError, match=match) as info:
        _decode(d)
    assert WHERE in str(info.value)


def test_commit_refuses_what_a_reader_would():
    """A writer's shard objects with a value the columns cannot hold (a float offset) are
    refused with the per-shard message, not rounded into the table."""
    blob = Blob(sample_store().manifest.tensors["model.w"].shards[0].blob.codec, 64, 4)
    blob.chunks = [ChunkRef(bytes(16), 0, 4, 40, True)]
    m = Manifest(
        "x", 1, 0.0, {"w": TensorEntry("float32", [4, 4], [Shard([0.0, 0], [4, 4], blob)])}, {}
    )
    with pytest.raises(
        ValueError, match=r"tensors\['w'\]\.shards\[0\]\.offsets\[0\]: expected an int"
    ):
        m.validate()


def test_columns_find_each_rank_its_shards():
    m = Manifest.decode(sample_store().manifest.encode(), WHERE)
    cols = ManifestColumns.of(m)
    found = cols.find(
        ["model.w", "model.w", "model.grid", "optim.state.0.step", "model.w", "nope"],
        [(32, 0), (0, 0), (2, 3), (), (5, 0), (0,)],
    )
    assert found[:4].tolist() == [1, 0, cols.shard_base[1] + 3, cols.shard_base[6]]
    assert found[4:].tolist() == [-1, -1]
    part = cols.slice(found[:4])
    fqn, dtype, shard = part.get(("model.grid", (2, 3)))
    assert (fqn, dtype) == ("model.grid", "float32")
    assert shard == m.tensors["model.grid"].shards[3]
    assert part.get(("model.w", (0, 0)))[2] == m.tensors["model.w"].shards[0]


def _doc_vector() -> tuple[Manifest, bytes]:
    """The test vector of docs/format.md, "Shard tables": a [4, 3] float32 tensor saved by
    two ranks, two rows each, one chunk each."""
    chain = [
        {"id": "bytegroup", "width": 4, "rotate": True},
        {"id": "zstd", "level": 1, "segments": 4, "entropy": True},
    ]
    shards = [
        Shard(
            [0, 0], [2, 3], Blob(chain, 24, 2, chunks=[ChunkRef(bytes([1] * 16), 0, 2, 40, True)])
        ),
        Shard(
            [2, 0], [2, 3], Blob(chain, 24, 2, chunks=[ChunkRef(bytes([2] * 16), 0, 2, 41, False)])
        ),
    ]
    m = Manifest("vector", 7, 0.0, {"w": TensorEntry("float32", [4, 3], shards)}, {}, writer="doc")
    text = DOC.read_text()
    block = re.search(r"<!-- vector:start -->\n```\n(.*?)```\n<!-- vector:end -->", text, re.S)
    assert block, "the test vector is missing from docs/format.md"
    return m, bytes.fromhex("".join(block.group(1).split()))


def test_docs_test_vector_is_what_ckptstore_writes():
    m, want = _doc_vector()
    table = msgpack.packb(m.to_dict_packed()["tensors"]["w"]["shards"], use_bin_type=True)
    assert table == want
    back = Manifest.decode(m.encode(), WHERE)
    assert back.tensors["w"].shards == m.tensors["w"].shards
