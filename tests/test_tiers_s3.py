"""Two tiers against a real S3 server (SeaweedFS on loopback): copies local↔S3 and S3↔S3,
a 2-rank job whose primaries are node-local folders and whose mirror is a bucket (then a
lost node), and kill -9 of the S3 server or of the saving process at awkward moments: a
reader of the mirror sees each checkpoint whole or not at all."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.errors import MirrorError
from ckptstore.knobs import Settings
from tests import tier_workers
from tests.conftest import S3_BUCKET, start_s3_server
from tests.dist_workers import free_port, spawn

CHUNK = 64 * 1024


def _state(rows: int = 1024) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(rows, 256, generator=g), "b": torch.randn(8, generator=g)}


def _steps(url: str, options: dict | None = None) -> list[int]:
    return [s.step for s in ckptstore.Store(url, options).list()]


def test_copy_local_s3_and_between_buckets(s3_server, s3_options, tmp_path):
    import s3fs

    local = str(tmp_path / "local")
    sd = _state()
    for step in range(2):
        sd["w"][step] += 1
        ckptstore.save(sd, local, step=step, chunk_bytes=CHUNK)
    other = f"ckpt-b-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**s3_options).mkdir(other)
    up = f"s3://{S3_BUCKET}/cp-{uuid.uuid4().hex[:8]}"
    across = f"s3://{other}/cp"
    back = str(tmp_path / "back")

    r1 = ckptstore.Store(local).copy_to(up, all=True, storage_options=s3_options)
    assert r1.copied == ["step-000000000000", "step-000000000001"]
    r2 = ckptstore.Store(up, s3_options).copy_to(across, all=True)  # same protocol: same options
    assert r2.copied == r1.copied and r2.bytes_sent == r1.bytes_sent
    r3 = ckptstore.Store(across, s3_options).copy_to(back, all=True, storage_options={})
    assert r3.copied == r1.copied
    for url, opts in ((up, s3_options), (across, s3_options), (back, None)):
        out = ckptstore.load_full(url, storage_options=opts)
        assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"])
    again = ckptstore.Store(local).copy_to(up, all=True, storage_options=s3_options)
    assert again.copied == [] and again.objects_sent == 0
    assert again.present == r1.copied


def test_two_ranks_node_local_disks_and_a_bucket_survive_a_lost_node(
    s3_server, s3_options, tmp_path
):
    root, out = tmp_path / "nodes", tmp_path / "out"
    out.mkdir()
    mirror = f"s3://{S3_BUCKET}/job-{uuid.uuid4().hex[:8]}"
    spawn(tier_workers.save_worker, 2, str(root), mirror, s3_options, str(out))
    saves = [json.loads((out / f"save-{r}.json").read_text()) for r in range(2)]
    for r, s in enumerate(saves):
        assert all(rep["durable"] for rep in s["reports"]), s
        assert all(rep["objects_sent"] > 0 for rep in s["reports"]), (r, s)
    assert saves[0]["reports"][1]["manifest_bytes"] > 0  # the coordinator committed
    assert _steps(mirror, s3_options) == [1, 2]
    assert ckptstore.Store(mirror, s3_options).verify().ok
    # each node's folder holds its own chunks only; node 0 the manifests too
    assert not (root / "node1" / "checkpoints").exists()

    shutil.rmtree(root / "node1")  # a lost node
    before = _files(root / "node0" / "chunks")
    spawn(tier_workers.load_worker, 2, str(root), mirror, s3_options, str(out))
    loads = [json.loads((out / f"load2-{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(loads):
        assert got["name"] == "step-000000000002"
        assert all(got["same"].values()), (r, got)
    # node 0 read locally all it had; from the bucket only what node 1 had written (DCP
    # may give a replicated tensor to either rank), and kept a copy of those
    fetched = _files(root / "node0" / "chunks") - before
    assert loads[0]["from_mirror"] == len(fetched) < loads[0]["objects_read"]
    assert loads[1]["from_mirror"] == loads[1]["objects_read"] > 0  # node 1 lost its own
    assert _files(root / "node1" / "chunks")  # and has them again

    # W=1 on node 0: its own chunks locally, node 1's share (cached on node 1) from the bucket
    template = {k: torch.zeros_like(v) for k, v in tier_workers.expected(2).items()}
    info = ckptstore.load(
        template, str(root / "node0"), mirror=ckptstore.Mirror(mirror, s3_options)
    )
    for k, v in tier_workers.expected(2).items():
        assert torch.equal(template[k], v), k
    assert 0 < info.objects_from_mirror < info.objects_read


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


@pytest.fixture
def own_server(tmp_path):
    server = start_s3_server(tmp_path / "weed" / "data")
    yield server
    server.stop()


class _kill_after_puts:  # noqa: N801 - used like a function
    """Kill -9 the S3 server once ``after`` chunk puts to it have returned."""

    def __init__(self, server, after: int) -> None:
        self.server, self.after, self.count = server, after, 0

    def __enter__(self):
        from ckptstore.backend import FsspecBackend

        self._original = original = FsspecBackend.put
        outer = self

        def put(backend, key, data, *, create_only=False):
            result = original(backend, key, data, create_only=create_only)
            if backend.url.startswith("s3://") and key.startswith("chunks/"):
                outer.count += 1
                if outer.count == outer.after:
                    outer.server.kill()
            return result

        FsspecBackend.put = put
        return self

    def __exit__(self, *exc):
        from ckptstore.backend import FsspecBackend

        FsspecBackend.put = self._original


@pytest.mark.parametrize("moment", ["before the upload", "mid-upload"])
def test_s3_server_killed_leaves_no_half_checkpoint_in_the_mirror(own_server, tmp_path, moment):
    primary = str(tmp_path / "nvme")
    mirror = f"s3://{S3_BUCKET}/m"
    settings = Settings(retries=1, retry_base_ms=50)
    tier = ckptstore.Mirror(mirror, storage_options=own_server.storage_options())
    sd = _state()
    first = ckptstore.save(sd, primary, step=1, mirror=tier, chunk_bytes=CHUNK, settings=settings)
    assert first.mirrored.result(timeout=120).durable
    sd["w"] += 1  # every chunk changes
    if moment == "before the upload":
        own_server.kill()  # (the uploader is idle: kill, then save)
        info = ckptstore.save(
            sd, primary, step=2, mirror=tier, chunk_bytes=CHUNK, settings=settings
        )
        with pytest.raises(MirrorError, match="step-000000000002"):
            info.mirrored.result(timeout=300)
    else:
        with _kill_after_puts(own_server, after=3) as killer:
            info = ckptstore.save(
                sd, primary, step=2, mirror=tier, chunk_bytes=CHUNK, settings=settings
            )
            with pytest.raises(MirrorError, match="step-000000000002"):
                info.mirrored.result(timeout=300)
        assert killer.count >= 3
    own_server.start()  # same data, same port
    opts = own_server.storage_options()
    assert _steps(mirror, opts) == [1]  # step 2 not there at all
    assert ckptstore.Store(mirror, opts).verify().ok
    # the next save mirrors whole, sending what the mirror lacks
    third = ckptstore.save(sd, primary, step=3, mirror=tier, chunk_bytes=CHUNK, settings=settings)
    assert third.mirrored.result(timeout=120).durable
    assert _steps(mirror, opts) == [1, 3]
    out = ckptstore.load_full(mirror, storage_options=opts)
    assert torch.equal(out["w"], sd["w"])


def test_saving_process_killed_mid_upload_leaves_no_half_checkpoint(own_server, tmp_path):
    primary = str(tmp_path / "nvme")
    mirror = f"s3://{S3_BUCKET}/m"
    opts = own_server.storage_options()
    script = textwrap.dedent(
        f"""
        import os, signal, torch, ckptstore
        from ckptstore.backend import FsspecBackend
        original, count = FsspecBackend.put, [0]
        def put(backend, key, data, *, create_only=False):
            original(backend, key, data, create_only=create_only)
            if backend.url.startswith("s3://") and key.startswith("chunks/"):
                count[0] += 1
                if count[0] == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
        FsspecBackend.put = put
        g = torch.Generator().manual_seed(3)
        sd = {{"w": torch.randn(1024, 256, generator=g)}}
        tier = ckptstore.Mirror({mirror!r}, storage_options={opts!r})
        ckptstore.save(sd, {primary!r}, step=1, mirror=tier, chunk_bytes={CHUNK})
        ckptstore.wait_for_mirrors()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _steps(primary) == [1]
    assert _steps(mirror, opts) == []  # the chunks that arrived are orphans for gc
    report = ckptstore.Store(primary).copy_to(mirror, storage_options=opts)  # catch up
    # what arrived before the kill (3, or more puts that were in flight) is not sent again
    assert report.copied == ["step-000000000001"] and report.objects_skipped >= 3
    assert ckptstore.Store(mirror, opts).verify().ok


def test_a_rank_killed_mid_upload_leaves_no_half_checkpoint(s3_server, s3_options, tmp_path):
    import torch.multiprocessing as mp

    root, out = tmp_path / "nodes", tmp_path / "out"
    out.mkdir()
    mirror = f"s3://{S3_BUCKET}/killed-{uuid.uuid4().hex[:8]}"
    ctx = mp.start_processes(
        tier_workers.killed_rank_worker,
        args=(2, free_port(), str(root), mirror, s3_options, str(out)),
        nprocs=2,
        join=False,  # (joining would SIGTERM rank 0 as soon as rank 1 dies)
        start_method="spawn",
    )
    for proc in ctx.processes:
        proc.join(timeout=240)
    assert [p.exitcode for p in ctx.processes] == [0, -signal.SIGKILL]
    got = json.loads((out / "killed-0.json").read_text())
    assert "rank" in got["outcome"] and "step-000000000001" in got["outcome"], got
    assert not (out / "killed-1.json").exists()
    assert _steps(mirror, s3_options) == []  # the coordinator never committed
    # the chunks both ranks sent stay for gc; a copy later sends only the rest
    assert ckptstore.Store(mirror, s3_options).verify().ok
