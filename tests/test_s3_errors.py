"""Error classification and the retry policy of the backend, without a server: the
exceptions are built the way s3fs builds them (botocore ClientError translated by
s3fs.errors.translate_boto_error, the original kept as __cause__)."""

from __future__ import annotations

import errno

import pytest

from ckptstore.backend import classify, open_backend
from ckptstore.errors import (
    AccessDeniedError,
    BackendError,
    BucketNotFoundError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageFullError,
    StorageUnavailableError,
)

botocore = pytest.importorskip("botocore.exceptions")
s3errors = pytest.importorskip("s3fs.errors")


def s3_error(code: str, status: int, message: str = "msg", condition: str | None = None):
    err = {"Code": code, "Message": message}
    if condition:
        err["Condition"] = condition
    client = botocore.ClientError(
        {"Error": err, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )
    return s3errors.translate_boto_error(client)


@pytest.mark.parametrize(
    "exc, kind",
    [
        (lambda: s3_error("AccessDenied", 403), "denied"),
        (lambda: s3_error("InvalidAccessKeyId", 403), "denied"),
        (lambda: s3_error("SignatureDoesNotMatch", 403), "denied"),
        (lambda: s3_error("403", 403, "Forbidden"), "denied"),
        (lambda: botocore.NoCredentialsError(), "denied"),
        (lambda: s3_error("NoSuchBucket", 404), "no_bucket"),
        (lambda: s3_error("NoSuchKey", 404), "not_found"),
        (lambda: s3_error("PreconditionFailed", 412), "precondition"),  # SeaweedFS: OSError
        (lambda: s3_error("PreconditionFailed", 412, condition="If-None-Match"), "precondition"),
        (lambda: s3_error("SlowDown", 503), "transient"),
        (lambda: s3_error("InternalError", 500), "transient"),
        (lambda: s3_error("ConditionalRequestConflict", 409), "transient"),
        (lambda: s3_error("RequestTimeout", 400), "transient"),
        (lambda: botocore.EndpointConnectionError(endpoint_url="http://x"), "transient"),
        (lambda: botocore.ReadTimeoutError(endpoint_url="http://x"), "transient"),
        (lambda: ConnectionResetError(errno.ECONNRESET, "reset"), "transient"),
        (lambda: TimeoutError(), "transient"),
        (lambda: s3_error("InvalidArgument", 400), "other"),
        (lambda: OSError(errno.ENOSPC, "disk full"), "full"),
        (lambda: OSError(errno.EDQUOT, "quota"), "full"),
        (lambda: s3_error("XMinioStorageFull", 507, "minimum free drive threshold"), "full"),
        (lambda: OSError(errno.EIO, "i/o"), "other"),
        (lambda: FileNotFoundError("x"), "not_found"),
    ],
)
def test_classify(exc, kind):
    assert classify(exc()).kind == kind


def test_seaweedfs_412_is_a_plain_oserror_and_still_means_exists():
    exc = s3_error("PreconditionFailed", 412, "At least one of the pre-conditions ...")
    assert type(exc) is OSError  # what s3fs raises for SeaweedFS's answer
    backend = open_backend("memory://x412")
    assert isinstance(backend.translate("m", exc, create_only=True), ObjectExistsError)


class Flaky:
    """Wraps a filesystem method: raise the given exceptions first, then call through."""

    def __init__(self, real, *errors):
        self.real, self.errors, self.calls = real, list(errors), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.real(*args, **kwargs)


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("CKPTSTORE_RETRIES", "3")
    monkeypatch.setenv("CKPTSTORE_RETRY_BASE_MS", "1")


def test_transient_errors_are_retried(fast_retries, monkeypatch):
    backend = open_backend("memory://retry")
    flaky = Flaky(backend.fs.pipe_file, s3_error("SlowDown", 503), ConnectionResetError())
    monkeypatch.setattr(backend.fs, "pipe_file", flaky)
    backend.put("k", b"v")
    assert flaky.calls == 3 and backend.get("k") == b"v"
    assert backend.stats.retries == 2 and backend.stats.puts == 3


def test_retries_are_bounded(fast_retries, monkeypatch):
    backend = open_backend("memory://bounded")
    flaky = Flaky(backend.fs.cat_file, *[TimeoutError("slow")] * 10)
    monkeypatch.setattr(backend.fs, "cat_file", flaky)
    with pytest.raises(StorageUnavailableError) as info:
        backend.get("k")
    assert flaky.calls == 4 and "4 tries" in str(info.value) and "k" in str(info.value)


@pytest.mark.parametrize(
    "exc, cls",
    [
        (lambda: s3_error("AccessDenied", 403), AccessDeniedError),
        (lambda: s3_error("NoSuchBucket", 404), BucketNotFoundError),
        (lambda: s3_error("NoSuchKey", 404), ObjectNotFoundError),
        (lambda: s3_error("InvalidArgument", 400), BackendError),
        (lambda: s3_error("XMinioStorageFull", 507), StorageFullError),
        (lambda: OSError(errno.ENOSPC, "No space left on device"), StorageFullError),
    ],
)
def test_permanent_errors_fail_at_once(fast_retries, monkeypatch, exc, cls):
    backend = open_backend("memory://permanent")
    flaky = Flaky(backend.fs.cat_file, exc(), exc())
    monkeypatch.setattr(backend.fs, "cat_file", flaky)
    with pytest.raises(cls):
        backend.get("some/key")
    assert flaky.calls == 1 and backend.stats.retries == 0


def test_retried_create_only_put_that_landed_is_success(fast_retries, monkeypatch):
    """The first try stored the object but its answer was lost; the retry gets 412."""
    backend = open_backend("memory://landed")
    real = backend.fs.pipe_file

    def lost_answer(path, value, mode="overwrite", **kw):
        real(path, value, mode=mode, **kw)
        raise ConnectionResetError("answer lost")

    calls = [0]

    def first_lost(path, value, mode="overwrite", **kw):
        calls[0] += 1
        if calls[0] == 1:
            return lost_answer(path, value, mode=mode, **kw)
        if backend.fs.exists(path):
            raise s3_error("PreconditionFailed", 412)
        return real(path, value, mode=mode, **kw)

    monkeypatch.setattr(backend.fs, "pipe_file", first_lost)
    backend.put("m", b"mine", create_only=True)  # no ObjectExistsError
    assert backend.get("m") == b"mine"
    calls[0] = 1  # another writer's object under the key: a real conflict
    with pytest.raises(ObjectExistsError):
        backend.put("m", b"theirs", create_only=True)


def test_non_storage_exceptions_are_not_translated(monkeypatch):
    backend = open_backend("memory://bug")
    monkeypatch.setattr(backend.fs, "cat_file", Flaky(backend.fs.cat_file, TypeError("a bug")))
    with pytest.raises(TypeError):
        backend.get("k")


def test_storage_full_on_put_is_not_retried(fast_retries, monkeypatch):
    backend = open_backend("memory://full")
    flaky = Flaky(backend.fs.pipe_file, OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setattr(backend.fs, "pipe_file", flaky)
    with pytest.raises(StorageFullError) as info:
        backend.put("chunks/ab/cd", b"x")
    assert flaky.calls == 1 and "chunks/ab/cd" in str(info.value)
    assert isinstance(info.value, BackendError) and isinstance(info.value, OSError)
    assert not backend.exists("chunks/ab/cd")
