"""Against a real S3 server: SeaweedFS on 127.0.0.1, started by the test session.

The backend conformance suite, save/load/load_full/Store/CLI round trips, create-only
commits, credentials from the environment, and faults: the server killed in the middle of a
save, down at load, hanging, wrong credentials, a missing bucket, a chunk deleted behind the
store's back.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import ckptstore
from ckptstore.backend import Backend, fsspec_backend, io_pool, open_backend
from ckptstore.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CheckpointExistsError,
    ChunkNotFoundError,
    CkptStoreError,
    ObjectExistsError,
    StorageUnavailableError,
)
from ckptstore.knobs import Settings
from ckptstore.store import Repository, layout
from ckptstore.testing.backend_suite import BackendSuite
from ckptstore.testing.counting import CountingBackend
from ckptstore.testing.faulty import FaultyBackend
from ckptstore.testing.s3server import READER_KEY, READER_SECRET
from tests.conftest import S3_BUCKET, start_s3_server
from tests.helpers import assert_same, model_and_optimizer, template_like


def state(seed: int = 0, width: int = 128) -> dict:
    model, opt = model_and_optimizer(seed, width)
    return {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": seed}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptstore.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def s3_calls(monkeypatch) -> list[tuple[str, str]]:
    """Every S3 request s3fs sends from here on, as (operation, object key or prefix)."""
    import s3fs

    calls: list[tuple[str, str]] = []
    lock = threading.Lock()
    original = s3fs.S3FileSystem._call_s3

    async def counted(fs, method, *args, **kwargs):
        name = method if isinstance(method, str) else getattr(method, "__name__", "?")
        with lock:
            calls.append((name, str(kwargs.get("Key") or kwargs.get("Prefix") or "")))
        return await original(fs, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    return calls


def chunk_keys(url: str, options: dict) -> list[str]:
    return open_backend(url, options).list(layout.CHUNKS)


# -- conformance --------------------------------------------------------------------------
class TestS3Backend(BackendSuite):
    mtime_resolution = 1.0  # LastModified: whole seconds

    @pytest.fixture
    def backend(self, s3_url, s3_options) -> Backend:
        return open_backend(s3_url, s3_options)

    def test_capabilities(self, backend: Backend) -> None:
        assert backend.capabilities.remote and not backend.capabilities.local
        assert backend.endpoint and backend.endpoint.startswith("http://127.0.0.1:")

    def test_put_async_bounded(self, s3_url, s3_options, monkeypatch) -> None:
        settings = Settings.resolve(io_bytes=3000)  # a pool of its own
        backend = open_backend(s3_url, s3_options, settings)
        _, budget = io_pool(settings)
        peak = [0]
        real_put = backend.put

        def put(key, data, *, create_only=False):
            peak[0] = max(peak[0], budget.used)
            return real_put(key, data, create_only=create_only)

        monkeypatch.setattr(backend, "put", put)
        items = {f"a/{i}": bytes([i]) * 1000 for i in range(20)}
        futures = [backend.put_async(k, v) for k, v in items.items()]
        for f in futures:
            f.result()
        assert backend.get_many(list(items)) == items
        assert 0 < peak[0] <= 3000 and budget.used == 0

    def test_stats_count_requests(self, backend: Backend) -> None:
        backend.put("s/1", b"abc")
        backend.get("s/1")
        backend.list("s")
        st = backend.stats
        assert (st.puts, st.gets, st.lists, st.bytes_out, st.bytes_in) == (1, 1, 1, 3, 3)


# -- round trips ----------------------------------------------------------------------------
def test_save_load_roundtrip(s3_url, s3_options):
    sd = state(1)
    info = ckptstore.save(sd, s3_url, step=10, storage_options=s3_options)
    assert info.new_chunks > 0 and info.new_bytes > 0
    out = template_like(sd)
    ckptstore.load(out, s3_url, storage_options=s3_options)
    assert_same(sd, out)
    assert_same(sd, ckptstore.load_full(s3_url, step=10, storage_options=s3_options))

    # a second save of the same state uploads only its manifest
    again = ckptstore.save(sd, s3_url, step=11, storage_options=s3_options)
    assert again.new_chunks == 0 and again.new_bytes == again.manifest_bytes

    store = ckptstore.Store(s3_url, storage_options=s3_options)
    assert [c.step for c in store.list()] == [10, 11]
    assert store.latest() == layout.step_name(11)
    assert store.verify().ok
    assert store.inspect(step=10).tensors


def test_dcp_writer_reader(s3_url, s3_options):
    import torch.distributed.checkpoint as dcp

    sd = {"w": torch.randn(300, 700), "b": torch.arange(5)}
    dcp.save(sd, storage_writer=ckptstore.Writer(s3_url, step=1, storage_options=s3_options))
    out = template_like(sd)
    dcp.load(out, storage_reader=ckptstore.Reader(s3_url, step=1, storage_options=s3_options))
    assert_same(sd, out)


def test_resharding_on_load(s3_url, s3_options):
    """Save row blocks as separate shards of one tensor (what a 2-rank save writes) and read
    back other boxes: only the chunks overlapping each box are fetched."""
    full = torch.randn(512, 1024)
    ckptstore.save({"w": full}, s3_url, step=1, storage_options=s3_options, chunk_bytes=1 << 18)
    got = ckptstore.load_full(s3_url, storage_options=s3_options)
    assert_same({"w": full}, got)
    repo = Repository.open(s3_url, s3_options)
    from ckptstore.store.blobs import BlobReader

    shard = repo.manifest(repo.resolve()).tensors["w"].shards[0]
    reader = BlobReader(repo)
    rows = reader.read_rows(shard.blob, 128, 192, "w").view("float32").reshape(64, 1024)
    assert torch.equal(torch.from_numpy(rows.copy()), full[128:192])
    assert reader.objects_fetched == 1  # 64 rows of 4 KiB live in one 256 KiB chunk


def test_cli_ls_inspect_verify(s3_url, s3_server):
    ckptstore.save(state(2), s3_url, step=5, storage_options=s3_server.storage_options())
    creds = ["-o", "key=ckptstore-test", "-o", "secret=ckptstore-test-secret"]
    ep = ["--endpoint-url", s3_server.endpoint_url]
    proc = cli("ls", s3_url, *ep, *creds, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in json.loads(proc.stdout)] == [5]
    proc = cli("inspect", s3_url, *ep, *creds, "--json")
    assert proc.returncode == 0, proc.stderr
    proc = cli("verify", s3_url, *ep, *creds, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"]
    # the same from the environment alone
    proc = cli("ls", s3_url, "--json", env=s3_server.env())
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in json.loads(proc.stdout)] == [5]


def test_credentials_and_endpoint_from_environment(s3_url, s3_server, monkeypatch):
    import s3fs

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        sd = {"w": torch.randn(64, 64)}
        ckptstore.save(sd, s3_url, step=1)  # no storage_options at all
        assert_same(sd, ckptstore.load_full(s3_url))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_request_counts(s3_url, s3_options, monkeypatch):
    """One PUT per new chunk, none for chunks a committed checkpoint already holds (no
    existence check per chunk), one GET per chunk at load and no HEAD before it."""
    import s3fs

    calls: collections.Counter[tuple[str, str]] = collections.Counter()
    original = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        key = str(kwargs.get("Key", ""))
        area = key.split("/")[1] if key.count("/") >= 1 else key
        calls[(method, area)] += 1
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    sd = {"w": torch.randn(2048, 1024), "v": torch.randn(1024, 1024)}  # 3 chunks of 4 MiB
    info = ckptstore.save(sd, s3_url, step=1, storage_options=s3_options)
    assert info.chunks == info.new_chunks == 3
    assert calls[("put_object", "chunks")] == 3
    assert calls[("put_object", "checkpoints")] == 1
    calls.clear()
    again = ckptstore.save(sd, s3_url, step=2, storage_options=s3_options)
    assert again.new_chunks == 0
    assert calls[("put_object", "chunks")] == 0 and calls[("head_object", "chunks")] == 0
    assert calls[("put_object", "checkpoints")] == 1
    calls.clear()
    ckptstore.load(template_like(sd), s3_url, step=1, storage_options=s3_options)
    assert calls[("get_object", "chunks")] == 3
    # no HEAD before a chunk GET (resolving step=1 may cost one HEAD of its manifest)
    assert calls[("head_object", "chunks")] == 0


# -- create-only commits ---------------------------------------------------------------------
def test_manifest_is_create_only(s3_url, s3_options):
    sd = {"w": torch.randn(256, 256)}
    ckptstore.save(sd, s3_url, step=1, storage_options=s3_options)
    with pytest.raises(CheckpointExistsError):
        ckptstore.save({"w": torch.zeros(256, 256)}, s3_url, step=1, storage_options=s3_options)
    # the commit itself refuses, even when the early existence check is passed by (a race:
    # two sessions of one name begun before either committed)
    from ckptstore.store.session import SaveSession

    repo = Repository.open(s3_url, s3_options)
    manifest = repo.manifest(layout.step_name(1))
    manifest.name, manifest.step = layout.step_name(2), 2
    first = SaveSession(repo, manifest.name, step=2).begin()
    second = SaveSession(repo, manifest.name, step=2).begin()
    first.commit(manifest)
    with pytest.raises(CheckpointExistsError, match="already exists"):
        second.commit(manifest)
    assert second.lease is None  # released though the commit failed
    backend = open_backend(s3_url, s3_options)
    with pytest.raises(ObjectExistsError) as info:
        backend.put(layout.STORE_JSON, b"{}", create_only=True)
    assert "store.json" in str(info.value)
    assert_same(sd, ckptstore.load_full(s3_url, storage_options=s3_options))


# -- permanent errors: at once, naming bucket and key ------------------------------------------
class _SleepLog:
    """Stands in for the ``time`` module of the backend: records the retry backoffs."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        time.sleep(seconds)


def test_wrong_credentials(s3_url, s3_options, monkeypatch):
    ckptstore.save({"w": torch.randn(128, 128)}, s3_url, step=1, storage_options=s3_options)
    bad = {**s3_options, "secret": "not-the-secret"}
    backoffs = _SleepLog()
    monkeypatch.setattr(fsspec_backend, "time", backoffs)
    with pytest.raises(AccessDeniedError) as info:
        ckptstore.load_full(s3_url, storage_options=bad)
    assert backoffs.slept == []  # a permanent error: not retried
    assert S3_BUCKET in str(info.value) and "store.json" in str(info.value)
    assert isinstance(info.value, PermissionError)
    with pytest.raises(AccessDeniedError):
        ckptstore.save({"w": torch.zeros(2)}, s3_url, step=2, storage_options=bad)
    with pytest.raises(AccessDeniedError):
        ckptstore.Store(s3_url, storage_options={**s3_options, "key": "nobody"})


def test_read_only_identity_can_load_not_save(s3_url, s3_options):
    sd = {"w": torch.randn(300, 300)}
    ckptstore.save(sd, s3_url, step=1, storage_options=s3_options)
    reader = {**s3_options, "key": READER_KEY, "secret": READER_SECRET}
    assert_same(sd, ckptstore.load_full(s3_url, storage_options=reader))
    with pytest.raises(AccessDeniedError) as info:
        ckptstore.save({"w": torch.randn(300, 300)}, s3_url, step=2, storage_options=reader)
    assert s3_url + "/" in str(info.value) and "'ckpt'" in str(info.value)  # key and bucket
    assert [c.step for c in ckptstore.Store(s3_url, reader).list()] == [1]


def test_missing_bucket(s3_server, s3_options):
    url = "s3://no-such-bucket-here/run"
    with pytest.raises(BucketNotFoundError) as info:
        ckptstore.save({"w": torch.randn(4, 4)}, url, step=1, storage_options=s3_options)
    assert "'no-such-bucket-here'" in str(info.value)
    with pytest.raises(BucketNotFoundError):
        ckptstore.load_full(url, storage_options=s3_options)
    proc = cli("ls", url, env=s3_server.env())
    assert proc.returncode != 0
    assert "BucketNotFoundError" in proc.stderr and "no-such-bucket-here" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_chunk_deleted_behind_the_store(s3_url, s3_server, s3_options):
    sd = {"w": torch.randn(1024, 512), "v": torch.randn(1024, 512)}
    ckptstore.save(sd, s3_url, step=1, storage_options=s3_options, chunk_bytes=1 << 19)
    repo = Repository.open(s3_url, s3_options)
    victim = repo.manifest(layout.step_name(1)).tensors["v"].shards[0].blob.chunks[1]
    key = layout.chunk_key(victim.key.hex())
    open_backend(s3_url, s3_options).delete(key)
    with pytest.raises(ChunkNotFoundError) as info:
        ckptstore.load(template_like(sd), s3_url, storage_options=s3_options)
    assert key in str(info.value) and "'v'" in str(info.value)
    with pytest.raises(ChunkNotFoundError):
        ckptstore.load_full(s3_url, storage_options=s3_options)
    report = ckptstore.Store(s3_url, s3_options).verify()
    assert not report.ok and [p.chunk for p in report.problems] == [key]
    proc = cli("verify", s3_url, env=s3_server.env())
    assert proc.returncode == 1 and key in proc.stderr


# -- transient faults: a server that dies, is down, or hangs --------------------------------------
@pytest.fixture
def own_server(tmp_path):
    """A SeaweedFS of this test's own, to kill and restart."""
    server = start_s3_server(tmp_path / "data")
    yield server
    server.stop()


def test_server_killed_mid_save(own_server, monkeypatch):
    monkeypatch.setenv("CKPTSTORE_RETRIES", "2")
    monkeypatch.setenv("CKPTSTORE_RETRY_BASE_MS", "50")
    opts = own_server.storage_options()
    url = f"s3://{S3_BUCKET}/killed"
    first = {"w": torch.randn(512, 512), "step": 1}
    ckptstore.save(first, url, step=1, storage_options=opts)

    # kill the server from an upload thread once a few chunks of a 32-chunk save are stored
    counted = CountingBackend(open_backend(url, opts))
    faulty = FaultyBackend(counted)
    faulty.on("put", "chunks/*", lambda key: own_server.kill(), after=5, times=1)
    second = {"w": torch.randn(8192, 1024), "step": 2}  # 32 MiB, 1 MiB chunks
    backoffs = _SleepLog()
    monkeypatch.setattr(fsspec_backend, "time", backoffs)
    with pytest.raises(CkptStoreError) as info:
        ckptstore.save(second, faulty, step=2, chunk_bytes=1 << 20)
    assert isinstance(info.value, StorageUnavailableError), repr(info.value)
    assert "storage unavailable" in str(info.value) and "127.0.0.1" in str(info.value)
    assert "gave up after 3 tries" in str(info.value)  # CKPTSTORE_RETRIES=2, then the error
    # no request was tried more than 1 + RETRIES times, each retry after the knob's backoff
    # (50 ms doubling, jittered), and the save stopped handing out chunk uploads instead of
    # trying all 32 against a dead server
    assert faulty.stats.requests <= 3 * sum(counted.requests.values())
    assert backoffs.slept and max(backoffs.slept) <= 0.1
    assert len(backoffs.slept) == faulty.stats.retries
    assert counted.requests["put", "chunks"] < 32

    own_server.start()  # same data dir, same ports
    store = ckptstore.Store(url, storage_options=opts)
    assert [c.step for c in store.list()] == [1]  # nothing committed by the failed save
    assert store.verify().ok
    assert_same(first, ckptstore.load_full(url, storage_options=opts))
    info2 = ckptstore.save(second, url, step=2, storage_options=opts, chunk_bytes=1 << 20)
    assert info2.new_chunks > 0
    assert_same(second, ckptstore.load_full(url, step=2, storage_options=opts))


def _serial_io(monkeypatch, threads: int = 1) -> None:
    """Short retries; one upload at a time and ``threads`` encoders/readers, so what a
    failure stops can be counted exactly."""
    monkeypatch.setenv("CKPTSTORE_RETRIES", "2")
    monkeypatch.setenv("CKPTSTORE_RETRY_BASE_MS", "10")
    monkeypatch.setenv("CKPTSTORE_IO_REQUESTS", "1")
    monkeypatch.setenv("CKPTSTORE_THREADS", str(threads))


def test_save_stops_at_its_first_definitive_failure(own_server, monkeypatch, s3_calls):
    _serial_io(monkeypatch)
    opts = own_server.storage_options()
    url = f"s3://{S3_BUCKET}/stops"
    faulty = FaultyBackend(CountingBackend(open_backend(url, opts)))
    faulty.on("put", "chunks/*", lambda key: own_server.kill(), after=3, times=1)
    s3_calls.clear()
    with pytest.raises(StorageUnavailableError) as info:  # 32 chunks of 1 MiB
        ckptstore.save({"w": torch.randn(8192, 1024)}, faulty, step=1, chunk_bytes=1 << 20)
    chunk_puts = [key for op, key in faulty.log if op == "put" and key.startswith("chunks/")]
    # three chunks stored, the fourth tried 1 + RETRIES times against the dead server, and
    # not one request for the 28 encoded or queued behind it
    assert len(chunk_puts) == 4
    sent = [op for op, key in s3_calls if "/chunks/" in key]
    assert sent == ["put_object"] * (3 + 3)
    assert chunk_puts[3] in str(info.value) and "gave up after 3 tries" in str(info.value)
    assert any(op == "delete" and key.startswith("leases/") for op, key in faulty.log)


def test_load_stops_at_its_first_definitive_failure(own_server, monkeypatch, s3_calls):
    opts = own_server.storage_options()
    url = f"s3://{S3_BUCKET}/load-stops"
    sd = {"w": torch.randn(8192, 1024)}  # 32 chunks of 1 MiB
    ckptstore.save(sd, url, step=1, storage_options=opts, chunk_bytes=1 << 20)
    threads = 4
    _serial_io(monkeypatch, threads)
    faulty = FaultyBackend(CountingBackend(open_backend(url, opts)))
    faulty.on("get", "chunks/*", lambda key: own_server.kill(), after=3, times=1)
    s3_calls.clear()
    with pytest.raises(StorageUnavailableError) as info:
        ckptstore.load({"w": torch.empty(8192, 1024)}, faulty)
    chunk_gets = [key for op, key in faulty.log if op == "get" and key.startswith("chunks/")]
    # the reads in flight when the server died (one per reader thread) end, none queued
    # behind them starts: not 32 reads of 1 + RETRIES tries each
    assert len(chunk_gets) <= 3 + 2 * threads
    assert len([1 for _, key in s3_calls if "/chunks/" in key]) <= 3 + 2 * threads * 3
    assert "/chunks/" in str(info.value) and "127.0.0.1" in str(info.value)


def test_requests_per_new_chunk(s3_url, s3_options, s3_calls):
    """A save sends one request per new chunk (a create-only put: no existence probe) and a
    constant for lease, manifest and catalog; a load one per chunk and a constant."""
    rest = {}
    for n in (4, 12):
        sd = {f"t{i}": torch.randn(256, 1024) for i in range(n)}  # 1 MiB each
        url = f"{s3_url}/n{n}"
        s3_calls.clear()
        info = ckptstore.save(sd, url, step=1, storage_options=s3_options, chunk_bytes=1 << 20)
        assert info.new_chunks == n
        save_chunks = sorted(op for op, key in s3_calls if "/chunks/" in key)
        assert save_chunks == ["put_object"] * n
        save_rest = sorted(op for op, key in s3_calls if "/chunks/" not in key)
        s3_calls.clear()
        tpl = {k: torch.empty_like(v) for k, v in sd.items()}
        ckptstore.load(tpl, url, storage_options=s3_options)
        assert_same(sd, tpl)
        assert sorted(op for op, key in s3_calls if "/chunks/" in key) == ["get_object"] * n
        rest[n] = (save_rest, sorted(op for op, key in s3_calls if "/chunks/" not in key))
    assert rest[4] == rest[12]  # the same constant, whatever the number of chunks
    # the first save into an empty store: store.json (2), the name check (2), lease (1),
    # latest through refs/latest/ falling back to the catalog (s3fs lists an empty prefix
    # with LIST + HEAD + LIST: 9), the commit check (2), manifest, catalog entry and
    # pointer (4), release (1)
    assert len(rest[4][0]) <= 21 and len(rest[4][1]) <= 4


def test_server_down_at_load(own_server, monkeypatch):
    opts = own_server.storage_options()
    url = f"s3://{S3_BUCKET}/down"
    ckptstore.save({"w": torch.randn(64, 64)}, url, step=1, storage_options=opts)
    assert own_server.local_sockets()  # weed's /tmp/seaweedfs-*.sock, not under $TMPDIR
    own_server.kill()
    assert own_server.local_sockets() == []  # removed once it is gone: nothing left in /tmp
    backoffs = _SleepLog()
    monkeypatch.setattr(fsspec_backend, "time", backoffs)
    with pytest.raises(StorageUnavailableError) as info:
        ckptstore.load({"w": torch.empty(64, 64)}, url, storage_options=opts)
    # default knobs, the bound users get: 1 + RETRIES tries of the first read, with
    # jittered backoffs of RETRY_BASE_MS doubling (capped at 5 s) between them, then the error
    knobs = Settings.resolve()
    assert f"gave up after {1 + knobs.retries} tries" in str(info.value)
    caps = [min(5.0, knobs.retry_base_ms / 1000 * 2**a) for a in range(knobs.retries)]
    assert len(backoffs.slept) == len(caps)
    assert all(cap / 2 <= s <= cap for s, cap in zip(backoffs.slept, caps, strict=True))
    assert own_server.endpoint_url in str(info.value) and "store.json" in str(info.value)
    assert isinstance(info.value, ConnectionError)
    proc = cli("ls", url, "--endpoint-url", own_server.endpoint_url, env=own_server.env())
    assert proc.returncode == 5 and "StorageUnavailableError" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hanging_server_times_out(monkeypatch):
    """A server that accepts connections and never answers: bounded by the read timeout."""
    pytest.importorskip("s3fs")
    monkeypatch.setenv("CKPTSTORE_READ_TIMEOUT", "1")
    monkeypatch.setenv("CKPTSTORE_RETRIES", "1")
    monkeypatch.setenv("CKPTSTORE_RETRY_BASE_MS", "10")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        opts = {
            "key": "k",
            "secret": "s",
            "endpoint_url": f"http://127.0.0.1:{listener.getsockname()[1]}",
        }
        with pytest.raises(StorageUnavailableError) as info:
            ckptstore.Store(f"s3://{S3_BUCKET}/hang", storage_options=opts)
        assert "gave up after 2 tries" in str(info.value)  # CKPTSTORE_RETRIES=1
        assert "Read timeout" in str(info.value)
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        listener.close()
    assert len(held) == 2  # one connection per try: the client library retried nothing itself
