import pytest

from ckptstore.backend import open_backend
from ckptstore.errors import UnknownSchemeError
from ckptstore.testing.backend_suite import BackendSuite


class TestLocalBackend(BackendSuite):
    def make_backend(self, tmp_path):
        return open_backend(str(tmp_path / "root"))

    def test_temp_files_are_invisible(self, backend):
        backend.put("c/x", b"1")
        (backend.root + "/c/.tmp-abc") and open(backend.root + "/c/.tmp-abc", "wb").close()
        assert backend.list("c") == ["c/x"]


class TestFileUrlBackend(BackendSuite):
    def make_backend(self, tmp_path):
        return open_backend(f"file://{tmp_path}/root")


class TestMemoryBackend(BackendSuite):
    def make_backend(self, tmp_path):
        return open_backend(f"memory://{tmp_path.name}")


def test_unknown_scheme():
    with pytest.raises(UnknownSchemeError) as info:
        open_backend("nosuchproto://bucket/x")
    assert "nosuchproto" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_capabilities_are_data(tmp_path):
    assert open_backend(str(tmp_path)).capabilities.local
    assert not open_backend("memory://caps").capabilities.local
