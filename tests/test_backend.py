import errno
import os
import threading
import time

import pytest

from ckptstore.backend import (
    Backend,
    BackendWrapper,
    Cancel,
    FsspecBackend,
    ObjectInfo,
    WrappedBackend,
    open_backend,
)
from ckptstore.errors import (
    BackendError,
    ObjectExistsError,
    StorageFullError,
    UnknownSchemeError,
)
from ckptstore.store import Repository
from ckptstore.testing.backend_suite import BackendSuite
from ckptstore.testing.faulty import FaultyBackend


class TestLocalBackend(BackendSuite):
    mtime_resolution = 0.02

    def make_backend(self, tmp_path):
        return open_backend(str(tmp_path / "root"))

    def test_leftover_temp_files_are_invisible(self, backend):
        backend.put("c/x", b"1")
        open(backend.root + "/c/.tmp-abc", "wb").close()
        assert backend.list("c") == ["c/x"]
        assert [i.key for i in backend.list_info("c")] == ["c/x"]
        # ... except to list_temp, with their age: what gc needs to collect stale ones
        os.utime(backend.root + "/c/.tmp-abc", (1000.0, 1000.0))
        assert backend.list_temp("") == [ObjectInfo("c/.tmp-abc", 0, 1000.0)]
        assert backend.capabilities.temp_files

    def test_failed_put_leaves_no_temp_file(self, backend):
        from ckptstore.errors import StorageFullError

        backend.put("f/ok", b"1")
        real_open = open

        def full_open(path, mode="r", *a, **kw):
            f = real_open(path, mode, *a, **kw)
            if "w" in mode and ".tmp-" in str(path):
                f.write(b"partial")  # some bytes made it, then the disk filled up
                f.close()
                raise OSError(errno.ENOSPC, "No space left on device", path)
            return f

        import builtins

        builtins.open = full_open
        try:
            with pytest.raises(StorageFullError):
                backend.put("f/big", b"x" * 1000)
        finally:
            builtins.open = real_open
        assert backend.list_temp("") == [] and backend.list("f") == ["f/ok"]

    def test_put_whose_temp_file_a_gc_deleted_fails_whole(self, backend, monkeypatch):
        real_link = os.link

        def link(src, dst):
            os.unlink(src)  # a gc deleted the temp file between the write and the link
            return real_link(src, dst)

        monkeypatch.setattr(os, "link", link)
        with pytest.raises(BackendError, match="temporary file was deleted"):
            backend.put("g/x", b"data", create_only=True)
        assert not backend.exists("g/x") and backend.list_temp("") == []


class TestFileUrlBackend(BackendSuite):
    mtime_resolution = 0.02

    def make_backend(self, tmp_path):
        return open_backend(f"file://{tmp_path}/root")


class TestMemoryBackend(BackendSuite):
    mtime_resolution = 0.02

    def make_backend(self, tmp_path):
        return open_backend(f"memory://{tmp_path.name}")


class TestWrappedLocalBackend(BackendSuite):
    """The plain wrapper base passes everything through."""

    mtime_resolution = 0.02

    def make_backend(self, tmp_path):
        return WrappedBackend(open_backend(str(tmp_path / "root")))


class TestFaultyMemoryBackend(BackendSuite):
    """The fault-injecting wrapper, with no fault set, is a conforming backend."""

    mtime_resolution = 0.02

    def make_backend(self, tmp_path):
        return FaultyBackend(open_backend(f"memory://{tmp_path.name}"))


def test_unknown_scheme():
    with pytest.raises(UnknownSchemeError) as info:
        open_backend("nosuchproto://bucket/x")
    assert "nosuchproto" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_capabilities_are_data(tmp_path):
    assert open_backend(str(tmp_path)).capabilities.local
    assert not open_backend("memory://caps").capabilities.local


# -- the interface -----------------------------------------------------------------------------
def test_backend_is_abstract():
    with pytest.raises(TypeError):
        Backend()  # type: ignore[abstract]
    assert BackendWrapper is WrappedBackend


def test_open_backend_gives_the_fsspec_implementation(tmp_path):
    backend = open_backend(str(tmp_path))
    assert type(backend) is FsspecBackend and isinstance(backend, Backend)


def test_wrapper_only_wraps_backends():
    with pytest.raises(TypeError, match="str"):
        WrappedBackend("memory://x")  # type: ignore[arg-type]


def test_wrapper_delegates_implementation_attributes(tmp_path):
    inner = open_backend(str(tmp_path / "r"))
    outer = FaultyBackend(WrappedBackend(inner))
    assert outer.path("a/b") == inner.path("a/b") and outer.root == inner.root
    assert "FaultyBackend(WrappedBackend(" in repr(outer)
    with pytest.raises(AttributeError):
        outer.no_such_attribute  # noqa: B018


class MinimalBackend(Backend):
    """Only the abstract methods, over a dict: the defaults (exists, list, batches) must
    make it a whole backend."""

    def __init__(self) -> None:
        from ckptstore.backend import Capabilities, Stats
        from ckptstore.errors import ObjectNotFoundError

        self.url = "minimal://"
        self.capabilities = Capabilities(atomic_put=True, atomic_create=True, local=False)
        self.stats = Stats()
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.lock = threading.Lock()
        self.missing = ObjectNotFoundError

    def _obj(self, key):
        try:
            return self.objects[key][0]
        except KeyError:
            raise self.missing(f"{self.describe(key)} not found") from None

    def get(self, key):
        return self._obj(key)

    def get_range(self, key, start, end):
        return self._obj(key)[start:end]

    def size(self, key):
        return len(self._obj(key))

    def put(self, key, data, *, create_only=False):
        with self.lock:
            if create_only and key in self.objects:
                raise ObjectExistsError(f"{self.describe(key)} already exists")
            self.objects[key] = (bytes(data), time.time())

    def delete(self, key):
        with self.lock:
            self.objects.pop(key, None)

    def list_info(self, prefix):
        base = prefix.rstrip("/") + "/" if prefix else ""
        with self.lock:
            items = list(self.objects.items())
        return sorted(
            ObjectInfo(k, len(d), t)
            for k, (d, t) in items
            if k.startswith(base) and ".tmp-" not in k
        )

    def describe(self, key):
        return f"minimal://{key}"


class TestMinimalBackend(BackendSuite):
    """A backend that implements only the abstract methods passes the whole suite."""

    mtime_resolution = 0.02
    lists_temp = False  # the default list_temp: its puts leave nothing

    def make_backend(self, tmp_path):
        return MinimalBackend()


# -- the fault-injecting wrapper ---------------------------------------------------------------
@pytest.fixture
def faulty(tmp_path):
    return FaultyBackend(open_backend(str(tmp_path / "root")))


def test_fail_the_nth_matching_put(faulty):
    fault = faulty.fail_puts("chunks/*", after=2, times=1)
    for i in range(5):
        if i == 2:
            with pytest.raises(BackendError, match=r"injected put failure #3 on .*chunks/3"):
                faulty.put(f"chunks/{i + 1}", b"x")
        else:
            faulty.put(f"chunks/{i + 1}", b"x")
    faulty.put("leases/a", b"x")
    assert faulty.list("chunks") == ["chunks/1", "chunks/2", "chunks/4", "chunks/5"]
    assert (fault.seen, fault.fired) == (5, 1)


def test_fail_every_later_delete_and_clear(faulty):
    for k in ("a/1", "a/2", "a/3"):
        faulty.put(k, b"x")
    faulty.fail_deletes("a/*", after=1)
    faulty.delete("a/1")
    for k in ("a/2", "a/3"):
        with pytest.raises(BackendError, match="injected delete failure"):
            faulty.delete(k)
    faulty.clear()
    faulty.delete("a/2")
    assert faulty.list("a") == ["a/3"]


def test_lost_answer_stores_then_fails(faulty):
    faulty.fail_puts("m", times=1, lost_answer=True, error=lambda w: ConnectionError(w))
    with pytest.raises(ConnectionError):
        faulty.put("m", b"mine", create_only=True)
    assert faulty.get("m") == b"mine"
    with pytest.raises(ObjectExistsError):
        faulty.put("m", b"mine", create_only=True)


def test_pause_holds_matching_deletes_until_released(faulty):
    faulty.put("chunks/x", b"1")
    faulty.put("other", b"2")
    gate = faulty.pause("delete", "chunks/*")
    faulty.delete("other")  # not matching: not held
    done = threading.Event()
    t = threading.Thread(target=lambda: (faulty.delete("chunks/x"), done.set()), daemon=True)
    t.start()
    assert gate.wait_reached(10)
    assert not done.wait(0.2) and faulty.exists("chunks/x")
    gate.release()
    t.join(10)
    assert done.is_set() and not faulty.exists("chunks/x")


def test_pause_released_by_timer(faulty):
    faulty.put("k", b"1")
    gate = faulty.pause("get", "k", release_after=0.3)
    assert not gate.go.is_set()
    assert faulty.get("k") == b"1"  # nobody released it by hand: the timer did
    assert gate.reached.is_set() and gate.go.is_set()


def test_hook_runs_before_the_nth_matching_call(faulty):
    seen = []
    faulty.on("put", "c/*", seen.append, after=1, times=2)
    for i in range(5):
        faulty.put(f"c/{i}", b"x")
    assert seen == ["c/1", "c/2"]
    faulty.on("get", "c/4", lambda key: (_ for _ in ()).throw(ConnectionError(key)))
    with pytest.raises(ConnectionError, match="c/4"):
        faulty.get("c/4")


def test_unknown_operation_is_refused(faulty):
    with pytest.raises(ValueError, match="unknown operation"):
        faulty.fail("rename")


def test_repository_opens_on_a_wrapper(tmp_path):
    faulty = FaultyBackend(open_backend(str(tmp_path / "store")))
    repo = Repository.open(faulty, create=True)
    assert repo.backend is faulty and repo.url == faulty.url
    assert faulty.count("put", "store.json") == 1
    assert Repository.open(faulty).config == repo.config


def test_filesystem_del_filter_is_removed_after_interleaved_opens():
    """Two opens overlapping (threads opening stores at once) leave the process's own
    unraisable hook in place once both are done, not the filter of one of them."""
    import sys

    from ckptstore.backend.fsspec_backend import _QuietFilesystemDel

    original = sys.unraisablehook
    first, second = _QuietFilesystemDel(), _QuietFilesystemDel()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first to start ends first
    assert sys.unraisablehook is not original  # the second still filters
    second.__exit__(None, None, None)
    assert sys.unraisablehook is original


def test_a_cancelled_batch_sends_nothing_after_its_first_failure(tmp_path):
    backend = FaultyBackend(open_backend(str(tmp_path / "s")))
    backend.storage_full("c/1")
    cancel = Cancel()
    with pytest.raises(StorageFullError) as first:
        backend.put_async("c/1", b"x", cancel=cancel).result(60)
    assert cancel.error is first.value
    later = backend.put_fresh_async("c/2", b"y", cancel=cancel)
    with pytest.raises(StorageFullError) as again:
        later.result(60)
    # the request never started, and its error is the first failure's, naming its object
    assert backend.count("put", "c/2") == 0 and not backend.exists("c/2")
    assert str(again.value) == str(first.value) and "c/1" in str(again.value)
    assert again.value.errno == errno.ENOSPC and again.value.__cause__ is first.value
    assert backend.put_fresh_async("c/3", b"z").result(60) is True  # no cancel: runs
