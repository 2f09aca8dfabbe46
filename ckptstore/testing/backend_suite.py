"""Conformance suite every backend must pass. Subclass and define ``make_backend``.

class TestLocal(BackendSuite):
    def make_backend(self, tmp_path):
        return open_backend(str(tmp_path))
"""

from __future__ import annotations

import threading

import pytest

from ckptstore.backend import Backend
from ckptstore.errors import ObjectExistsError, ObjectNotFoundError


class BackendSuite:
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
