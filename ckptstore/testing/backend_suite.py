"""Conformance suite every backend must pass: the contract of
:class:`ckptstore.backend.Backend`, test by test. Subclass it and define ``make_backend``
(or override the ``backend`` fixture):

class TestLocal(BackendSuite):
    def make_backend(self, tmp_path):
        return open_backend(str(tmp_path))

Wrappers pass it too (``tests/test_backend.py`` runs it on the fault-injecting wrapper), and
every backend is checked once more under a :class:`~ckptstore.testing.faulty.FaultyBackend`.
"""

from __future__ import annotations

import threading
import time

import pytest

from ckptstore.backend import Backend, Capabilities, ObjectInfo, Stats
from ckptstore.errors import (
    BackendError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageFullError,
)
from ckptstore.knobs import DEFAULTS


class BackendSuite:
    mtime_resolution: float = 1.0
    """Seconds between two puts that must yield different modification times (S3 stamps
    whole seconds; a subclass whose storage stamps finer may lower it to save time)."""
    lists_temp: bool = True
    """Whether :meth:`Backend.list_temp` lists temporary objects (False only for a backend
    whose puts leave none and that keeps the default, which lists nothing)."""
    clock_tolerance: float | None = None
    """How far the storage's clock may be from this machine's; None: the ``CLOCK_SKEW``
    knob, the bound gc's safety assumes (docs/format.md)."""

    def make_backend(self, tmp_path) -> Backend:  # pragma: no cover - abstract
        raise NotImplementedError

    @pytest.fixture
    def backend(self, tmp_path) -> Backend:
        return self.make_backend(tmp_path)

    def test_put_get_roundtrip(self, backend: Backend) -> None:
        backend.put("a/b/c.bin", b"hello")
        assert backend.get("a/b/c.bin") == b"hello"
        assert backend.exists("a/b/c.bin")
        assert backend.size("a/b/c.bin") == 5

    def test_put_accepts_memoryview_and_empty(self, backend: Backend) -> None:
        backend.put("x", memoryview(b"abc"))
        backend.put("empty", b"")
        assert backend.get("x") == b"abc"
        assert backend.get("empty") == b""

    def test_overwrite_replaces(self, backend: Backend) -> None:
        backend.put("k", b"one")
        backend.put("k", b"two")
        assert backend.get("k") == b"two"

    def test_create_only_refuses_existing(self, backend: Backend) -> None:
        backend.put("m", b"first", create_only=True)
        with pytest.raises(ObjectExistsError) as info:
            backend.put("m", b"second", create_only=True)
        assert "m" in str(info.value)
        assert backend.get("m") == b"first"

    def test_create_only_race_has_one_winner(self, backend: Backend) -> None:
        wins: list[int] = []
        barrier = threading.Barrier(4)

        def attempt(i: int) -> None:
            barrier.wait()
            try:
                backend.put("race", str(i).encode(), create_only=True)
                wins.append(i)
            except ObjectExistsError:
                pass

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert backend.get("race") == str(wins[0]).encode()

    def test_missing_raises_not_found(self, backend: Backend) -> None:
        with pytest.raises(ObjectNotFoundError) as info:
            backend.get("nope/absent")
        assert "nope/absent" in str(info.value)
        assert isinstance(info.value, FileNotFoundError)
        assert not backend.exists("nope/absent")

    def test_get_range(self, backend: Backend) -> None:
        backend.put("r", bytes(range(100)))
        assert backend.get_range("r", 10, 20) == bytes(range(10, 20))

    def test_list_is_recursive_sorted_relative(self, backend: Backend) -> None:
        for k in ["p/2", "p/1", "p/q/3", "other/4"]:
            backend.put(k, b"x")
        assert backend.list("p") == ["p/1", "p/2", "p/q/3"]
        assert backend.list("missing") == []

    def test_delete(self, backend: Backend) -> None:
        backend.put("d", b"x")
        backend.delete("d")
        assert not backend.exists("d")
        backend.delete("d")  # absent is fine

    def test_batches(self, backend: Backend) -> None:
        items = {f"b/{i:03d}": bytes([i]) * (i + 1) for i in range(40)}
        backend.put_many(items)
        got = backend.get_many(list(items))
        assert got == items

    def test_is_a_backend(self, backend: Backend) -> None:
        assert isinstance(backend, Backend)
        assert isinstance(backend.url, str) and backend.url
        assert isinstance(backend.capabilities, Capabilities)
        assert isinstance(backend.stats, Stats)
        assert "some/key.bin" in backend.describe("some/key.bin")

    def test_missing_object_in_every_read(self, backend: Backend) -> None:
        for read in (
            lambda: backend.size("gone/x"),
            lambda: backend.get_range("gone/x", 0, 4),
        ):
            with pytest.raises(ObjectNotFoundError) as info:
                read()
            assert "gone/x" in str(info.value)

    def test_get_range_past_the_end(self, backend: Backend) -> None:
        backend.put("r2", b"0123456789")
        assert backend.get_range("r2", 6, 100) == b"6789"
        assert backend.get_range("r2", 0, 10) == b"0123456789"

    def test_put_async(self, backend: Backend) -> None:
        futures = [backend.put_async(f"pa/{i}", bytes([i]) * 10) for i in range(8)]
        for f in futures:
            assert f.result(60) is None
        assert backend.list("pa") == [f"pa/{i}" for i in range(8)]
        with pytest.raises(ObjectExistsError):
            backend.put_async("pa/0", b"again", create_only=True).result(60)

    # -- list_info: what gc's safety rests on --------------------------------------------------
    def _tolerance(self) -> float:
        tol = self.clock_tolerance
        return float(DEFAULTS.clock_skew if tol is None else tol)

    def _info(self, backend: Backend, key: str) -> ObjectInfo:
        (found,) = [i for i in backend.list_info(key.rsplit("/", 1)[0]) if i.key == key]
        return found

    def test_list_info_keys_and_sizes(self, backend: Backend) -> None:
        sizes = {"li/b": 3, "li/a": 0, "li/sub/c": 1000, "other/d": 7}
        for k, n in sizes.items():
            backend.put(k, b"x" * n)
        infos = backend.list_info("li")
        assert all(isinstance(i, ObjectInfo) for i in infos)
        assert [i.key for i in infos] == backend.list("li") == ["li/a", "li/b", "li/sub/c"]
        assert {i.key: i.size for i in infos} == {k: n for k, n in sizes.items() if "li/" in k}
        assert backend.list_info("missing") == []
        assert {i.key for i in backend.list_info("")} >= set(sizes)

    def test_list_info_mtime_is_the_storage_clock_now(self, backend: Backend) -> None:
        before = time.time()
        backend.put("mt/x", b"abc")
        after = time.time()
        mtime = self._info(backend, "mt/x").mtime
        assert mtime is not None, "no modification time: gc could never collect anything"
        slack = self._tolerance() + self.mtime_resolution
        assert before - slack <= mtime <= after + slack

    def test_overwrite_moves_mtime_forward(self, backend: Backend) -> None:
        backend.put("ow/x", b"one")
        first = self._info(backend, "ow/x")
        time.sleep(self.mtime_resolution + 0.05)
        backend.put("ow/x", b"second")
        second = self._info(backend, "ow/x")
        assert second.size == 6
        assert first.mtime is not None and second.mtime is not None
        assert second.mtime > first.mtime

    def test_refused_create_only_keeps_object_and_mtime(self, backend: Backend) -> None:
        backend.put("co/x", b"first", create_only=True)
        first = self._info(backend, "co/x")
        time.sleep(self.mtime_resolution + 0.05)
        with pytest.raises(ObjectExistsError):
            backend.put("co/x", b"second!", create_only=True)
        assert self._info(backend, "co/x") == first
        assert backend.get("co/x") == b"first"

    def test_put_fresh_says_whether_it_created_and_always_writes(self, backend: Backend) -> None:
        # what a save puts every chunk with (docs/format.md rule 7): the answer is for the
        # figures, the write is for gc safety — a found object's time must move forward too
        assert backend.put_fresh_async("pf/x", b"one").result(60) is True
        first = self._info(backend, "pf/x")
        time.sleep(self.mtime_resolution + 0.05)
        assert backend.put_fresh("pf/x", b"again") is False
        second = self._info(backend, "pf/x")
        assert backend.get("pf/x") == b"again" and second.size == 5
        assert first.mtime is not None and second.mtime is not None
        assert second.mtime > first.mtime
        assert backend.list("pf") == ["pf/x"]  # no temporary object left behind

    def test_temp_files_are_hidden(self, backend: Backend) -> None:
        for k in ["t/x", "t/.tmp-abc", "t/.tmp-dir/y", "t/z/.tmp-1"]:
            backend.put(k, b"1")
        assert backend.list("t") == ["t/x"]
        assert [i.key for i in backend.list_info("t")] == ["t/x"]
        assert [k for k in backend.list("") if "tmp" in k] == []

    def test_list_temp_lists_what_list_hides(self, backend: Backend) -> None:
        before = time.time()
        for k, n in {"t/x": 1, "t/.tmp-abc": 3, "t/.tmp-dir/y": 2, "t/z/.tmp-1": 5}.items():
            backend.put(k, b"1" * n)
        after = time.time()
        temps = backend.list_temp("t")
        assert all(isinstance(i, ObjectInfo) for i in temps)
        assert [i.key for i in temps] == sorted(i.key for i in temps)
        if not self.lists_temp:
            assert backend.capabilities.temp_files is False
            assert temps == []
            return
        sizes = {"t/.tmp-abc": 3, "t/.tmp-dir/y": 2, "t/z/.tmp-1": 5}
        assert {i.key: i.size for i in temps} == sizes
        assert {i.key for i in backend.list_temp("")} >= {i.key for i in temps}
        assert backend.list_temp("t/z") == [i for i in temps if i.key == "t/z/.tmp-1"]
        assert backend.list_temp("missing") == []
        slack = self._tolerance() + self.mtime_resolution
        for i in temps:
            assert i.mtime is not None and before - slack <= i.mtime <= after + slack
        # delete removes one (gc does that with stale ones); the rest stays as it was
        backend.delete("t/.tmp-abc")
        assert [i.key for i in backend.list_temp("t")] == ["t/.tmp-dir/y", "t/z/.tmp-1"]
        assert backend.list("t") == ["t/x"]

    # -- wrappers compose over it ----------------------------------------------------------------
    def test_faulty_wrapper_composes(self, backend: Backend) -> None:
        from ckptstore.testing.faulty import FaultyBackend

        faulty = FaultyBackend(backend)
        assert isinstance(faulty, Backend)
        assert faulty.url == backend.url and faulty.stats is backend.stats
        assert faulty.capabilities == backend.capabilities
        assert faulty.describe("k") == backend.describe("k")
        # the second matching put fails, and stores nothing; the rest go through
        third = faulty.fail_puts("w/*", after=1, times=1)
        faulty.put("w/1", b"1")
        with pytest.raises(BackendError, match="injected put failure #2"):
            faulty.put("w/2", b"2")
        faulty.put("w/3", b"3")
        faulty.put("elsewhere", b"4")
        assert backend.list("w") == ["w/1", "w/3"] and third.fired == 1
        # a full disk; damaged reads leave the stored object alone
        faulty.storage_full("full/*")
        with pytest.raises(StorageFullError) as info:
            faulty.put("full/x", b"x")
        assert isinstance(info.value, OSError) and not backend.exists("full/x")
        faulty.corrupt_gets("w/1")
        faulty.truncate_gets("w/3")
        backend.put("w/1", b"0123456789")
        assert faulty.get("w/1") != b"0123456789" and backend.get("w/1") == b"0123456789"
        assert len(faulty.get("w/1")) == 10 and faulty.get("w/3") == b""
        # batches go through the wrapper's own single-object methods
        faulty.clear()
        faulty.put_many({f"m/{i}": b"m" for i in range(5)})
        assert faulty.get_many([f"m/{i}" for i in range(5)]) == {f"m/{i}": b"m" for i in range(5)}
        assert faulty.count("put", "m/*") == 5 and faulty.count("get", "m/*") == 5
        assert faulty.count("put") == 10
        assert [i.key for i in faulty.list_info("m")] == faulty.list("m")
