"""du and diff figures against states whose answer is known; export → import round trips."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import ckptstore
from ckptstore import errors, transfer
from ckptstore.store import Repository, layout
from tests.helpers import assert_same

CHUNK = 64 * 1024


def _t(seed: int, rows: int, cols: int = 1024, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(dtype)


def _save(state, url, step=None, name=None, **kw):
    return ckptstore.save(state, url, step=step, name=name, chunk_bytes=CHUNK, **kw)


def _disk_bytes(root: str) -> int:
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
        if f != "store.json"
    )


def _chunk_bytes(m, fqn: str) -> int:
    return sum(c.stored for s in m.tensors[fqn].shards for c in s.blob.chunks)


# -- du ----------------------------------------------------------------------------------------
def test_du_figures(local_url):
    frozen = _t(1, 256)  # 16 chunks shared by all
    states = [
        {"frozen": frozen, "head": _t(10 + i, 64), "bias": torch.ones(8) * i} for i in range(3)
    ]
    for i, st in enumerate(states):
        _save(st, local_url, step=i)
    repo = Repository.open(local_url)
    ms = repo.manifests()
    r = ckptstore.Store(local_url).du()
    assert [c.name for c in r.checkpoints] == [m.name for m in ms]
    assert r.logical_bytes == 3 * (256 + 64) * 1024 * 4 + 3 * 8 * 4
    assert r.physical_bytes == _disk_bytes(local_url) == r.unique_bytes  # no garbage yet
    assert r.unique_chunks == 16 + 3 * 4
    assert r.referenced_bytes == sum(m.chunk_bytes + m.manifest_bytes for m in ms)
    for c, m in zip(r.checkpoints, ms, strict=True):
        assert c.unique_bytes == _chunk_bytes(m, "head") + m.manifest_bytes  # frozen is shared
        assert c.logical_bytes == m.logical_bytes
    assert r.checkpoints[0].new_bytes > r.checkpoints[1].new_bytes  # the first wrote frozen
    assert r.dedup_factor == pytest.approx(r.referenced_bytes / r.unique_bytes)
    assert r.dedup_factor == pytest.approx(60 / 28, rel=0.02)  # 3 × 20 chunks in 28
    assert r.compression_factor == pytest.approx(r.logical_bytes / r.referenced_bytes)
    assert r.garbage_chunks == r.garbage_bytes == r.trash_entries == r.missing_chunks == 0
    # removing one turns exactly its unique chunks into garbage (held in the trash entry)
    ckptstore.Store(local_url).delete(step=1)
    r2 = ckptstore.Store(local_url).du()
    assert r2.garbage_chunks == 4 and r2.garbage_bytes == _chunk_bytes(ms[1], "head")
    assert r2.trash_entries == 1 and r2.trash_bytes == ms[1].manifest_bytes
    assert r2.physical_bytes == _disk_bytes(local_url)
    ckptstore.Store(local_url).gc(grace=0)
    r3 = ckptstore.Store(local_url).du()
    assert r3.garbage_chunks == r3.trash_entries == 0
    assert r3.physical_bytes == r3.unique_bytes == _disk_bytes(local_url)


# -- diff --------------------------------------------------------------------------------------
def test_diff_figures(store_url):
    a = {
        "same": _t(1, 64),
        "changed": _t(2, 64),
        "gone": _t(3, 64),
        "partly": _t(4, 128),  # 8 chunks
        "small": torch.zeros(16),  # inline
        "meta": 1,
    }
    b = dict(a)
    del b["gone"]
    b["changed"] = _t(20, 64)
    b["partly"] = a["partly"].clone()
    b["partly"][40] += 1  # rows 32..47: chunk 2 of 8
    b["small"] = torch.ones(16)
    b["new"] = _t(5, 32)
    _save(a, store_url, step=1)
    _save(b, store_url, step=2)
    r = ckptstore.Store(store_url).diff(1, 2)
    assert (r.a, r.b) == (layout.step_name(1), layout.step_name(2))
    assert r.added == ["new"] and r.removed == ["gone"]
    assert sorted(r.unchanged) == ["meta", "same"]
    changed = {c.fqn: c for c in r.changed}
    assert sorted(changed) == ["changed", "partly", "small"]
    assert (changed["partly"].chunks, changed["partly"].chunks_changed) == (8, 1)
    assert (changed["changed"].chunks, changed["changed"].chunks_changed) == (4, 4)
    repo = Repository.open(store_url)
    ma, mb = repo.manifest(r.a), repo.manifest(r.b)
    a_keys = ma.chunk_keys()
    b_chunks = {c.key: c.stored for _, bl in mb.blobs() for c in bl.chunks}
    new_inline = len(mb.tensors["small"].shards[0].blob.inline)
    assert r.shared_bytes == sum(n for k, n in b_chunks.items() if k in a_keys)
    assert r.new_bytes == sum(n for k, n in b_chunks.items() if k not in a_keys) + new_inline
    assert changed["partly"].new_bytes == mb.tensors["partly"].shards[0].blob.chunks[2].stored
    assert r.b_stored_bytes == sum(b_chunks.values()) + mb.manifest_bytes
    assert ckptstore.Store(store_url).diff(2, 2).changed == []
    with pytest.raises(errors.CheckpointNotFoundError):
        ckptstore.Store(store_url).diff(1, 3)


# -- export / import ---------------------------------------------------------------------------
def _mixed_state() -> dict:
    return {
        "model": {
            "w": _t(1, 300, 200),
            "half": _t(2, 100, 100, torch.bfloat16),
            "ids": torch.arange(5000, dtype=torch.int64),
            "mask": torch.rand(70, 70) > 0.5,
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4),
        },
        "epoch": 7,
    }


def _flat(state: dict) -> dict:
    return {f"model.{k}": v for k, v in state["model"].items()}


def test_export_safetensors_import_roundtrip_exact(local_url, tmp_path):
    from safetensors.torch import load_file

    state = _mixed_state()
    _save(state, local_url, step=5)
    out = str(tmp_path / "m.safetensors")
    summary = transfer.export_checkpoint(local_url, out, step=5)
    assert summary.tensors == 6 and summary.skipped_objects == 1 and summary.format == "safetensors"
    assert summary.file_bytes == os.path.getsize(out) and sorted(os.listdir(tmp_path)) == [
        "m.safetensors",
        "store",
    ]
    assert_same(_flat(state), dict(load_file(out)))  # the package reads what we wrote
    # import into a fresh store, then export again: the same bytes
    other = str(tmp_path / "other")
    weights, dropped = transfer.read_weights(out)
    assert dropped == 0
    ckptstore.save(weights, other, step=5)
    assert_same(_flat(state), ckptstore.load_full(other, step=5))
    again = str(tmp_path / "again.safetensors")
    transfer.export_checkpoint(ckptstore.Store(other), again, step=5)
    assert open(out, "rb").read() == open(again, "rb").read()


def test_export_prefix_dtype_and_pt(local_url, tmp_path):
    from safetensors.torch import load_file

    state = _mixed_state()
    _save(state, local_url, step=1)
    out = str(tmp_path / "bf16.safetensors")
    transfer.export_checkpoint(local_url, out, step=1, dtype="bf16", prefix="model.")
    got = load_file(out)
    assert sorted(got) == sorted(state["model"])
    assert torch.equal(got["w"], state["model"]["w"].to(torch.bfloat16))
    assert got["ids"].dtype == torch.int64 and torch.equal(got["ids"], state["model"]["ids"])
    assert got["mask"].dtype == torch.bool
    pt = str(tmp_path / "m.pt")
    transfer.export_checkpoint(local_url, pt)  # the latest
    assert_same(_flat(state), torch.load(pt, weights_only=True))
    with pytest.raises(ValueError, match="no tensor"):
        transfer.export_checkpoint(local_url, out, prefix="nothing.")
    with pytest.raises(ValueError, match="format"):
        transfer.export_checkpoint(local_url, str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match="dtype"):
        transfer.export_checkpoint(local_url, out, dtype="int4")


def test_export_dequantizes(local_url, tmp_path):
    from safetensors.torch import load_file

    w = _t(3, 512, 256)
    _save({"w": w}, local_url, step=1, quantize="int8")
    out = str(tmp_path / "q.safetensors")
    transfer.export_checkpoint(local_url, out, step=1)
    got = load_file(out)["w"]
    assert got.dtype == torch.float32
    assert torch.equal(got, ckptstore.load_full(local_url, step=1)["w"])  # what load gives
    assert 0 < (got - w).norm() / w.norm() < 0.02


def test_import_weights(tmp_path):
    from safetensors.torch import save_file

    src = str(tmp_path / "w.safetensors")
    save_file({"w": _t(4, 64, 32), "b": torch.ones(32)}, src)
    url = str(tmp_path / "s")
    info = transfer.import_weights(src, url, name="base", prefix="model.", quantize="bf16")
    assert info.name == "base" and info.step is None and info.quantize == "bf16"
    assert info.new_bytes <= info.stored_bytes < info.logical_bytes  # bf16 halves the weight
    got = ckptstore.load_full(url, name="base")
    assert set(got) == {"model.w", "model.b"}  # flat names, as in the file, prefixed
    assert info.to_dict()["file"] == src
    with pytest.raises(ValueError, match="step or a name"):
        transfer.import_weights(src, url)


# -- export leaves nothing behind -------------------------------------------------------------
def _tmp_files(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if ".tmp-" in f)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_export_leaves_nothing(local_url, tmp_path, fmt, existing):
    """Ctrl-C half-way (a KeyboardInterrupt from the progress callback): no temp file, and
    the file a former export wrote at OUT is untouched."""
    _save(_mixed_state(), local_url, step=1)
    folder = tmp_path / "out"
    folder.mkdir()
    out = str(folder / f"m.{fmt}")
    if existing:
        with open(out, "wb") as f:
            f.write(b"an older export")
    seen = []

    def interrupt(done: int, total: int) -> None:
        seen.append(_tmp_files(folder))  # the temp file exists while the export runs
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        transfer.export_checkpoint(local_url, out, progress=interrupt)
    assert len(seen) == 2 and len(seen[0]) == 1
    assert os.listdir(folder) == (["m." + fmt] if existing else [])
    if existing:
        assert open(out, "rb").read() == b"an older export"


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_failed_export_names_the_users_path(local_url, tmp_path, fmt):
    """A write error (here a full disk, raised naming the temp file as open() would) is
    reported with OUT, and the temp file is gone."""
    _save(_mixed_state(), local_url, step=1)
    out = str(tmp_path / f"m.{fmt}")

    def disk_full(done: int, total: int) -> None:
        (tmp,) = _tmp_files(tmp_path)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / tmp))

    with pytest.raises(OSError) as info:
        transfer.export_checkpoint(local_url, out, progress=disk_full)
    assert info.value.errno == errno.ENOSPC and info.value.filename == out
    assert out in str(info.value) and ".tmp-" not in str(info.value)
    assert os.listdir(tmp_path) == ["store"]

    def broken(done: int, total: int) -> None:  # any error whose message names the temp file
        (tmp,) = _tmp_files(tmp_path)
        raise RuntimeError(f"failed writing {tmp_path / tmp}")

    with pytest.raises(RuntimeError, match="failed writing") as info:
        transfer.export_checkpoint(local_url, out, progress=broken)
    assert out in str(info.value) and ".tmp-" not in str(info.value)
    assert os.listdir(tmp_path) == ["store"]


def test_export_to_a_path_that_cannot_be(local_url, tmp_path, monkeypatch):
    _save({"w": torch.ones(4)}, local_url, step=1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("text")
    (tmp_path / "adir").mkdir()
    cases = {
        "afile.txt/out.pt": "cannot write afile.txt/out.pt: afile.txt is a file, not a folder",
        "afile.txt/sub/out.safetensors": "afile.txt is a file, not a folder",
        "missing/out.pt": "cannot write missing/out.pt: folder missing does not exist",
        "adir": "cannot write adir: it is a folder",
    }
    for out, message in cases.items():
        fmt = "pt" if out == "adir" else None
        with pytest.raises(ValueError) as info:
            transfer.export_checkpoint(local_url, out, fmt=fmt)
        assert message in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile.txt", "store"]
    assert os.listdir(tmp_path / "adir") == []


def test_dtype_table_matches_torch_and_safetensors():
    """The one dtype table (codecs.DTYPES): itemsizes are torch's, safetensors codes are the
    package's names for the same dtype; the torch mapping covers every name this torch has."""
    import safetensors.torch as st

    from ckptstore.codecs import DTYPES
    from ckptstore.dcp.bridge import dtype_name, torch_dtype

    for name, info in DTYPES.items():
        dt = getattr(torch, name, None)
        if not isinstance(dt, torch.dtype):
            continue
        assert torch_dtype(name) is dt and dtype_name(dt) == name
        assert info.itemsize == dt.itemsize, name
        assert info.floating == (dt.is_floating_point or dt.is_complex), name
        assert (info.kind == "complex") == dt.is_complex, name
        if info.safetensors is not None and info.safetensors in getattr(st, "_TYPES", {}):
            assert st._TYPES[info.safetensors] is dt, name


def test_read_weights_pt_is_weights_only(tmp_path):
    good = str(tmp_path / "good.bin")
    torch.save({"a": torch.ones(3), "nested": {"b": torch.zeros(2)}, "lr": 0.1}, good)
    weights, dropped = transfer.read_weights(good)
    assert dropped == 1 and set(weights) == {"a", "nested"}

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = str(tmp_path / "bad.pt")
    torch.save({"a": torch.ones(3), "x": Evil()}, bad)
    with pytest.raises(errors.UnsafeObjectError, match="weights-only"):
        transfer.read_weights(bad)
