"""The fsspec implementation of the :class:`~ckptstore.backend.base.Backend` contract.

Keys are '/'-separated paths relative to the store root. Every put is atomic (a reader sees
the whole object or none of it) and a create-only put never replaces an existing object:
local files are written to a temporary name and renamed (``os.replace``; ``os.link`` for
create-only), object stores get ``pipe_file(mode="create")`` (S3: ``If-None-Match: *``).
What each filesystem guarantees is recorded in :class:`Capabilities`, not tested by
protocol name elsewhere.

This module is the only one that knows fsspec, s3fs and botocore: every failure leaves it as
a :class:`~ckptstore.errors.CkptStoreError` naming the object (and the bucket and endpoint
where there is one). Transient failures (5xx, throttling, connection reset or refused,
timeouts) are tried again with exponential backoff a bounded number of times (knobs
``RETRIES``, ``RETRY_BASE_MS``); permanent ones (access denied, bad credentials, no such
bucket, not found) fail at once. Object-store clients get bounded connect/read timeouts
(knobs ``CONNECT_TIMEOUT``, ``READ_TIMEOUT``) and no retries of their own, so one layer
decides how long a dead server is waited for.
"""

from __future__ import annotations

import errno
import gc
import inspect
import os
import random
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckptstore.backend.base import (
    TEMP_PREFIX,
    Backend,
    Capabilities,
    ObjectInfo,
    Stats,
    current_cancel,
    io_pool,
    is_temp,
)
from ckptstore.errors import (
    AccessDeniedError,
    BackendError,
    BucketNotFoundError,
    CkptStoreError,
    InvalidURLError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageFullError,
    StorageUnavailableError,
    StoreNotFoundError,
    UnknownSchemeError,
)
from ckptstore.knobs import Settings

__all__ = [
    "Backend",
    "Capabilities",
    "Failure",
    "FsspecBackend",
    "ObjectInfo",
    "Stats",
    "classify",
    "io_pool",
    "open_backend",
]

T = TypeVar("T")

S3_PROTOCOLS = ("s3", "s3a")

# S3 error codes (the response's Error.Code), by what they mean here
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "MissingSecurityHeader",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "UnauthorizedAccess",
        "Forbidden",
        "403",
        "401",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "BandwidthLimitExceeded",
        "ConditionalRequestConflict",  # AWS: concurrent conditional writes; retry
        "InternalError",
        "OperationAborted",
        "PriorRequestNotComplete",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    }
)
# the storage is out of space or over a quota (MinIO: XMinioStorageFull, HTTP 507)
_FULL_CODES = frozenset(
    {"XMinioStorageFull", "StorageFull", "QuotaExceeded", "XMinioAdminBucketQuotaExceeded"}
)
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# exception class names (anywhere in the MRO of anything in the cause chain) from botocore,
# aiohttp, fsspec and the builtins
_DENIED_TYPES = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "UnauthorizedSSOTokenError",
        "SSOTokenLoadError",
        "TokenRetrievalError",
    }
)
_PERMANENT_TYPES = frozenset({"SSLError", "ClientSSLError", "ClientConnectorCertificateError"})
_TRANSIENT_TYPES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ProxyConnectionError",
        "IncompleteReadError",
        "ResponseStreamingError",
        "HTTPClientError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "ConnectionTimeoutError",
        "SocketTimeoutError",
        "FSTimeoutError",
        "ResponseParserError",
        "IncompleteRead",
        "TimeoutError",
        "ConnectionError",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.EAGAIN,
        errno.EBUSY,  # s3fs's translation of 503 SlowDown
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)
# modules whose exceptions are storage failures (anything else is a bug: not translated)
_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "fsspec", "s3fs", "asyncio", "urllib3")


@dataclass(frozen=True)
class Failure:
    """What a storage exception means: ``kind`` is one of denied, no_bucket, not_found,
    exists, precondition, full, transient, other; ``code``/``status`` come from an S3 response."""

    kind: str
    code: str | None = None
    status: int | None = None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def classify(exc: BaseException) -> Failure:
    """Sort a storage exception (s3fs, botocore, aiohttp, OS) into a :class:`Failure`."""
    chain = _chain(exc)
    code: str | None = None
    status: int | None = None
    names: set[str] = set()
    errnos: set[int] = set()
    for e in chain:
        names.update(t.__name__ for t in type(e).__mro__)
        if isinstance(e, OSError) and isinstance(e.errno, int):
            errnos.add(e.errno)
        response = getattr(e, "response", None)
        if isinstance(response, dict) and code is None and status is None:
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in _DENIED_CODES or status in (401, 403) or names & _DENIED_TYPES:
        return Failure("denied", code, status)
    if isinstance(exc, PermissionError) and code is None:
        return Failure("denied", code, status)
    if code == "NoSuchBucket":
        return Failure("no_bucket", code, status)
    if code in _FULL_CODES or status == 507 or errnos & _FULL_ERRNOS:
        return Failure("full", code, status)
    if code == "PreconditionFailed" or status == 412:
        return Failure("precondition", code, status)
    if isinstance(exc, FileExistsError):
        return Failure("exists", code, status)
    if code in ("NoSuchKey", "NotFound", "404") or status == 404:
        return Failure("not_found", code, status)
    if isinstance(exc, FileNotFoundError):
        return Failure("not_found", code, status)
    if names & _PERMANENT_TYPES:
        return Failure("other", code, status)
    if (
        code in _TRANSIENT_CODES
        or (status is not None and (status >= 500 or status == 429))
        or names & _TRANSIENT_TYPES
        or errnos & _TRANSIENT_ERRNOS
    ):
        return Failure("transient", code, status)
    return Failure("other", code, status)


def _is_storage_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    return any((t.__module__ or "").split(".")[0] in _STORAGE_MODULES for t in type(exc).__mro__)


def _detail(exc: BaseException, failure: Failure) -> str:
    text = str(exc) or type(exc).__name__
    extra = [str(x) for x in (failure.code, failure.status) if x is not None]
    tag = "/".join(dict.fromkeys(extra))
    return f"{text} [{tag}]" if tag and str(tag) not in text else text


class FsspecBackend(Backend):
    """The :class:`Backend` contract over any fsspec filesystem (local, memory, s3, …)."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        url: str,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        is_local = isinstance(fs, LocalFileSystem)
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.capabilities = Capabilities(
            atomic_put=True,
            atomic_create=True,
            local=is_local,
            temp_files=is_local,
            remote=any(p in S3_PROTOCOLS or p.startswith("http") for p in protocols),
        )
        self.stats = Stats()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["stats"] = Stats()
        return state

    # -- keys ---------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """The filesystem path of ``key``."""
        return f"{self.root}/{key}" if self.root else key

    def describe(self, key: str) -> str:
        """A human-readable location of ``key`` for error messages."""
        return f"{self.url.rstrip('/')}/{key}"

    @property
    def endpoint(self) -> str | None:
        """The object-store endpoint URL, where one was configured."""
        ep = getattr(self.fs, "endpoint_url", None)
        if not ep:
            ep = (getattr(self.fs, "client_kwargs", None) or {}).get("endpoint_url")
        return ep or None

    def bucket(self, key: str = "") -> str:
        """The first component of the object's path (the bucket, on object stores)."""
        return self.fs._strip_protocol(self.path(key)).lstrip("/").split("/", 1)[0]

    # -- single-object operations --------------------------------------------------------
    def get(self, key: str) -> bytes:
        """The whole object. Raises ObjectNotFoundError if absent."""
        data = self._guard(key, lambda: self.fs.cat_file(self.path(key)), op="gets")
        self.stats.add(bytes_in=len(data))
        return data

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object."""
        data = self._guard(
            key, lambda: self.fs.cat_file(self.path(key), start=start, end=end), op="gets"
        )
        self.stats.add(bytes_in=len(data))
        return data

    def exists(self, key: str) -> bool:
        return bool(self._guard(key, lambda: self.fs.exists(self.path(key)), op="heads"))

    def size(self, key: str) -> int:
        return int(self._guard(key, lambda: self.fs.size(self.path(key)), op="heads"))

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        """Store ``data`` under ``key`` atomically.

        With ``create_only`` the put fails with ObjectExistsError if the key exists, and
        never replaces it, even against a concurrent writer (S3: ``If-None-Match: *``).
        """
        if self.capabilities.local:
            self._guard(key, lambda: self._put_local(key, data, create_only), create_only, "puts")
            self.stats.add(bytes_out=len(data))
            return
        mode = "create" if create_only else "overwrite"
        payload = bytes(data)
        tries = [0]

        def once() -> None:
            tries[0] += 1
            try:
                self.fs.pipe_file(self.path(key), payload, mode=mode)
            except Exception as exc:
                # a retried create-only put may meet the object its own earlier try wrote
                # (the response was lost): that is success, not a conflict
                if (
                    create_only
                    and tries[0] > 1
                    and classify(exc).kind in ("exists", "precondition")
                    and self.fs.cat_file(self.path(key)) == payload
                ):
                    return
                raise

        self._guard(key, once, create_only, "puts")
        self.stats.add(bytes_out=len(payload))

    def put_fresh(self, key: str, data: bytes | memoryview) -> bool:
        """One create-only put (S3: ``If-None-Match: *``; locally a link), and only where
        the key was taken a plain put after it, so a new object costs one request, not an
        existence probe (s3fs's ``exists`` is a HEAD and, on a miss, a LIST) and a put.

        Unlike :meth:`put` with ``create_only``, a retry that finds the object is not taken
        for success: the object may predate this call, so it is put again (its modification
        time must be this put's; docs/format.md rule 7) and reported as found."""
        if self.capabilities.local:
            created = self._guard(key, lambda: self._put_local(key, data, None), op="puts")
            self.stats.add(bytes_out=len(data))
            return bool(created)
        payload = bytes(data)
        try:
            self._guard(
                key,
                lambda: self.fs.pipe_file(self.path(key), payload, mode="create"),
                True,
                "puts",
            )
            created = True
        except ObjectExistsError:
            self._guard(
                key, lambda: self.fs.pipe_file(self.path(key), payload, mode="overwrite"), op="puts"
            )
            created = False
        self.stats.add(bytes_out=len(payload))
        return created

    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error."""
        try:
            self._guard(key, lambda: self.fs.rm_file(self.path(key)), op="deletes")
        except ObjectNotFoundError:
            pass

    def list(self, prefix: str) -> list[str]:
        """Keys under folder ``prefix`` (recursively), relative to the root, sorted."""
        base = self.path(prefix).rstrip("/")
        if self.capabilities.local:  # names only: os.scandir, no stat per file (fsspec's
            return self._guard(prefix, lambda: _walk_names(base, prefix), op="lists")  # find)
        try:
            found = self._guard(prefix, lambda: self.fs.find(base), op="lists")
        except ObjectNotFoundError:
            return []
        root = self.fs._strip_protocol(self.root).rstrip("/") if self.root else ""
        keys = []
        for p in found:
            p = self.fs._strip_protocol(p)
            rel = p[len(root) + 1 :] if root and p.startswith(root + "/") else p.lstrip("/")
            if is_temp(rel):
                continue
            keys.append(rel)
        return sorted(keys)

    # -- internals ----------------------------------------------------------------------
    def _put_local(self, key: str, data: bytes | memoryview, create_only: bool | None) -> bool:
        """Write ``data`` to a temporary file and link (``create_only``) or rename it into
        place. ``create_only=None``: link, and where the name is taken rename over it; the
        result says whether the link made the object."""
        dst = self.fs._strip_protocol(self.path(key))
        folder = os.path.dirname(dst)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:  # a full disk fails here: the finally removes tmp
                f.write(data)
                if self.settings.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            try:
                if create_only is None:
                    try:
                        os.link(tmp, dst)
                        return True
                    except FileExistsError:
                        os.replace(tmp, dst)
                        return False
                if create_only:
                    os.link(tmp, dst)  # atomic, fails if dst exists
                else:
                    os.replace(tmp, dst)
                return True
            except FileExistsError as exc:
                raise ObjectExistsError(f"{self.describe(key)} already exists") from exc
            except FileNotFoundError as exc:
                if os.path.exists(folder):
                    # a gc took the file for a leftover (docs/format.md, "Temporary files"):
                    # the put fails whole, nothing was stored under the key
                    raise BackendError(
                        f"put of {self.describe(key)} failed: its temporary file was deleted "
                        "before it was renamed into place (a gc with a very short grace?)"
                    ) from exc
                raise
        finally:
            try:
                os.unlink(tmp)  # a failed write (full disk, error) leaves no temp file
            except FileNotFoundError:
                pass

    def _where(self) -> str:
        ep = self.endpoint
        return f" at {ep}" if ep else ""

    def translate(self, key: str, exc: BaseException, create_only: bool = False) -> CkptStoreError:
        """The ckptstore error for a storage exception raised while handling ``key``."""
        failure = classify(exc)
        where = self.describe(key)
        detail = _detail(exc, failure)
        kind = failure.kind
        if kind == "denied":
            return AccessDeniedError(
                f"access denied to {where}{self._where()}: {detail} — check the credentials "
                f"(key/secret, profile, AWS_* environment variables) and their permissions "
                f"on bucket {self.bucket(key)!r}"
                if self.capabilities.remote
                else f"permission denied on {where}: {detail}"
            )
        if kind == "no_bucket":
            return BucketNotFoundError(
                f"bucket {self.bucket(key)!r} does not exist{self._where()} (accessing "
                f"{where}); create it first — ckptstore does not create buckets"
            )
        if kind in ("exists", "precondition") and create_only:
            return ObjectExistsError(f"{where} already exists")
        if kind == "not_found":
            return ObjectNotFoundError(f"{where} not found")
        if kind == "full":
            return StorageFullError(f"storage full writing {where}{self._where()}: {detail}")
        if kind == "transient":
            return StorageUnavailableError(
                f"storage unavailable for {where}{self._where()}: {detail}"
            )
        return BackendError(f"storage error on {where}{self._where()}: {detail}")

    def _guard(
        self, key: str, fn: Callable[[], T], create_only: bool = False, op: str | None = None
    ) -> T:
        """Run one storage call: retry transient failures with backoff, translate the rest
        into the ckptstore tree. ``op`` names the :class:`Stats` counter of each try."""
        tries = 1 + max(0, self.settings.retries)
        base = max(0, self.settings.retry_base_ms) / 1000
        t0 = time.monotonic()
        cancel = current_cancel()
        for attempt in range(tries):
            if cancel is not None and attempt == 0:
                cancel.check()  # the batch failed already: this request does not start
            if op is not None:
                self.stats.add(**{op: 1})
            try:
                return fn()
            except CkptStoreError:
                raise
            except Exception as exc:
                if not _is_storage_error(exc):
                    raise
                err = self.translate(key, exc, create_only)
                if not isinstance(err, StorageUnavailableError):
                    raise err from exc
                if attempt + 1 >= tries:
                    raise StorageUnavailableError(
                        f"{err} (gave up after {tries} tries in {time.monotonic() - t0:.1f}s)"
                    ) from exc
                if cancel is not None and cancel.is_set():
                    raise _stopped(err, attempt) from exc
                self.stats.add(retries=1)
                time.sleep(min(5.0, base * 2**attempt) * random.uniform(0.5, 1.0))
                if cancel is not None and cancel.is_set():  # set while this one waited
                    raise _stopped(err, attempt) from exc
        raise AssertionError("unreachable")

    # -- listing with metadata (gc, du) ----------------------------------------------------
    def _find_info(self, prefix: str, temp: bool) -> list[ObjectInfo]:
        base = self.path(prefix).rstrip("/")
        self.stats.add(lists=1)
        try:
            found = self._guard(prefix, lambda: self.fs.find(base, detail=True))
        except ObjectNotFoundError:
            return []
        root = self.fs._strip_protocol(self.root).rstrip("/") if self.root else ""
        out = []
        for p, info in found.items():
            p = self.fs._strip_protocol(p)
            rel = p[len(root) + 1 :] if root and p.startswith(root + "/") else p.lstrip("/")
            if is_temp(rel) != temp:
                continue
            out.append(ObjectInfo(rel, int(info.get("size") or 0), _modified(info)))
        return sorted(out)

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        """Like :meth:`list`, with each object's size and last-modified time: Unix seconds
        by the storage's clock (an overwrite counts as a modification), or None where the
        filesystem does not say. One listing, no request per object."""
        return self._find_info(prefix, temp=False)

    def list_temp(self, prefix: str) -> list[ObjectInfo]:
        """The ``.tmp-*`` objects under ``prefix`` with size and mtime (one listing). On a
        local filesystem these are what :meth:`put` writes before its rename, left behind by
        a process killed mid-put; on other filesystems a put leaves none, and only keys that
        something else stored under such names are found."""
        return self._find_info(prefix, temp=True)


def _stopped(err: CkptStoreError, attempt: int) -> StorageUnavailableError:
    return StorageUnavailableError(
        f"{err} (not tried again after {attempt + 1}: another request of this operation "
        "had failed for good)"
    )


def _walk_names(base: str, prefix: str) -> list[str]:
    """Keys under local folder ``base`` (whose key is ``prefix``), temp names left out: one
    ``scandir`` per folder and no ``stat`` per file — listing ``catalog/`` of a store with
    1,000 checkpoints is ~10× faster than ``fsspec.find``, which stats every file."""
    keys: list[str] = []
    stack = [(base, prefix.strip("/"))]
    while stack:
        folder, key = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.name.startswith(TEMP_PREFIX):
                continue
            sub = f"{key}/{e.name}" if key else e.name
            if e.is_dir(follow_symlinks=False):
                stack.append((e.path, sub))
            else:
                keys.append(sub)
    return sorted(keys)


def _modified(info: Mapping[str, Any]) -> float | None:
    """Last-modified time of an fsspec ``info`` entry (local: mtime, s3: LastModified,
    memory: created), as Unix seconds."""
    for field_name in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(field_name)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            import datetime

            return datetime.datetime.fromisoformat(str(value)).timestamp()
        except ValueError:
            continue
    return None


def _s3_options(options: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Defaults for s3fs, where the caller set none: bounded timeouts, botocore's own
    retries off (ours apply, so a dead server costs a known time), no listings cache (other
    processes commit checkpoints)."""
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", settings.connect_timeout)
    config.setdefault("read_timeout", settings.read_timeout)
    config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
    options["config_kwargs"] = config
    options.setdefault("use_listings_cache", False)
    cls = fsspec.get_filesystem_class("s3")
    if "max_concurrency" in inspect.signature(cls.__init__).parameters:
        # our I/O pool runs the requests in parallel; with s3fs's default (10) every whole-
        # object get of a chunk would first cost a HEAD to size a parallel ranged read
        options.setdefault("max_concurrency", 1)
    return options


def _build_filesystem(
    url: str, protocol: str | None, options: dict[str, Any]
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs``, with every failure to build the filesystem turned into one
    :class:`~ckptstore.errors.CkptStoreError` naming the URL.

    Some filesystems (ftp: ``__del__`` closes ``self.ftp``) leave a half-built object whose
    ``__del__`` fails when their ``__init__`` raised early, and Python prints that as an
    "Exception ignored in ..." traceback. The object is freed here, inside the window where
    such ``__del__`` failures of fsspec filesystems are dropped, not at some later point.
    """
    with _QuietFilesystemDel():
        try:
            return fsspec.core.url_to_fs(url, **options)
        except Exception as exc:
            traceback.clear_frames(exc.__traceback__)  # frees the half-built filesystem
            gc.collect()  # and one that sits in a reference cycle
            err = _construction_error(url, protocol, exc)
            if err is exc:
                raise
            raise err from exc


def _construction_error(url: str, protocol: str | None, exc: Exception) -> CkptStoreError:
    if isinstance(exc, CkptStoreError):
        return exc
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, ImportError):
        hint = " (pip install 'ckptstore[s3]')" if protocol in S3_PROTOCOLS else ""
        return UnknownSchemeError(
            f"the filesystem for {url!r} needs a package that is not installed{hint}: {exc}"
        )
    if isinstance(exc, ValueError) and "protocol" in str(exc).lower():
        return UnknownSchemeError(f"unknown URL scheme in {url!r}: {exc}")
    if isinstance(exc, (TypeError, ValueError)):  # no host, a bad port, a bad option
        return InvalidURLError(
            f"cannot open a filesystem for {url!r}: {detail} (check the URL and the "
            "storage options)"
        )
    failure = classify(exc) if _is_storage_error(exc) else Failure("other")
    if failure.kind == "denied":
        return AccessDeniedError(f"access denied opening {url!r}: {detail}")
    if failure.kind in ("not_found", "no_bucket"):
        return StoreNotFoundError(f"no ckptstore store at {url} ({detail})")
    if failure.kind == "transient":
        return StorageUnavailableError(f"storage unavailable for {url!r}: {detail}")
    return BackendError(f"cannot open a filesystem for {url!r}: {detail}")


class _QuietFilesystemDel:
    """Within the ``with``: unraisable exceptions from the ``__del__`` of an fsspec
    filesystem are dropped; every other one goes to the hook that was in place. Nested and
    concurrent uses (threads opening stores at once) share one installed filter, removed
    when the last of them leaves."""

    _lock = threading.Lock()
    _depth = 0
    _previous: Any = None

    def __enter__(self) -> None:
        cls = type(self)
        with cls._lock:
            if cls._depth == 0:
                cls._previous = sys.unraisablehook
                sys.unraisablehook = cls._hook
            cls._depth += 1

    def __exit__(self, *_: object) -> None:
        cls = type(self)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0 and sys.unraisablehook is cls._hook:
                sys.unraisablehook = cls._previous

    @staticmethod
    def _hook(unraisable: Any) -> None:
        fn = unraisable.object  # a failing __del__ is reported as the function itself
        if getattr(fn, "__name__", None) == "__del__" and _is_filesystem(_owner(fn)):
            return
        previous = _QuietFilesystemDel._previous or sys.__unraisablehook__
        previous(unraisable)


def _owner(fn: Any) -> Any:
    """The class of a function ``Class.__del__``, found by its qualified name (or None)."""
    owner: Any = sys.modules.get(getattr(fn, "__module__", None) or "")
    for part in getattr(fn, "__qualname__", "").split(".")[:-1]:
        owner = getattr(owner, part, None)
    return owner


def _is_filesystem(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, fsspec.AbstractFileSystem)


def open_backend(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> FsspecBackend:
    """Open the fsspec filesystem behind ``url``. Plain paths mean the local filesystem.

    ``storage_options`` go to the filesystem (s3fs: ``key``, ``secret``, ``token``,
    ``endpoint_url``, ``profile``, ``client_kwargs={"region_name": ...}``, ...); s3fs also
    reads the usual ``AWS_*`` environment variables. Opening a store by URL is an edge:
    without ``settings`` they are resolved here, once (:meth:`Settings.resolve`).
    """
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"store URL must be a string or path, not {type(url).__name__}")
    settings = Settings.resolve() if settings is None else settings
    url = os.fspath(url)
    options = dict(storage_options or {})
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol in S3_PROTOCOLS:
        options = _s3_options(options, settings)
    fs, root = _build_filesystem(url, protocol, options)
    if protocol in S3_PROTOCOLS:
        if "retries" not in ((storage_options or {}).get("config_kwargs") or {}):
            fs.retries = 1  # s3fs's own retry loop: ours replaces it
        if "mode" not in inspect.signature(fs._pipe_file).parameters:
            raise BackendError(
                f"the installed s3fs ({getattr(type(fs), '__module__', '?')}) is too old for "
                "create-only puts (pipe_file mode='create'): pip install -U s3fs"
            )
    if isinstance(fs, LocalFileSystem):
        root = os.path.abspath(root)
    return FsspecBackend(fs, root, url, settings)
