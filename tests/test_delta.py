"""Delta chunks (opt-in): a changed lossless chunk stored against the parent's chunk of the
same rows (floats as the ordered-integer difference, other types as XOR), with bounded
chains (docs/format.md, "Delta chunks")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore import errors
from ckptstore.codecs.pipeline import Pipeline
from ckptstore.store import Repository, delta_choice, layout, reports
from ckptstore.store.blobs import BlobReader
from ckptstore.store.delta_choice import (
    EXACT_RULES,
    PROCESS_DELTA_STATE,
    RULES,
    DeltaState,
    RawCache,
)
from ckptstore.store.manifest import Manifest

CHUNK = 16 * 1024
K = 3


def _settings(**kw) -> ckptstore.Settings:
    return ckptstore.Settings(chunk_bytes=CHUNK, delta_chain=K, **kw)


def _walk(seed: int, steps: int, dtype=torch.float32, rows: int = 96):
    """States of a slow random walk: every element changes a little at every step."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 128, generator=g)
    for _ in range(steps):
        w = w + 1e-3 * torch.randn(rows, 128, generator=g)
        yield {"w": w.to(dtype), "frozen": torch.arange(4096, dtype=torch.float32).reshape(32, 128)}


def _manifest(url: str, step: int) -> Manifest:
    repo = Repository.open(url)
    return repo.manifest(layout.step_name(step), cached=False)


def _chains(m: Manifest, fqn: str) -> list[int]:
    return [len(c.base) for s in m.tensors[fqn].shards for c in s.blob.chunks]


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Each test starts as a process that has saved nothing (no bases, no sizes)."""
    PROCESS_DELTA_STATE.clear()
    yield
    PROCESS_DELTA_STATE.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_over_chains_longer_than_k(store_url, dtype):
    states = list(_walk(0, 2 * K + 3, dtype))
    for step, sd in enumerate(states):
        ckptstore.save(sd, store_url, step=step, delta=True, settings=_settings())
    for step, sd in enumerate(states):
        out = ckptstore.load_full(store_url, step=step)
        assert torch.equal(out["w"], sd["w"]) and out["w"].dtype == dtype, step
        assert torch.equal(out["frozen"], sd["frozen"])
        m = _manifest(store_url, step)
        depths = _chains(m, "w")
        assert max(depths) <= K
        assert depths == [step % (K + 1)] * len(depths), (step, depths)  # standalone every K+1
        assert _chains(m, "frozen") == [0] * len(_chains(m, "frozen"))  # unchanged: reused
        assert m.max_chain == step % (K + 1)
        if step % (K + 1):
            assert 0 < m.delta_chunk_bytes <= m.chunk_bytes
    # a delta checkpoint is smaller than the same state saved whole
    assert _manifest(store_url, 1).tensors["w"].shards[0].blob.stored_bytes < (
        _manifest(store_url, 0).tensors["w"].shards[0].blob.stored_bytes
    )
    assert reports.verify(Repository.open(store_url)).ok


def test_default_is_off_and_cold_cache_reads_bases_back(local_url):
    states = list(_walk(1, 3))
    ckptstore.save(states[0], local_url, step=0, settings=_settings())
    ckptstore.save(states[1], local_url, step=1, settings=_settings())
    assert _manifest(local_url, 1).max_chain == 0  # delta is opt-in
    PROCESS_DELTA_STATE.clear()  # a new process: bases read (and decoded) from the store
    ckptstore.save(states[2], local_url, step=2, delta=True, settings=_settings())
    assert _manifest(local_url, 2).max_chain == 1
    assert torch.equal(ckptstore.load_full(local_url, step=2)["w"], states[2]["w"])


def test_partial_and_resharded_reads(local_url):
    states = list(_walk(2, 3, rows=200))
    for step, sd in enumerate(states):
        ckptstore.save(sd, local_url, step=step, delta=True, settings=_settings())
    m = _manifest(local_url, 2)
    blob = m.tensors["w"].shards[0].blob
    assert len(blob.chunks) > 3 and all(c.base for c in blob.chunks)
    want = states[2]["w"].numpy().view(np.uint8).reshape(200, -1)
    reader = BlobReader(Repository.open(local_url))
    for a, b in [(0, 1), (5, 77), (31, 32), (100, 200), (0, 200)]:  # boxes across chunks
        got = reader.read_rows(blob, a, b, "w").reshape(b - a, -1)
        assert np.array_equal(got, want[a:b]), (a, b)
    # a load into a template of another dtype (a resharded plan reads sub-boxes per chunk)
    out = {"w": torch.zeros(200, 128, dtype=torch.float64), "frozen": torch.zeros(32, 128)}
    ckptstore.load(out, local_url, step=2)
    assert torch.equal(out["w"], states[2]["w"].double())


def test_resharded_save_finds_its_parent_rows(local_url):
    """A save whose shards differ from the parent's still deltas the chunks whose global
    rows line up (the row grid is global)."""
    states = list(_walk(3, 2, rows=256))
    ckptstore.save(states[0], local_url, step=0, delta=True, settings=_settings())
    # the same tensor saved as two row shards (as two ranks would), through the store API
    from ckptstore.store.blobs import BlobWriter, ChunkIndex
    from ckptstore.store.manifest import Shard, TensorEntry
    from ckptstore.store.session import SaveSession

    repo = Repository.open(local_url, settings=_settings())
    w = states[1]["w"]
    pipe = Pipeline.from_config(_manifest(local_url, 0).tensors["w"].shards[0].blob.codec)
    with SaveSession(repo, layout.step_name(1), step=1).begin() as session:
        shards = []
        for lo, hi in [(0, 128), (128, 256)]:
            index = session.index_for([("w", [lo, 0], [hi - lo, 128])])
            bases = index.bases_for("w", [lo, 0], [hi - lo, 128], pipe.spec)
            with BlobWriter(repo, ChunkIndex(repo, index.sizes())) as writer:
                raw = w[lo:hi].contiguous().numpy()
                blob = writer.submit(raw, pipe, rows=hi - lo, first_row=lo, bases=bases).result()
            shards.append(Shard([lo, 0], [hi - lo, 128], blob))
        parent = _manifest(local_url, 0)
        m = Manifest(
            name=layout.step_name(1),
            step=1,
            created=parent.created + 1,
            tensors={
                "w": TensorEntry("float32", [256, 128], shards),
                "frozen": parent.tensors["frozen"],
            },
            objects={},
        )
        session.commit(m)
    assert _chains(_manifest(local_url, 1), "w") == [1] * 8  # 256 rows of 512 B, 32 a chunk
    assert torch.equal(ckptstore.load_full(local_url, step=1)["w"], w)


def _root_and_child(url: str) -> tuple[bytes, bytes]:
    """(root key, delta key) of the first chunk of 'w' in checkpoint 1."""
    ref = _manifest(url, 1).tensors["w"].shards[0].blob.chunks[0]
    assert len(ref.base) == 1
    return ref.base[0], ref.key


def _two(url: str) -> None:
    for step, sd in enumerate(_walk(4, 2)):
        ckptstore.save(sd, url, step=step, delta=True, settings=_settings())


def test_missing_base_names_both_keys(local_url):
    _two(local_url)
    root, child = _root_and_child(local_url)
    Repository.open(local_url).backend.delete(layout.chunk_key(root.hex()))
    with pytest.raises(errors.CorruptChunkError) as info:
        ckptstore.load_full(local_url, step=1)
    assert root.hex() in str(info.value) and child.hex() in str(info.value)
    assert "missing" in str(info.value)
    report = reports.verify(Repository.open(local_url))
    assert not report.ok
    assert any(child.hex() in p.chunk or child.hex() in p.message for p in report.problems)
    assert any(root.hex() in p.message for p in report.problems)


@pytest.mark.parametrize("damage", ["flip", "swap"])
def test_corrupt_base_names_both_keys(local_url, damage):
    _two(local_url)
    root, child = _root_and_child(local_url)
    backend = Repository.open(local_url).backend
    path = layout.chunk_key(root.hex())
    if damage == "flip":
        data = bytearray(backend.get(path))
        data[-1] ^= 0x40
    else:  # a valid object of the same size, other content: only the key check sees it
        other = _manifest(local_url, 1).tensors["w"].shards[0].blob.chunks[1].base[0]
        data = bytearray(backend.get(layout.chunk_key(other.hex())))
    backend.put(path, bytes(data))
    with pytest.raises(errors.CorruptChunkError) as info:
        ckptstore.load_full(local_url, step=1)
    assert root.hex() in str(info.value) and child.hex() in str(info.value)
    assert not reports.verify(Repository.open(local_url), layout.step_name(1)).ok


def test_gc_keeps_the_bases_of_live_checkpoints(store_url):
    states = list(_walk(5, 3))
    for step, sd in enumerate(states):
        ckptstore.save(sd, store_url, step=step, delta=True, settings=_settings())
    root, _ = _root_and_child(store_url)
    store = ckptstore.Store(store_url)
    store.delete(step=0)
    store.delete(step=1)
    PROCESS_DELTA_STATE.bases.clear()
    ckptstore.Store(store_url).gc(grace=0)
    repo = Repository.open(store_url)
    assert repo.backend.exists(layout.chunk_key(root.hex()))  # step 2's chain needs it
    assert torch.equal(ckptstore.load_full(store_url, step=2)["w"], states[2]["w"])
    assert reports.verify(repo).ok
    m = _manifest(store_url, 2)
    kept = {layout.chunk_digest(k) for k in repo.backend.list(layout.CHUNKS)}
    assert kept == m.chunk_keys()  # exactly the chunks and bases of the one left
    store.delete(step=2)
    ckptstore.Store(store_url).gc(grace=0)
    assert repo.backend.list(layout.CHUNKS) == []


def test_quantized_tensors_never_delta(local_url):
    for step, sd in enumerate(_walk(6, 3, rows=256)):
        sd["q"] = sd["w"].clone()
        ckptstore.save(
            sd,
            local_url,
            step=step,
            delta={"w": True, "q": True},
            quantize={"q": "bf16"},
            settings=_settings(),
        )
    m = _manifest(local_url, 2)
    assert _chains(m, "q") == [0] * len(_chains(m, "q"))
    assert max(_chains(m, "w")) == 2
    # a pattern map chooses tensors; no match, no delta
    ckptstore.save(
        next(iter(_walk(6, 1, rows=256))), local_url, step=3, delta={"x*": True},
        settings=_settings(),
    )  # fmt: skip
    assert _manifest(local_url, 3).max_chain == 0


def test_delta_policy_rejects_bad_specs():
    from ckptstore.codecs.policy import DeltaPolicy

    with pytest.raises(TypeError):
        DeltaPolicy("yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DeltaPolicy({"w": "bf16"})  # type: ignore[dict-item]


def test_unchanged_delta_chunk_is_reused(local_url):
    states = list(_walk(7, 2))
    ckptstore.save(states[0], local_url, step=0, delta=True, settings=_settings())
    ckptstore.save(states[1], local_url, step=1, delta=True, settings=_settings())
    PROCESS_DELTA_STATE.bases.clear()
    ckptstore.save(states[1], local_url, step=2, delta=True, settings=_settings())
    a, b = _manifest(local_url, 1), _manifest(local_url, 2)
    assert [c.key for c in b.tensors["w"].shards[0].blob.chunks] == [
        c.key for c in a.tensors["w"].shards[0].blob.chunks
    ]
    assert b.new_chunk_count == 0 and b.max_chain == 1


def test_catalog_shows_the_delta_share(local_url):
    _two(local_url)
    rows = {s.name: s for s in ckptstore.Store(local_url).list()}
    s1 = rows[layout.step_name(1)]
    assert s1.delta_bytes > 0 and s1.max_chain == 1
    assert rows[layout.step_name(0)].delta_bytes == 0
    report = reports.inspect(Repository.open(local_url), layout.step_name(1))
    w = next(t for t in report.tensors if t.fqn == "w")
    assert w.delta_bytes == w.stored_bytes and w.max_chain == 1


def test_du_counts_bases_as_used_and_shows_the_delta_share(local_url):
    from ckptstore.store import usage

    _two(local_url)
    ckptstore.Store(local_url).delete(step=0)
    report = usage.du(Repository.open(local_url))
    assert report.garbage_chunks == 0 and report.missing_chunks == 0  # the bases are used
    (c,) = report.checkpoints
    assert c.delta_bytes > 0 and c.max_chain == 1
    assert c.unique_bytes > c.stored_bytes - c.delta_bytes  # its bases are its alone now


def test_import_delta_cli(tmp_path):
    from safetensors.torch import save_file

    from tests.helpers import run_cli

    url = str(tmp_path / "s")
    files = []
    for i, sd in enumerate(_walk(8, 2, rows=256)):
        path = str(tmp_path / f"w{i}.safetensors")
        save_file({"w": sd["w"].contiguous()}, path)
        files.append((path, sd["w"]))
    run_cli("import", files[0][0], url, "--step", "0", "--delta")
    out = run_cli("import", files[1][0], url, "--step", "1", "--delta", "--json")
    assert '"delta": true' in out.stdout
    m = _manifest(url, 1)
    assert m.max_chain == 1 and m.delta_chunk_bytes > 0
    assert torch.equal(ckptstore.load_full(url, step=1)["w"], files[1][1])


def test_async_save_with_delta(local_url):
    states = list(_walk(9, 2))
    for step, sd in enumerate(states):
        ckptstore.async_save(sd, local_url, step=step, delta=True, settings=_settings()).result()
    assert _manifest(local_url, 1).max_chain == 1
    assert torch.equal(ckptstore.load_full(local_url, step=1)["w"], states[1]["w"])


def test_catalog_keys_old_and_new():
    import re

    from ckptstore.store import catalog

    s = catalog.CheckpointSummary("a", 1, 1.5, 10, 8, 8, 1, 0, 0.1, 1, 1, 5)
    old_key = catalog.entry_key(s)
    assert not old_key.endswith(".k0") and catalog.parse_entry_key(old_key) == s
    s.delta_bytes, s.max_chain = 6, 2
    new_key = catalog.entry_key(s)
    assert new_key.endswith(".x6.k2") and catalog.parse_entry_key(new_key) == s
    # the pattern of readers that predate delta does not match it: they read the manifest
    before = re.compile(
        r"^([A-Za-z0-9][A-Za-z0-9._-]{0,199})/(\d{16})\."
        r"s(n|\d+)\.t(\d+)\.o(\d+)\.l(\d+)\.b(\d+)\.w(\d+)\.c(\d+)\.n(\d+)\.m(\d+)\.d(\d+)$"
    )
    assert before.match(old_key[len(layout.CATALOG) + 1 :])
    assert not before.match(new_key[len(layout.CATALOG) + 1 :])


def test_ls_and_inspect_show_delta_columns(local_url):
    from tests.helpers import run_cli

    _two(local_url)
    out = run_cli("ls", local_url).stdout
    assert "delta" in out and "chain" in out
    out = run_cli("inspect", local_url, "--step", "1").stdout
    assert "delta" in out and "100%" in out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_distributed_delta_saves_and_a_resharded_delta_save(tmp_path):
    """Two ranks save deltas of their shards; one rank then saves against that parent: the
    row-sharded tensor's chunks line up on the global row grid and stay deltas."""
    from tests import dist_workers as w

    url = str(tmp_path / "store")
    w.spawn(w.delta_worker, 2, url, [1, 2])
    w.spawn(w.delta_worker, 1, url, [3])
    g = w.global_tensors()
    for step in (1, 2, 3):
        full = ckptstore.load_full(url, step=step)
        assert torch.equal(full["big"], g["big"] * (1 + 1e-3 * step))
        assert torch.equal(full["col"], g["col"] + 1e-4 * step)
    m2, m3 = _manifest(url, 2), _manifest(url, 3)
    assert len(m2.tensors["big"].shards) == 2 and min(_chains(m2, "big")) == 1
    assert len(m3.tensors["big"].shards) == 1 and min(_chains(m3, "big")) == 2  # resharded
    assert max(_chains(m3, "col")) == 0  # column shards: another box, no base
    assert reports.verify(Repository.open(url)).ok


def test_raw_cache_never_reuses_memory_someone_holds():
    cache = RawCache()
    cache.put(b"a" * 16, np.arange(100, dtype=np.uint8), 200)
    held = cache.get(b"a" * 16)  # a writer XORing with this base right now
    cache.put(b"b" * 16, np.zeros(100, np.uint8), 150)  # evicts it
    assert held is not None and held[5] == 5 and cache.get(b"a" * 16) is None
    del held
    first = cache.get(b"b" * 16)
    assert first is not None
    where = first.ctypes.data
    del first
    cache.put(b"c" * 16, np.full(100, 7, np.uint8), 150)  # nobody holds b: memory reused
    got = cache.get(b"c" * 16)
    assert got is not None and got.ctypes.data == where and got[0] == 7 and cache.nbytes == 100


def test_a_delta_that_loses_is_not_stored(local_url):
    """Content unrelated to the parent's: the delta is larger, so every chunk stays
    standalone, also on the saves after, which skip the try."""
    for step in range(5):
        sd = {"w": torch.randn(96, 128, generator=torch.Generator().manual_seed(100 + step))}
        ckptstore.save(sd, local_url, step=step, delta=True, settings=_settings())
        assert _manifest(local_url, step).max_chain == 0
        assert torch.equal(ckptstore.load_full(local_url, step=step)["w"], sd["w"])


@pytest.mark.parametrize(
    ("loss", "rules", "tries"),
    [(1.05, RULES, [1, 3, 7]), (1.2, RULES, [1, 5]), (1.2, EXACT_RULES, list(range(1, 9)))],
)
def test_losing_rows_skip_their_tries(local_url, monkeypatch, loss, rules, tries):
    """Rows whose delta loses are tried less often: a first near miss skips one save, a
    second loss (or a wide one) three — so rows that always lose (Adam's exp_avg far apart)
    are not encoded twice at every save. The exact rules (the bench's ``--exact``) try at
    every save."""
    calls: list[int] = []
    real = delta_choice.encode_delta

    def losing(tail, piece, base):  # a real delta, padded to lose by ``loss``
        calls.append(step)
        payload = real(tail, piece, base)
        return payload + bytes(int(loss * len(tail.encode(piece))) - len(payload) + 1)

    monkeypatch.setattr(delta_choice, "encode_delta", losing)
    monkeypatch.setattr(PROCESS_DELTA_STATE, "rules", rules)
    states = list(_walk(11, 9))
    for step, sd in enumerate(states):
        ckptstore.save({"w": sd["w"]}, local_url, step=step, delta=True, settings=_settings())
        assert _manifest(local_url, step).max_chain == 0
    chunks = len(_chains(_manifest(local_url, 0), "w"))
    assert sorted(set(calls)) == tries and len(calls) == chunks * len(tries)


def test_a_writer_handed_its_own_delta_state_leaves_the_process_state_alone(local_url):
    """The delta state is an explicit object: a writer given one remembers bases and sizes
    there, the process's stays empty, and clear() forgets both."""
    from ckptstore.store.blobs import BlobWriter, ChunkIndex
    from ckptstore.store.session import SaveSession

    states = list(_walk(12, 2))
    ckptstore.save(states[0], local_url, step=0, delta=True, settings=_settings())
    PROCESS_DELTA_STATE.clear()
    mine = DeltaState()
    repo = Repository.open(local_url, settings=_settings())
    pipe = Pipeline.from_config(_manifest(local_url, 0).tensors["w"].shards[0].blob.codec)
    with SaveSession(repo, layout.step_name(1), step=1).begin() as session:
        index = session.index_for([("w", [0, 0], [96, 128])])
        bases = index.bases_for("w", [0, 0], [96, 128], pipe.spec)
        with BlobWriter(repo, ChunkIndex(repo, index.sizes()), delta_state=mine) as writer:
            raw = states[1]["w"].numpy()
            blob = writer.submit(raw, pipe, rows=96, bases=bases).result()
    assert all(c.base for c in blob.chunks) and writer.delta_chunks == len(blob.chunks)
    assert len(mine.sizes) == len(blob.chunks) and mine.bases.nbytes > 0
    assert len(PROCESS_DELTA_STATE.sizes) == 0 and PROCESS_DELTA_STATE.bases.nbytes == 0
    mine.clear()
    assert len(mine.sizes) == 0 and mine.bases.nbytes == 0


def _special(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Floats with every awkward value: ±0, ±inf, NaNs with payloads, subnormals, the
    largest finite values and sign flips — the bits a difference must carry exactly."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g).to(dtype)
    info = torch.finfo(dtype)
    t[:8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), info.max, -info.max,
                          info.tiny / 4, -info.tiny / 2]).to(dtype)  # fmt: skip
    bits = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    bits[8:12] = bits[8:12] | bits.new_tensor(-1).bitwise_right_shift(1).bitwise_xor(
        bits.new_tensor(-1).bitwise_right_shift(8)
    )  # exponent all ones: NaNs with four different payloads
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_float_bit_pattern_survives_the_difference(local_url, dtype):
    """Consecutive checkpoints whose elements jump between special values, flip sign and
    wrap around (the ordered-integer difference is modulo 2^bits) load back bit for bit."""
    first = _special(dtype, 32768, 0)  # (several chunks at every width; none inline)
    second = first * 1.01  # mostly small steps: deltas win
    second[:12] = first[:12].flip(0)  # ±0 ↔ NaN, inf ↔ subnormal, max ↔ -max: wrap-arounds
    second[100:200] = -first[100:200]  # sign flips
    third = second * 0.99
    third[:12] = _special(dtype, 12, 1)
    for step, t in enumerate([first, second, third]):
        ckptstore.save({"t": t}, local_url, step=step, delta=True, settings=_settings())
    assert max(_chains(_manifest(local_url, 2), "t")) >= 1  # some chunks were deltas
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[first.element_size()]
    for step, t in enumerate([first, second, third]):
        got = ckptstore.load_full(local_url, step=step)["t"]
        assert torch.equal(got.view(ints), t.view(ints)), step
    assert reports.verify(Repository.open(local_url)).ok


def test_float_deltas_are_differences_and_beat_xor():
    """On a slow random walk the ordered-integer difference is smaller than XOR (what
    store/delta.py is for), and other element types keep XOR."""
    from ckptstore.codecs.pipeline import default_pipeline
    from ckptstore.store.delta import OP_SPARSE, OP_XOR, encode_delta

    a, b = list(_walk(3, 2))
    raw_a, raw_b = a["w"].numpy().tobytes(), b["w"].numpy().tobytes()
    pipe = default_pipeline("float32")
    payload = encode_delta(pipe, raw_b, raw_a)
    xor = np.bitwise_xor(np.frombuffer(raw_a, np.uint8), np.frombuffer(raw_b, np.uint8))
    assert payload[0] == OP_SPARSE
    assert len(payload) < len(pipe.encode(xor))
    ints = default_pipeline("int64")
    assert encode_delta(ints, bytes(800), bytes(range(200)) * 4)[0] == OP_XOR


def _sub_payload(pipe: Pipeline, raw: bytes, base: bytes) -> bytes:
    """The ``OP_SUB`` payload (delta format v2, without sparse planes) of ``raw``."""
    from ckptstore.store import delta

    keep = delta._sparse_coder
    delta._sparse_coder = lambda _pipe: None
    try:
        return delta.encode_delta(pipe, raw, np.frombuffer(base, np.uint8))
    finally:
        delta._sparse_coder = keep


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_sparse_planes_are_smaller_and_sub_payloads_still_decode(dtype):
    """Mostly-zero byte planes of the difference go as bitmap + non-zero bytes (OP_SPARSE):
    fewer bytes than the same difference as plain planes (OP_SUB), which still decodes —
    both to the same bytes and the same key."""
    from ckptstore.codecs.pipeline import default_pipeline
    from ckptstore.store.delta import OP_SPARSE, OP_SUB, apply_delta, encode_delta

    tdtype = getattr(torch, dtype)
    a, b = (sd["w"] for sd in _walk(7, 2, tdtype, rows=1000))  # (an odd plane length)
    raw_a, raw_b = a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    raw_a, raw_b = raw_a.numpy().tobytes(), raw_b.numpy().tobytes()
    pipe = default_pipeline(dtype)
    sparse = encode_delta(pipe, raw_b, np.frombuffer(raw_a, np.uint8))
    sub = _sub_payload(pipe, raw_b, raw_a)
    assert sparse[0] == OP_SPARSE and sub[0] == OP_SUB
    assert len(sparse) <= len(sub) + 1  # a plane goes sparse only when that is smaller
    if dtype in ("bfloat16", "float32"):  # where this walk leaves mostly-zero planes
        assert sparse[1] and len(sparse) < 0.98 * len(sub)
    keys = set()
    for payload in (sparse, sub):
        acc = np.frombuffer(raw_a, np.uint8).copy()
        keys.add(apply_delta(pipe, payload, acc, b"b" * 16))
        assert acc.tobytes() == raw_b
    assert len(keys) == 1


def test_sparse_planes_at_the_edges():
    """Every plane sparse (a tenth of the elements replaced), a plane length that is not a
    multiple of 8, a sparse plane with no non-zero byte at all, and a difference too small
    for a bitmap to pay its segment header all round-trip."""
    from ckptstore.codecs.pipeline import default_pipeline
    from ckptstore.codecs.zstd import Zstd
    from ckptstore.store.delta import OP_SPARSE, apply_delta, encode_delta

    pipe = default_pipeline("float32")
    rng = np.random.default_rng(0)
    base = np.linspace(-1, 1, 100_003, dtype=np.float32)
    scattered = base.copy()
    where = rng.random(base.size) < 0.1
    scattered[where] = rng.standard_normal(int(where.sum())).astype(np.float32)
    one_flip = base.copy()
    one_flip[17] = -one_flip[17]
    for new, mask in ((scattered, 0b1111), (one_flip, 0), (base[:6] + 1, 0)):
        old = base[: new.size]
        payload = encode_delta(pipe, new.tobytes(), old.view(np.uint8))
        acc = old.view(np.uint8).copy()
        apply_delta(pipe, payload, acc, b"b" * 16)
        assert acc.tobytes() == new.tobytes() and payload[1] == mask
    zero = np.zeros(1001, np.uint8)
    empty = Zstd(entropy=True).encode_segments([zero, zero, zero, zero[:126], zero[:0]])
    acc = np.full(4 * 1001, 7, np.uint8)
    apply_delta(pipe, bytes([OP_SPARSE, 0b1000]) + empty, acc, b"b" * 16)
    assert (acc == 7).all()  # a zero difference everywhere


def test_malformed_sparse_payloads_are_codec_errors():
    """Every inconsistency of a sparse payload is a CodecError naming it, never garbage or
    an allocation much larger than the chunk."""
    from ckptstore.codecs.pipeline import default_pipeline
    from ckptstore.codecs.zstd import Zstd
    from ckptstore.store.delta import OP_SPARSE, apply_delta

    pipe = default_pipeline("float32")
    n = 1000  # elements; 4 planes of 1000 bytes, bitmaps of 125
    zero, ones = np.zeros(n, np.uint8), np.ones(n, np.uint8)
    bitmap, coder = np.packbits(ones.astype(bool), bitorder="little"), Zstd(entropy=True)

    def payload(mask: int, streams: list) -> bytes:
        return bytes([OP_SPARSE, mask]) + coder.encode_segments(streams)

    good = payload(0b1000, [zero, zero, zero, bitmap, ones])
    acc = np.zeros(4 * n, np.uint8)
    apply_delta(pipe, good, acc, b"b" * 16)  # the well-formed one decodes
    cases = {
        "valid plane mask": bytes([OP_SPARSE, 0x10]) + good[2:],
        "2 streams, expected 4": payload(0, [zero, zero]),
        "plane 1 holds 999 bytes": payload(0, [zero, zero[:999], zero, zero]),
        "bitmap 3 of 124 bytes": payload(0b1000, [zero, zero, zero, bitmap[:124], ones]),
        "marks 1000 non-zero bytes but holds 999": payload(
            0b1000, [zero, zero, zero, bitmap, ones[:999]]
        ),
        "a zstd bomb": payload(0b1000, [zero, zero, zero, bitmap, np.ones(9000, np.uint8)]),
        "without a valid plane mask": bytes([OP_SPARSE]),
    }
    zeros_listed = ones.copy()
    zeros_listed[5] = 0
    cases["lists a zero byte"] = payload(0b1000, [zero, zero, zero, bitmap, zeros_listed])
    for why, bad in cases.items():
        with pytest.raises(errors.CodecError, match=why):
            apply_delta(pipe, bad, np.zeros(4 * n, np.uint8), b"b" * 16)
    odd = np.ones(1001, np.uint8)  # a plane of 1001 bytes: 7 padding bits in its bitmap
    padded = np.packbits(odd.astype(bool), bitorder="little")
    z1001 = np.zeros(1001, np.uint8)
    ok = payload(0b1000, [z1001, z1001, z1001, padded, odd])
    apply_delta(pipe, ok, np.zeros(4 * 1001, np.uint8), b"b" * 16)
    padded[-1] |= 0x80
    with pytest.raises(errors.CodecError, match="sets bits past the plane's 1001 bytes"):
        apply_delta(pipe, payload(0b1000, [z1001, z1001, z1001, padded, odd]),
                    np.zeros(4 * 1001, np.uint8), b"b" * 16)  # fmt: skip
    with pytest.raises(errors.CodecError, match="ordered-integer delta under"):
        apply_delta(default_pipeline("int32"), good, np.zeros(4 * n, np.uint8), b"b" * 16)


def test_first_format_xor_payloads_still_decode():
    """A delta payload without an op byte is the first format's XOR under the chain, with
    its key in the old domain; an unknown op is an error, not garbage."""
    from ckptstore.codecs.pipeline import default_pipeline
    from ckptstore.store.delta import apply_delta, delta_key

    pipe = default_pipeline("float32")
    base = np.arange(4096, dtype=np.float32).view(np.uint8)
    new = (np.arange(4096, dtype=np.float32) * 1.01).view(np.uint8)
    legacy = bytes(pipe.encode(np.bitwise_xor(base, new)))
    acc = base.copy()
    key = apply_delta(pipe, legacy, acc, b"b" * 16)
    assert acc.tobytes() == new.tobytes()
    assert key == delta_key(pipe, b"b" * 16, new, legacy=True) != delta_key(pipe, b"b" * 16, new)
    with pytest.raises(errors.CodecError, match="unknown delta op 0xff"):
        apply_delta(pipe, b"\xff" + legacy, base.copy(), b"b" * 16)


def test_save_info_carries_the_delta_figures(local_url):
    """SaveInfo (sync and async) says how much of the checkpoint is deltas and how long its
    chains are — the same figures as ls."""
    a, b, c = _walk(6, 3)
    first = ckptstore.save(a, local_url, step=0, delta=True, settings=_settings())
    assert first.delta_bytes == 0 and first.max_chain == 0
    second = ckptstore.save(b, local_url, step=1, delta=True, settings=_settings())
    third = ckptstore.async_save(c, local_url, step=2, delta=True, settings=_settings()).result()
    rows = {s.name: s for s in ckptstore.Store(local_url).list()}
    for info, chain in ((second, 1), (third, 2)):
        assert info.max_chain == chain and 0 < info.delta_bytes < info.stored_bytes
        assert (info.delta_bytes, info.max_chain) == (
            rows[info.name].delta_bytes,
            rows[info.name].max_chain,
        )


def test_delta_chains_on_s3(s3_url, s3_options):
    """Delta saves and chain decoding against a real S3 server (SeaweedFS on loopback),
    with a cold base cache so bases are read back from the bucket, and verify."""
    states = list(_walk(7, K + 2))
    for step, sd in enumerate(states):
        PROCESS_DELTA_STATE.bases.clear()
        info = ckptstore.save(
            sd, s3_url, step=step, delta=True, settings=_settings(), storage_options=s3_options
        )
        assert info.max_chain <= K and (step > K or info.max_chain == step), step
    PROCESS_DELTA_STATE.bases.clear()
    for step, sd in enumerate(states):
        got = ckptstore.load_full(s3_url, step=step, storage_options=s3_options)
        assert torch.equal(got["w"], sd["w"]), step
    assert reports.verify(Repository.open(s3_url, s3_options)).ok
