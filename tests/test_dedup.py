"""Content addressing: unchanged chunks are not written again."""

from __future__ import annotations

import torch

import ckptstore
from ckptstore.store import Repository, layout


def _chunk_objects(url: str) -> set[str]:
    repo = Repository.open(url)
    return set(repo.backend.list(layout.CHUNKS))


def test_second_save_of_same_state_writes_only_the_manifest(store_url):
    state = {f"layer{i}.weight": torch.randn(512, 1024) for i in range(4)}
    first = ckptstore.save(state, store_url, step=1, chunk_bytes=1 << 20)
    before = _chunk_objects(store_url)
    second = ckptstore.save(state, store_url, step=2, chunk_bytes=1 << 20)
    assert _chunk_objects(store_url) == before
    assert first.new_chunks == first.chunks == 8
    assert second.new_chunks == 0 and second.chunks == 8
    assert second.stored_bytes == first.stored_bytes
    assert second.new_bytes == second.manifest_bytes  # nothing but the manifest
    assert second.new_bytes < 0.002 * first.new_bytes


def test_one_changed_tensor_writes_only_its_chunks(store_url):
    state = {f"layer{i}.weight": torch.randn(512, 1024) for i in range(4)}
    ckptstore.save(state, store_url, step=1, chunk_bytes=1 << 20)
    before = _chunk_objects(store_url)
    state["layer2.weight"] = state["layer2.weight"] + 1.0
    info = ckptstore.save(state, store_url, step=2, chunk_bytes=1 << 20)
    new_objects = _chunk_objects(store_url) - before
    assert info.new_chunks == len(new_objects) == 2  # the two chunks of layer2
    report = ckptstore.Store(store_url).inspect(step=2)
    for t in report.tensors:
        if t.fqn == "layer2.weight":
            assert t.shared_bytes == 0
        else:
            assert t.shared_bytes == t.stored_bytes


def test_changed_rows_rewrite_only_their_chunk(store_url):
    w = torch.randn(4096, 256)  # 4 MiB → four 1 MiB chunks of 1024 rows
    ckptstore.save({"w": w}, store_url, step=1, chunk_bytes=1 << 20)
    w[1500] += 1  # inside the second chunk
    info = ckptstore.save({"w": w}, store_url, step=2, chunk_bytes=1 << 20)
    assert (info.chunks, info.new_chunks) == (4, 1)


def test_failed_save_chunks_are_put_again_which_heals_damaged_ones(faults):
    """A chunk left by a save that never committed is never trusted as it is: the next save
    puts it again (it counts as reused, not new, since it existed), so a torn or flipped
    object is healed and the checkpoint verifies."""
    from ckptstore.backend import open_backend
    from ckptstore.store import layout

    url = "faulty://dedup"
    state = {"w": torch.randn(2048, 512)}
    faults.set_plan(fail_put_after=0, put_match="*/checkpoints/*")  # fail at the commit
    try:
        ckptstore.save(state, url, step=1, chunk_bytes=1 << 20)
    except ckptstore.CkptStoreError:
        pass
    else:
        raise AssertionError("the injected commit failure did not surface")
    faults.set_plan()
    backend = open_backend(url)
    orphans = backend.list(layout.CHUNKS)
    assert len(orphans) == 4
    data = backend.get(orphans[0])
    backend.put(orphans[0], data[: len(data) // 2])  # truncated
    flipped = bytearray(backend.get(orphans[1]))
    flipped[len(flipped) // 2] ^= 1
    backend.put(orphans[1], bytes(flipped))  # same size, one bit off
    info = ckptstore.save(state, url, step=2, chunk_bytes=1 << 20)
    assert (info.chunks, info.new_chunks) == (4, 0)
    assert ckptstore.Store(url).verify().ok
    assert torch.equal(ckptstore.load_full(url)["w"], state["w"])


def _disk_bytes(root) -> int:
    import os

    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
        if f != "store.json"
    )


def test_reported_bytes_match_disk(local_url):
    """stored_bytes / new_bytes are what the disk holds: inline tensors counted once."""
    state = {f"bias{i}": torch.randn(500) for i in range(100)}  # all inline
    state["w"] = torch.randn(2048, 512)
    first = ckptstore.save(state, local_url, step=1, chunk_bytes=1 << 20)
    assert first.stored_bytes == first.new_bytes == _disk_bytes(local_url)
    before = _disk_bytes(local_url)
    second = ckptstore.save(state, local_url, step=2, chunk_bytes=1 << 20)
    assert second.new_bytes == _disk_bytes(local_url) - before == second.manifest_bytes
    listed = ckptstore.Store(local_url).list()
    assert [c.new_bytes for c in listed] == [first.new_bytes, second.new_bytes]
    assert [c.stored_bytes for c in listed] == [first.stored_bytes, second.stored_bytes]
