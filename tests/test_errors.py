"""Every bad input gets a clear error naming what and where, and leaves the store as it was."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType

import ckptstore
from ckptstore import errors
from ckptstore.store import Repository, layout
from tests.helpers import assert_same


@pytest.fixture
def saved(local_url):
    state = {"w": torch.randn(1024, 512), "b": torch.randn(16), "meta": {"epoch": 1}}
    ckptstore.save(state, local_url, step=1, chunk_bytes=1 << 20)
    return local_url, state


def _chunk_paths(url: str) -> list[str]:
    repo = Repository.open(url)
    return [repo.backend.path(k) for k in repo.backend.list(layout.CHUNKS)]


def test_error_tree_subclasses_builtins():
    assert issubclass(errors.ChunkNotFoundError, FileNotFoundError)
    assert issubclass(errors.StoreNotFoundError, FileNotFoundError)
    assert issubclass(errors.CheckpointExistsError, FileExistsError)
    assert issubclass(errors.CorruptChunkError, ValueError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), ckptstore.CkptStoreError)
    assert ckptstore.CkptStoreError is errors.CkptStoreError


def test_unknown_url_scheme():
    with pytest.raises(errors.UnknownSchemeError, match="nosuch"):
        ckptstore.save({"a": torch.ones(2)}, "nosuch://x/y", step=1)
    with pytest.raises(errors.UnknownSchemeError, match="nosuch"):
        ckptstore.load_full("nosuch://x/y")


def test_store_not_found(tmp_path):
    with pytest.raises(errors.StoreNotFoundError, match="store.json"):
        ckptstore.load({"a": torch.ones(2)}, str(tmp_path / "none"))
    with pytest.raises(errors.StoreNotFoundError):
        ckptstore.Store(str(tmp_path / "none"))


def test_checkpoint_not_found(saved):
    url, _ = saved
    with pytest.raises(errors.CheckpointNotFoundError, match="step 7"):
        ckptstore.load_full(url, step=7)
    with pytest.raises(errors.CheckpointNotFoundError, match="nope"):
        ckptstore.load({"w": torch.zeros(1024, 512)}, url, name="nope")


def test_empty_store_has_no_latest(tmp_path):
    Repository.open(str(tmp_path / "s"), create=True)
    with pytest.raises(errors.CheckpointNotFoundError, match="no committed checkpoint"):
        ckptstore.load_full(str(tmp_path / "s"))


def test_checkpoint_exists_is_never_overwritten(saved):
    url, state = saved
    with pytest.raises(errors.CheckpointExistsError, match="step-000000000001"):
        ckptstore.save({"w": torch.zeros(3)}, url, step=1)
    assert_same(state, ckptstore.load_full(url, step=1))


def test_invalid_names():
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        ckptstore.Writer("memory://x", name="../escape")
    with pytest.raises(ValueError, match="step= or name="):
        ckptstore.Writer("memory://x")
    with pytest.raises(ValueError, match="non-negative"):
        ckptstore.Writer("memory://x", step=-1)


def test_corrupt_chunk_names_chunk_tensor_and_checkpoint(saved):
    url, _ = saved
    path = _chunk_paths(url)[0]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(errors.CorruptChunkError) as info:
        ckptstore.load({"w": torch.zeros(1024, 512), "b": torch.zeros(16)}, url)
    msg = str(info.value)
    assert "checksum" in msg and "'w'" in msg and "step-000000000001" in msg
    assert path.rsplit("/", 1)[-1] in msg
    with pytest.raises(errors.CorruptChunkError):
        ckptstore.load_full(url)


def test_truncated_chunk(saved):
    url, _ = saved
    path = _chunk_paths(url)[1]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    with pytest.raises(errors.CorruptChunkError, match="'w'"):
        ckptstore.load_full(url)


def test_missing_chunk(saved):
    url, _ = saved
    path = _chunk_paths(url)[0]
    import os

    os.unlink(path)
    with pytest.raises(errors.ChunkNotFoundError) as info:
        ckptstore.load({"w": torch.zeros(1024, 512), "b": torch.zeros(16)}, url)
    assert path.rsplit("/", 1)[-1] in str(info.value) and "'w'" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_bad_manifest(saved, damage):
    url, _ = saved
    repo = Repository.open(url)
    path = repo.backend.path(layout.manifest_key("step-000000000001"))
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0x40
    else:
        data = bytearray(b"not a manifest at all")
    open(path, "wb").write(bytes(data))
    with pytest.raises(errors.ManifestError, match="step-000000000001"):
        ckptstore.load_full(url)
    store = ckptstore.Store(url)
    # listing reads no manifest (the catalog entry has the figures); verify reads them all
    assert [c.name for c in store.list()] == ["step-000000000001"]
    report = store.verify()
    assert not report.ok and "step-000000000001" in str(report.problems[0])


def test_unknown_store_format_version(saved):
    url, _ = saved
    repo = Repository.open(url)
    path = repo.backend.path(layout.STORE_JSON)
    cfg = json.load(open(path))
    cfg["version"] = 99
    json.dump(cfg, open(path, "w"))
    with pytest.raises(errors.FormatVersionError, match="version 99"):
        ckptstore.load_full(url)
    with pytest.raises(errors.FormatVersionError):  # and a save does not touch it
        ckptstore.save({"a": torch.ones(2)}, url, step=2)
    assert json.load(open(path))["version"] == 99


def test_unknown_manifest_version_and_codec(saved):
    import msgpack
    import xxhash

    url, _ = saved
    repo = Repository.open(url)
    m = repo.manifest("step-000000000001")

    def rewrite(mutate, name):
        d = m.to_dict()
        mutate(d)
        d["name"] = name
        body = msgpack.packb(d, use_bin_type=True)
        frame = b"CKM1" + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") + body
        repo.backend.put(layout.manifest_key(name), frame)

    rewrite(lambda d: d.update(format=3), "future")
    with pytest.raises(errors.FormatVersionError, match="format version 3"):
        ckptstore.load_full(url, name="future")
    rewrite(lambda d: d["codecs"][0][0].update(id="brotli-9000"), "newcodec")
    with pytest.raises(errors.UnknownCodecError, match="brotli-9000") as info:
        ckptstore.load_full(url, name="newcodec")
    assert "newcodec" in str(info.value) and "tensors['w']" in str(info.value)


def test_shape_mismatch_names_tensor(saved):
    url, _ = saved
    with pytest.raises(errors.MismatchError, match=r"shape mismatch for 'w'.*\[1024, 512\]"):
        ckptstore.load({"w": torch.zeros(1000, 512), "b": torch.zeros(16)}, url)


def test_dtype_mismatch_names_tensor(saved):
    url, _ = saved
    with pytest.raises(errors.MismatchError, match="dtype mismatch for 'w'.*float32.*bfloat16"):
        ckptstore.load({"w": torch.zeros(1024, 512, dtype=torch.bfloat16)}, url, strict_dtype=True)


def test_key_missing_from_checkpoint(saved):
    url, _ = saved
    with pytest.raises(errors.MismatchError, match="'extra'"):
        ckptstore.load({"w": torch.zeros(1024, 512), "extra": torch.zeros(2)}, url)


def test_dtype_mismatch_through_plain_dcp_reader(saved):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    url, _ = saved
    with pytest.raises(CheckpointException, match="dtype mismatch for 'w'"):
        dcp.load(
            {"w": torch.zeros(1024, 512, dtype=torch.float64)},
            storage_reader=ckptstore.Reader(url, strict_dtype=True),
        )


class _Evil:
    def __reduce__(self):
        return (print, ("pwned: code ran from a checkpoint",))


def test_objects_needing_pickle_are_refused(local_url, capsys):
    ckptstore.save({"w": torch.ones(2), "obj": {"evil": _Evil()}}, local_url, step=1)
    capsys.readouterr()
    with pytest.raises(errors.UnsafeObjectError, match="obj"):
        ckptstore.load_full(local_url)
    with pytest.raises(errors.UnsafeObjectError, match="obj"):
        ckptstore.load({"w": torch.zeros(2), "obj": {"evil": None}}, local_url)
    assert "pwned" not in capsys.readouterr().out
    full = ckptstore.load_full(local_url, allow_pickle=True)  # explicit opt-in
    assert "pwned" in capsys.readouterr().out
    assert full["w"].tolist() == [1.0, 1.0]


def test_load_object_accepts_plain_values():
    from ckptstore.dcp import load_object

    buf = io.BytesIO()
    torch.save({"a": [1, 2.0, "x"], "t": torch.ones(2)}, buf)
    assert load_object(buf.getvalue(), "x", False)["a"] == [1, 2.0, "x"]
    with pytest.raises(errors.UnsafeObjectError):
        load_object(pickle.dumps(_Evil()), "x", False)


@pytest.mark.parametrize("damage", ["gap", "nbytes", "box", "codec_index", "renamed"])
def test_manifest_schema_violations_are_refused(saved, damage):
    """A manifest with a valid checksum but inconsistent content is refused, not half-read."""
    import msgpack
    import xxhash

    url, _ = saved
    repo = Repository.open(url)
    d = repo.manifest("step-000000000001").to_dict()
    shard = d["tensors"]["w"]["shards"][0]
    if damage == "gap":
        shard["chunks"][1][1] += 1  # second chunk starts one row late
    elif damage == "nbytes":
        shard["nbytes"] -= 4
    elif damage == "box":
        shard["sizes"][0] += 1
    elif damage == "codec_index":
        shard["codec"] = -1
    else:
        d["name"] = "someone-else"
    body = msgpack.packb(d, use_bin_type=True)
    frame = b"CKM1" + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") + body
    repo.backend.put(layout.manifest_key("bad"), frame)
    with pytest.raises(errors.ManifestError, match="bad"):
        ckptstore.load_full(url, name="bad")
    report = ckptstore.Store(url).verify()
    assert [p.checkpoint for p in report.problems] == ["bad"]
    assert ckptstore.Store(url).verify("step-000000000001").ok


# -- common user mistakes get an error that names what is wrong -----------------------------


def _no_checkpoint_committed(url: str) -> None:
    repo = Repository.open(url)
    assert list(repo.backend.list(layout.CHECKPOINTS)) == []
    assert list(repo.backend.list(layout.LEASES)) == []


def test_unpicklable_value_names_its_key_and_commits_nothing(local_url):
    state = {"w": torch.randn(256, 64), "cfg": {"lr": 0.1, "schedule": lambda s: s * 2}}
    with pytest.raises(errors.UnsupportedValueError, match=r"'cfg\.schedule'.*pickle") as info:
        ckptstore.save(state, local_url, step=1)
    assert isinstance(info.value, TypeError)
    assert "\n" not in str(info.value)
    _no_checkpoint_committed(local_url)
    assert _chunk_paths(local_url) == []  # objects are serialized before any chunk is written
    fut = ckptstore.async_save(state, local_url, step=2)
    with pytest.raises(errors.UnsupportedValueError, match=r"'cfg\.schedule'"):
        fut.result(timeout=120)
    _no_checkpoint_committed(local_url)
    ckptstore.save({"w": state["w"]}, local_url, step=3)  # the store is fine


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda: torch.eye(4).to_sparse(), "sparse tensor"),
        (lambda: torch.eye(4).to_sparse_csr(), "sparse tensor"),
        (lambda: torch.empty(4, 4, device="meta"), "meta tensor"),
    ],
)
def test_sparse_and_meta_tensors_are_refused_by_key(local_url, make, kind):
    state = {"model": {"w": torch.ones(3), "odd": make()}}
    for call in (ckptstore.save, ckptstore.async_save):
        with pytest.raises(errors.UnsupportedValueError, match=rf"'model\.odd' is a {kind}"):
            call(state, local_url, step=1)
    # plain DCP through the Writer: the same error, from write_data
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException, match=rf"'model\.odd' is a {kind}"):
        dcp.save(state, storage_writer=ckptstore.Writer(local_url, step=1), no_dist=True)
    _no_checkpoint_committed(local_url)


def test_value_in_template_where_checkpoint_has_tensor(saved):
    url, _ = saved
    with pytest.raises(errors.MismatchError, match=r"'w' is a tensor in checkpoint.*type int"):
        ckptstore.load({"w": 3, "b": torch.zeros(16)}, url)
    with pytest.raises(errors.MismatchError, match=r"'w' is a tensor in checkpoint.*type str"):
        ckptstore.load({"w": "weights"}, url)
    with pytest.raises(errors.MismatchError, match=r"'meta\.epoch' is a tensor in the state"):
        ckptstore.load({"meta": {"epoch": torch.zeros(())}}, url)


def test_url_of_wrong_type_is_a_type_error_before_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"w": torch.ones(2)}
    calls = [
        lambda u: ckptstore.save(state, u, step=1),
        lambda u: ckptstore.async_save(state, u, step=1),
        lambda u: ckptstore.load(state, u),
        lambda u: ckptstore.load_full(u),
        lambda u: ckptstore.Store(u),
        lambda u: ckptstore.Writer(u, step=1),
        lambda u: ckptstore.Reader(u),
    ]
    for bad in (123, None, b"/tmp/x", 1.5):
        for call in calls:
            with pytest.raises(TypeError, match="store URL must be a string"):
                call(bad)
    assert list(tmp_path.iterdir()) == []  # no ./123 store
    import pathlib

    ckptstore.save(state, pathlib.Path(tmp_path / "p"), step=1)  # a path is fine
    assert ckptstore.Reader(tmp_path / "p").url == str(tmp_path / "p")


class _NotTorchSave(DefaultSavePlanner):
    """Stores each value's bytes as a plain pickle, not a torch.save stream."""

    def transform_object(self, write_item, object):  # noqa: A002 - DCP's signature
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(pickle.dumps(object))
        return object


def test_allow_pickle_with_payload_that_is_not_torch_save(local_url):
    ckptstore.save(
        {"w": torch.ones(2), "obj": {"k": [1, 2]}}, local_url, step=1, planner=_NotTorchSave()
    )
    where = r"'obj\.k' of checkpoint 'step-0+1'"
    for error, allow in ((errors.UnsafeObjectError, False), (errors.CorruptChunkError, True)):
        with pytest.raises(error, match=where) as info:
            ckptstore.load_full(local_url, allow_pickle=allow)
        assert "\n" not in str(info.value)
        with pytest.raises(error, match=where):
            ckptstore.load({"w": torch.zeros(2), "obj": {"k": None}}, local_url, allow_pickle=allow)
    for raw in (b"not a torch.save stream", pickle.dumps([1, 2])):
        with pytest.raises(errors.CorruptChunkError, match="'x' of checkpoint 'c'"):
            ckptstore.dcp.load_object(raw, "'x' of checkpoint 'c'", True)


def test_huge_declared_shape_is_an_allocation_error(saved):
    """A manifest that tiles a (2**37, 512) float32 tensor (256 TiB, past any address space)
    consistently passes validation; assembling it whole must fail with a clear error naming
    the tensor and its size, not torch's raw RuntimeError."""
    import msgpack
    import xxhash

    url, _ = saved
    repo = Repository.open(url)
    d = repo.manifest("step-000000000001").to_dict()
    rows, per_chunk = 2**37, 2**28  # each chunk within the manifest's expansion bound
    t = d["tensors"]["w"]
    t["shape"] = [rows, 512]
    shard = t["shards"][0]
    key, _, _, stored, _ = shard["chunks"][0]
    shard.update(sizes=[rows, 512], rows=rows, nbytes=rows * 512 * 4)
    shard["chunks"] = [[key, r, r + per_chunk, stored, False] for r in range(0, rows, per_chunk)]
    d["name"] = "huge"
    body = msgpack.packb(d, use_bin_type=True)
    frame = b"CKM1" + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") + body
    repo.backend.put(layout.manifest_key("huge"), frame)
    with pytest.raises(errors.AllocationError, match=r"'w' of checkpoint 'huge'") as info:
        ckptstore.load_full(url, name="huge")
    msg = str(info.value)
    assert isinstance(info.value, MemoryError) and "[137438953472, 512]" in msg
    assert f"{rows * 512 * 4:,} bytes" in msg and "\n" not in msg


def test_unknown_codec_on_the_read_path_names_tensor_and_checkpoint(saved):
    import dataclasses

    from ckptstore.store.blobs import BlobReader

    url, _ = saved
    repo = Repository.open(url)
    blob = repo.manifest("step-000000000001").tensors["w"].shards[0].blob
    odd = dataclasses.replace(blob, codec=[{"id": "brotli-9000"}])
    where = "'w' of checkpoint 'step-000000000001'"
    with pytest.raises(errors.UnknownCodecError, match=rf"{where}: unknown codec id 'brotli-9000'"):
        BlobReader(repo).read_rows(odd, 0, odd.rows, where)


def test_a_huge_list_index_in_the_flatten_mapping_is_refused_not_allocated(tmp_path):
    """A damaged (or hostile) manifest whose flatten mapping puts a value at list index
    10**12 is an error naming the value, not a terabyte list of None."""
    import glob

    from ckptstore.store.manifest import Manifest

    url = str(tmp_path / "store")
    ckptstore.save({"layers": [torch.ones(3), torch.zeros(2)]}, url, step=1)
    path = glob.glob(f"{url}/checkpoints/*.msgpack")[0]
    m = Manifest.decode(open(path, "rb").read(), path)
    assert m.planner_data, "the list is flattened through the mapping"
    fqn = next(k for k, v in m.planner_data.items() if v[-1] == 1)
    m.planner_data[fqn] = [*m.planner_data[fqn][:-1], 10**12]
    with open(path, "wb") as f:
        f.write(m.encode())
    with pytest.raises(ckptstore.CkptStoreError, match="list index 1000000000000"):
        ckptstore.load_full(url, step=1)
    m.planner_data[fqn] = [*m.planner_data[fqn][:-1], 1]  # the mapping as saved loads again
    with open(path, "wb") as f:
        f.write(m.encode())
    assert torch.equal(ckptstore.load_full(url, step=1)["layers"][1], torch.zeros(2))


def test_a_filesystem_that_cannot_be_built_is_one_error_naming_the_url(monkeypatch):
    """ftp:///x names no host: fsspec's FTPFileSystem raises TypeError half-way through its
    __init__, and its __del__ then fails on the half-built object. The caller gets one
    InvalidURLError naming the URL; the __del__ failure reaches no unraisable hook."""
    import sys

    seen: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    with pytest.raises(errors.InvalidURLError, match=r"'ftp:///x'.*host") as info:
        ckptstore.Store("ftp:///x").list()
    assert isinstance(info.value, ValueError)
    del info
    import gc

    gc.collect()
    assert seen == []
    assert sys.unraisablehook == seen.append  # the caller's hook is back in place
    with pytest.raises(errors.UnknownSchemeError, match="nosuchproto"):
        ckptstore.Store("nosuchproto://x").list()


def test_a_filesystem_that_cannot_connect_names_the_url():
    # port 1 on the loopback: refused at once, no network needed
    with pytest.raises(errors.StorageUnavailableError, match="'ftp://127.0.0.1:1/x'"):
        ckptstore.Store("ftp://127.0.0.1:1/x").list()
