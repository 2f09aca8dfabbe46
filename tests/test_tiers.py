"""Two tiers on local folders: the mirror uploader, retention per tier, reads from either
tier, and copies between stores (S3, many ranks and kills: tests/test_tiers_s3.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.errors import CheckpointExistsError, MirrorError
from ckptstore.store import layout
from ckptstore.store.mirror import uploader_for
from ckptstore.store.repository import Repository
from ckptstore.testing import faulty
from ckptstore.testing.faulty import failing_puts

CHUNK = 64 * 1024


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(512, 256, generator=g),
        "b": torch.randn(16, generator=g),
        "step": seed,
    }


def _template() -> dict:
    return {"w": torch.zeros(512, 256), "b": torch.zeros(16), "step": -1}


def _chunk_objects(root: Path) -> dict[str, int]:
    base = root / "chunks"
    if not base.exists():
        return {}
    return {p.name: p.stat().st_size for p in base.rglob("*") if p.is_file()}


def test_mirror_gets_each_checkpoint_whole_and_only_new_chunks(tmp_path):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    sd = _state()
    info = ckptstore.save(sd, str(primary), step=1, mirror=str(mirror), chunk_bytes=CHUNK)
    report = info.mirrored.result(timeout=60)
    assert report.durable and not report.skipped
    # everything the checkpoint references went up once, plus the manifest
    stored = sum(_chunk_objects(mirror).values())
    manifest_size = (mirror / layout.manifest_key("step-000000000001")).stat().st_size
    assert report.objects_sent == len(_chunk_objects(mirror)) + 1
    assert report.bytes_sent == stored + manifest_size
    assert report.manifest_bytes == manifest_size
    # the mirror holds the primary's manifest bytes, unchanged
    name = layout.manifest_key("step-000000000001")
    assert (mirror / name).read_bytes() == (primary / name).read_bytes()

    # an unchanged state: only the manifest travels
    again = ckptstore.save(sd, str(primary), step=2, mirror=str(mirror), chunk_bytes=CHUNK)
    r2 = again.mirrored.result(timeout=60)
    assert r2.objects_sent == 1 and r2.bytes_sent == r2.manifest_bytes
    assert r2.objects_skipped == len(_chunk_objects(mirror))

    # one changed row: the chunk(s) holding it, and the manifest
    sd["w"][0] += 1
    third = ckptstore.save(sd, str(primary), step=3, mirror=str(mirror), chunk_bytes=CHUNK)
    r3 = third.mirrored.result(timeout=60)
    assert r3.objects_sent == 2

    out = _template()
    ckptstore.load(out, str(mirror))
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"])
    assert out["step"] == 0
    # the upload markers are gone once committed, and the leases with them
    assert not list((mirror / layout.UPLOADS).rglob("*.json"))
    assert not list((mirror / layout.LEASES).glob("save-*"))
    assert not list((primary / layout.LEASES).glob("save-*"))
    assert ckptstore.Store(str(mirror)).verify().ok


def test_retention_is_per_tier(tmp_path):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    tier = ckptstore.Mirror(str(mirror), keep_last=3)
    sd = _state()
    for step in range(5):
        sd["w"][step] += 1
        info = ckptstore.save(sd, str(primary), step=step, mirror=tier, keep_last=1)
        info.mirrored.result(timeout=60)
        info.retention.result(timeout=60)
    assert [s.step for s in ckptstore.Store(str(primary)).list()] == [4]
    assert [s.step for s in ckptstore.Store(str(mirror)).list()] == [2, 3, 4]
    for step in (2, 3, 4):
        ckptstore.load_full(str(mirror), step=step)  # every kept one is whole


def test_primary_gc_keeps_a_checkpoint_until_it_is_uploaded(tmp_path):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    tier = ckptstore.Mirror(str(mirror), max_pending=4)
    repo = Repository.open(str(primary), create=True)
    up = uploader_for(repo, tier)
    sd = _state()
    with up.paused():
        futures = []
        for step in range(3):
            sd["w"][step] += 1
            info = ckptstore.save(sd, str(primary), step=step, mirror=tier)
            futures.append(info.mirrored)
        assert up.pending == 3
        report = ckptstore.Store(str(primary)).gc(keep_last=1, grace="0s")
        # the two older ones are pending upload: kept, and said so
        assert report.dropped == []
        assert sorted(report.skipped) == ["step-000000000000", "step-000000000001"]
        assert all(why.startswith("busy") for why in report.skipped.values())
    for f in futures:
        assert f.result(timeout=60).durable
    assert [s.step for s in ckptstore.Store(str(mirror)).list()] == [0, 1, 2]
    report = ckptstore.Store(str(primary)).gc(keep_last=1, grace="0s")
    assert sorted(report.dropped) == ["step-000000000000", "step-000000000001"]


def test_uploads_behind_wait_or_skip(tmp_path):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    tier = ckptstore.Mirror(str(mirror), max_pending=1, when_behind="skip")
    up = uploader_for(Repository.open(str(primary), create=True), tier)
    sd = _state()
    with up.paused():
        first = ckptstore.save(sd, str(primary), step=1, mirror=tier)
        second = ckptstore.save(sd, str(primary), step=2, mirror=tier)
        r2 = second.mirrored.result(timeout=60)  # skipped at once, while the first waits
        assert r2.skipped and not r2.durable
        assert up.pending == 1
    assert first.mirrored.result(timeout=60).durable
    assert [s.step for s in ckptstore.Store(str(mirror)).list()] == [1]
    # the next save after a skipped one sends what the mirror lacks
    third = ckptstore.save(sd, str(primary), step=3, mirror=tier)
    assert third.mirrored.result(timeout=60).durable
    assert [s.step for s in ckptstore.Store(str(mirror)).list()] == [1, 3]


def test_failed_upload_is_reported_then_raised_by_the_next_save(tmp_path, caplog):
    primary, mirror = tmp_path / "nvme", "faulty://bucket/run"
    faulty.reset()
    tier = ckptstore.Mirror(mirror, on_error="raise")
    sd = _state()
    ckptstore.save(sd, str(primary), step=1, mirror=tier).mirrored.result(timeout=60)
    sd["w"] += 1
    faulty.set_plan(fail_put_after=0, put_match="*/chunks/*")
    info = ckptstore.save(sd, str(primary), step=2, mirror=tier, chunk_bytes=CHUNK)
    with pytest.raises(MirrorError, match="step-000000000002"):
        info.mirrored.result(timeout=60)
    faulty.set_plan()
    assert "not mirrored" in caplog.text
    # the primary checkpoint is whole; the mirror has no trace of step 2 but chunks
    ckptstore.load_full(str(primary), step=2)
    assert [s.step for s in ckptstore.Store(mirror).list()] == [1]
    # the next save commits, then raises the earlier failure once
    with pytest.raises(MirrorError, match="step-000000000002"):
        ckptstore.save(sd, str(primary), step=3, mirror=tier)
    assert ckptstore.Store(str(primary)).resolve(step=3) == "step-000000000003"
    fourth = ckptstore.save(sd, str(primary), step=4, mirror=tier)
    assert fourth.mirrored.result(timeout=60).durable
    ckptstore.wait_for_mirrors()
    assert [s.step for s in ckptstore.Store(mirror).list()] == [1, 3, 4]
    assert ckptstore.Store(mirror).verify().ok


def test_a_full_primary_disk_on_read_through_still_loads(tmp_path, caplog):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    sd = _state()
    ckptstore.save(sd, str(primary), step=1, mirror=str(mirror), chunk_bytes=CHUNK)
    ckptstore.wait_for_mirrors()
    lost = tmp_path / "new-node"
    out = _template()
    with failing_puts(after=0, match="chunks/"):
        info = ckptstore.load(out, str(lost), mirror=str(mirror))
    assert torch.equal(out["w"], sd["w"])
    assert info.objects_from_mirror == info.objects_read > 0
    assert "not cached in the primary" in caplog.text
    assert _chunk_objects(lost) == {}


def test_load_prefers_the_primary_and_reads_the_rest_from_the_mirror(tmp_path):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    sd = _state()
    ckptstore.save(sd, str(primary), step=1, mirror=str(mirror), chunk_bytes=CHUNK)
    ckptstore.wait_for_mirrors()
    chunks = sorted((primary / "chunks").rglob("*"))
    files = [c for c in chunks if c.is_file()]
    files[0].unlink()  # a lost chunk: the mirror serves it, and the primary gets it back
    out = _template()
    info = ckptstore.load(out, str(primary), mirror=str(mirror))
    assert torch.equal(out["w"], sd["w"])
    assert info.objects_from_mirror == 1
    assert files[0].exists()
    again = ckptstore.load(_template(), str(primary), mirror=str(mirror))
    assert again.objects_from_mirror == 0
    # without read-through nothing is written
    files[1].unlink()
    tier = ckptstore.Mirror(str(mirror), read_through=False)
    third = ckptstore.load(_template(), str(primary), mirror=tier)
    assert third.objects_from_mirror == 1 and not files[1].exists()


def test_latest_is_the_newest_in_either_tier(tmp_path):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    sd = _state()
    ckptstore.save(sd, str(primary), step=1, mirror=str(mirror))
    ckptstore.wait_for_mirrors()
    ckptstore.save(_state(7), str(mirror), step=5)  # only in the mirror (another machine)
    out = _template()
    info = ckptstore.load(out, str(primary), mirror=str(mirror))
    assert info.name == "step-000000000005" and out["step"] == 7
    # and a primary newer than the mirror wins the other way
    ckptstore.save(_state(9), str(primary), step=9)
    out = _template()
    assert ckptstore.load(out, str(primary), mirror=str(mirror)).name == "step-000000000009"
    assert out["step"] == 9


def test_script_that_ends_right_after_save_finishes_its_upload(tmp_path):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    script = textwrap.dedent(
        f"""
        import torch, ckptstore
        sd = {{"w": torch.arange(200_000, dtype=torch.float32).reshape(400, 500)}}
        ckptstore.save(sd, {str(primary)!r}, step=1, mirror={str(mirror)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    out = ckptstore.load_full(str(mirror))
    assert torch.equal(out["w"], torch.arange(200_000, dtype=torch.float32).reshape(400, 500))


def test_mirror_option_validation(tmp_path):
    with pytest.raises(ValueError, match="when_behind"):
        ckptstore.Mirror("x", when_behind="later")
    with pytest.raises(ValueError, match="max_pending"):
        ckptstore.Mirror("x", max_pending=0)
    with pytest.raises(TypeError, match="mirror"):
        ckptstore.SaveOptions(mirror=3)
    assert ckptstore.SaveOptions(mirror="s3://b/run").mirror == ckptstore.Mirror("s3://b/run")


# -- copies between stores ----------------------------------------------------------------
def _series(url: str, n: int = 3) -> dict:
    sd = _state()
    for step in range(n):
        sd["w"][step * 40] += 1
        ckptstore.save(sd, url, step=step, chunk_bytes=CHUNK)
    return sd


def test_copy_sends_only_missing_chunks_and_the_manifest_last(tmp_path):
    src, dst = str(tmp_path / "a"), str(tmp_path / "b")
    sd = _series(src)
    one = ckptstore.Store(src).copy_to(dst, 1)
    assert one.copied == ["step-000000000001"]
    rest = ckptstore.Store(src).copy_to(dst, all=True)
    assert rest.copied == ["step-000000000000", "step-000000000002"]
    assert rest.present == ["step-000000000001"]
    # step 0 and 2 differ from step 1 in one chunk each; everything else was there
    assert rest.objects_sent == 2 + 2 and rest.objects_skipped > 0
    out = _template()
    ckptstore.load(out, dst)
    assert torch.equal(out["w"], sd["w"])
    assert ckptstore.Store(dst).verify().ok
    # a different checkpoint under a taken name is refused, and nothing changes
    ckptstore.save(_state(5), str(tmp_path / "c"), step=1)
    with pytest.raises(CheckpointExistsError):
        ckptstore.Store(str(tmp_path / "c")).copy_to(dst, 1)


def test_copy_killed_part_way_leaves_dst_valid_and_resumes(tmp_path):
    src, dst = str(tmp_path / "a"), str(tmp_path / "b")
    _series(src, n=1)
    total = len(_chunk_objects(tmp_path / "a"))
    assert total > 4
    with failing_puts(after=3, match="chunks/"), pytest.raises(Exception):  # noqa: B017
        ckptstore.Store(src).copy_to(dst)
    assert ckptstore.Store(dst).list() == []  # no manifest: nothing half there
    arrived = len(_chunk_objects(tmp_path / "b"))
    assert arrived == 3
    report = ckptstore.Store(src).copy_to(dst)
    assert report.objects_sent == total - arrived + 1  # the rest and the manifest
    assert report.objects_skipped == arrived
    assert ckptstore.Store(dst).verify().ok


def test_copy_refuses_a_corrupt_source_chunk(tmp_path):
    src, dst = str(tmp_path / "a"), str(tmp_path / "b")
    _series(src, n=1)
    victim = next(p for p in (tmp_path / "a" / "chunks").rglob("*") if p.is_file())
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ckptstore.CorruptChunkError, match=victim.name):
        ckptstore.Store(src).copy_to(dst)
    assert ckptstore.Store(dst).list() == []
    assert victim.name not in _chunk_objects(tmp_path / "b")


def test_cli_cp(tmp_path):
    src, dst = str(tmp_path / "a"), str(tmp_path / "b")
    _series(src, n=2)
    cli = [sys.executable, "-m", "ckptstore.cli.main"]
    out = subprocess.run([*cli, "cp", src, dst, "--step", "0", "--json"], capture_output=True)
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)
    assert first["copied"] == ["step-000000000000"] and first["objects_skipped"] == 0
    out = subprocess.run([*cli, "cp", src, dst, "--all", "--json"], capture_output=True)
    second = json.loads(out.stdout)
    assert second["copied"] == ["step-000000000001"] and second["objects_sent"] == 2
    bad = subprocess.run([*cli, "cp", src, dst, "--step", "7"], capture_output=True, text=True)
    assert bad.returncode == 3 and "step 7" in bad.stderr
    env = dict(os.environ, COLUMNS="200")
    plain = subprocess.run([*cli, "cp", src, dst], capture_output=True, text=True, env=env)
    assert plain.returncode == 0 and "already present" in plain.stdout


def test_a_save_that_fails_sends_no_checkpoint_to_the_mirror(tmp_path):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    ckptstore.save(_state(), str(primary), step=1, mirror=str(mirror))
    big = {"w": torch.randn(2048, 512), "b": torch.randn(16), "step": 2}
    with failing_puts(after=2, match="chunks/"), pytest.raises(Exception, match="injected"):
        ckptstore.save(big, str(primary), step=2, mirror=str(mirror), chunk_bytes=CHUNK)
    assert ckptstore.wait_for_mirrors(timeout=120)
    assert [s.step for s in ckptstore.Store(str(mirror)).list()] == [1]
    assert not list((mirror / layout.LEASES).glob("save-*"))
    assert not list((primary / layout.LEASES).glob("save-*"))
    # and the next save mirrors as usual
    ok = ckptstore.save(big, str(primary), step=3, mirror=str(mirror), chunk_bytes=CHUNK)
    assert ok.mirrored.result(timeout=60).durable


def test_streamed_upload_starts_during_the_save_and_commits_after_it(tmp_path):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    tier = ckptstore.Mirror(str(mirror), stream=True)
    sd = _state()
    for step in (1, 2):
        sd["w"][step] += 1
        info = ckptstore.save(sd, str(primary), step=step, mirror=tier, chunk_bytes=CHUNK)
        report = info.mirrored.result(timeout=60)
        assert report.durable
    assert report.objects_sent == 2  # the changed chunk and the manifest
    out = _template()
    ckptstore.load(out, str(mirror))
    assert torch.equal(out["w"], sd["w"])
    name = layout.manifest_key("step-000000000002")
    assert (mirror / name).read_bytes() == (primary / name).read_bytes()


def test_async_save_and_plain_dcp_writer_take_a_mirror(tmp_path):
    import torch.distributed.checkpoint as dcp

    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    sd = _state()
    fut = ckptstore.async_save(sd, str(primary), step=1, mirror=str(mirror))
    info = fut.result(timeout=120)
    assert info.mirrored.result(timeout=60).durable
    writer = ckptstore.Writer(str(primary), step=2, mirror=str(mirror))
    dcp.save(sd, storage_writer=writer, no_dist=True)
    assert writer.mirrored.result(timeout=60).durable
    assert [s.step for s in ckptstore.Store(str(mirror)).list()] == [1, 2]
    out = _template()
    ckptstore.load(out, str(mirror), step=2)
    assert torch.equal(out["w"], sd["w"]) and out["step"] == 0


def test_two_tiers_read_as_one_store_refuse_changes(tmp_path):
    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    ckptstore.save(_state(), str(primary), step=1, mirror=str(mirror))
    ckptstore.wait_for_mirrors()
    ckptstore.save(_state(2), str(mirror), step=2)
    both = ckptstore.Store(str(primary), mirror=str(mirror))
    assert [s.step for s in both.list()] == [1, 2]
    assert both.verify().ok
    with pytest.raises(TypeError, match="open one of them alone"):
        both.gc(keep_last=1)
    assert [s.step for s in ckptstore.Store(str(mirror)).list()] == [1, 2]


def test_gc_on_the_mirror_beside_an_upload_keeps_what_it_needs(tmp_path, monkeypatch):
    from ckptstore.store import mirror as mirror_module

    primary, mirror = tmp_path / "nvme", tmp_path / "bucket"
    sd = _state()
    ckptstore.save(sd, str(primary), step=1, mirror=str(mirror), chunk_bytes=CHUNK)
    ckptstore.wait_for_mirrors()
    original = mirror_module.copy_chunk
    reports = []
    once = threading.Lock()

    def copy_then_gc(src, dst, key):
        size = original(src, dst, key)
        if once.acquire(blocking=False):  # a gc of all it may delete, after the first chunk
            reports.append(ckptstore.Store(str(mirror)).gc(keep_last=1, grace="0s"))
        return size

    monkeypatch.setattr(mirror_module, "copy_chunk", copy_then_gc)
    sd["w"] += 1
    info = ckptstore.save(sd, str(primary), step=2, mirror=str(mirror), chunk_bytes=CHUNK)
    assert info.mirrored.result(timeout=60).durable
    assert reports and reports[0].saves_in_flight >= 1
    assert [s.step for s in ckptstore.Store(str(mirror)).list()] == [1, 2]
    assert ckptstore.Store(str(mirror)).verify().ok
    out = _template()
    ckptstore.load(out, str(mirror), step=2)
    assert torch.equal(out["w"], sd["w"])


def test_gc_removes_upload_markers_left_by_a_crash_and_only_those(tmp_path):
    mirror = tmp_path / "bucket"
    ckptstore.save(_state(), str(mirror), step=1)
    old = mirror / layout.upload_marker_key("step-000000000009", 1)
    fresh = mirror / layout.upload_marker_key("step-000000000010", 1)
    for marker in (old, fresh):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text('{"save": "x", "status": "done", "rank": 1, "world": 2}')
    two_days = 2 * 86400
    os.utime(old, (old.stat().st_atime - two_days, old.stat().st_mtime - two_days))
    ckptstore.Store(str(mirror)).gc()
    assert not old.exists() and fresh.exists()
    assert [s.step for s in ckptstore.Store(str(mirror)).list()] == [1]
