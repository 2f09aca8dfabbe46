"""The backend contract: what every storage implementation guarantees to the store layer.

:class:`Backend` is the interface. The store relies on exactly what its docstrings say and on
nothing else: no layer above tests which implementation (or which fsspec protocol) it runs
on. What differs between implementations is data, in :class:`Capabilities`.

:class:`WrappedBackend` delegates everything to an inner backend; wrappers (fault injection
in :mod:`ckptstore.testing.faulty`, counting, ...) subclass it and override the operations
they change. The batched operations (:meth:`Backend.put_async`, :meth:`Backend.get_many`,
:meth:`Backend.put_many`) are built here from the single-object ones, so a wrapper sees
every object a batch touches.

Errors. Every storage failure leaves a backend as one of the :mod:`ckptstore.errors` tree,
with the object's location (:meth:`Backend.describe`) in the message:

=========================== ===========================================================
``ObjectNotFoundError``     no object under the key (``get``, ``get_range``, ``size``)
``ObjectExistsError``       a create-only put found the key taken
``AccessDeniedError``       credentials missing or refused, no permission; not retried
``BucketNotFoundError``     the bucket (or root) does not exist; not retried
``StorageFullError``        no space left or a quota reached; not retried
``StorageUnavailableError`` transient failures (5xx, throttling, resets, timeouts) that
                            lasted through every retry
``BackendError``            any other storage failure (the base of all of the above)
=========================== ===========================================================

An exception that is not a storage failure (a ``TypeError`` from a bug) is not translated.
"""

from __future__ import annotations

import abc
import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from ckptstore.errors import BackendError, ObjectNotFoundError
from ckptstore.knobs import DEFAULTS, Settings

T = TypeVar("T")

TEMP_PREFIX = ".tmp-"
"""Names (of objects or folders) starting with this are an implementation's temporary files:
never listed, never a key the store uses."""


def is_temp(key: str) -> bool:
    """Whether ``key`` is, or lies under, a temporary name (hidden from listings)."""
    return any(part.startswith(TEMP_PREFIX) for part in key.split("/"))


@dataclass(frozen=True)
class Capabilities:
    """What a backend guarantees, as data (the store reads these, never a protocol name)."""

    atomic_put: bool
    """A reader never observes a partially written object."""
    atomic_create: bool
    """``put(create_only=True)`` is atomic against a concurrent writer of the same key."""
    local: bool
    """Objects are files on this machine's filesystem."""
    remote: bool = False
    """Every operation is a network request (latency-bound: worth many in flight)."""
    temp_files: bool = False
    """A put writes a temporary object first (``.tmp-*``, then renamed into place), which a
    process killed mid-put — or a put whose cleanup failed — can leave behind. gc then looks
    for stale ones with :meth:`Backend.list_temp`. False where a put is one request that
    leaves nothing (object stores: a failed multipart upload is no object; see docs/gc.md)."""


@dataclass
class Stats:
    """Operations and bytes this backend object performed (for figures and tests)."""

    gets: int = 0
    puts: int = 0
    lists: int = 0
    deletes: int = 0
    heads: int = 0
    retries: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    @property
    def requests(self) -> int:
        return self.gets + self.puts + self.lists + self.deletes + self.heads


class ObjectInfo(NamedTuple):
    """One listed object: key (relative to the root), size in bytes, last-modified time."""

    key: str
    size: int
    mtime: float | None


class Cancel:
    """The stop signal of one save's or one load's requests, shared by all of them: set with
    the first definitive failure (an error that outlasted its retries, or one never
    retried). From then on none of them starts (:meth:`Backend.put_async` and the store's
    readers check it first) and none that is running tries again (the retry loop checks
    it), so a dead server costs one request's retries, not every queued request's.
    Thread-safe; the first error set stays."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def set(self, exc: BaseException) -> bool:
        """Record ``exc`` as the failure that stops the batch; False if one already did."""
        with self._lock:
            if self.error is not None:
                return False
            self.error = exc
            return True

    def is_set(self) -> bool:
        return self.error is not None

    def check(self) -> None:
        """Raise (a copy of) the recorded failure, if any: a request about to start does not."""
        err = self.error
        if err is not None:
            raise again(err)


def again(exc: BaseException) -> BaseException:
    """A fresh exception of ``exc``'s class and message (caused by ``exc``), for the requests
    a :class:`Cancel` stopped: whichever of them a caller sees first names the object that
    failed. (Raising one object from many threads would tangle its traceback.)"""
    try:
        new = type(exc)(*exc.args)
        new.__dict__.update(exc.__dict__)
        if isinstance(exc, OSError) and isinstance(new, OSError):
            new.errno = exc.errno  # (set after construction by some raisers: not in args)
    except Exception:
        new = BackendError(str(exc))
    new.__cause__ = exc
    return new


_scope = threading.local()


@contextlib.contextmanager
def cancel_scope(cancel: Cancel | None) -> Iterator[None]:
    """Within the ``with``, on this thread: retry loops give up once ``cancel`` is set."""
    previous = getattr(_scope, "cancel", None)
    _scope.cancel = cancel
    try:
        yield
    finally:
        _scope.cancel = previous


def current_cancel() -> Cancel | None:
    """The :class:`Cancel` of the :func:`cancel_scope` this thread runs in, or None."""
    return getattr(_scope, "cancel", None)


class _ByteBudget:
    """Bytes of uploads in flight; ``acquire`` waits while the bound is reached (an object
    larger than the bound is let through alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cond:
            while self.used and self.used + n > self.limit:
                self.cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


_IO_LOCK = threading.Lock()
_IO: dict[tuple[int, int, int], tuple[ThreadPoolExecutor, _ByteBudget]] = {}


def io_pool(settings: Settings = DEFAULTS) -> tuple[ThreadPoolExecutor, _ByteBudget]:
    """The process's upload pool and its byte bound, shared by every backend and save (so
    concurrent saves together stay within ``io_bytes``). Made anew in a forked child, or
    for other settings."""
    key = (os.getpid(), max(1, settings.io_requests), settings.io_bytes)
    with _IO_LOCK:
        found = _IO.get(key)
        if found is None:
            pool = ThreadPoolExecutor(key[1], thread_name_prefix="ckptstore-io")
            found = _IO[key] = (pool, _ByteBudget(key[2]))
        return found


class Backend(abc.ABC):
    """Byte objects under one root, named by keys: ``/``-separated paths relative to the
    root, without a leading ``/`` (``chunks/ab/abcd…``, ``checkpoints/step-….msgpack``).

    Guarantees every implementation gives, and the store relies on:

    - **Atomic puts.** A reader sees the whole object a put wrote or none of it, never a
      part; an object is never observed half-replaced.
    - **Create-only puts.** ``put(key, data, create_only=True)`` succeeds for exactly one of
      any number of concurrent writers of ``key`` (in this or other processes or machines);
      the others get :class:`~ckptstore.errors.ObjectExistsError` and change nothing.
    - **Read after write.** Once ``put`` returned, ``get``, ``exists``, ``size``, ``list``
      and ``list_info`` on any backend object open on the same root see the object; once
      ``delete`` returned, none sees it.
    - **Modification times by the storage's clock** (:meth:`list_info`): what gc safety
      relies on, together with the clock assumption in docs/format.md.
    - **Thread safety.** Every method may be called from many threads at once.
    - **Errors from one tree** (see the module docstring): every storage failure is a
      :class:`~ckptstore.errors.BackendError` naming the object.

    Subclasses implement :meth:`get`, :meth:`get_range`, :meth:`size`, :meth:`put`,
    :meth:`delete`, :meth:`list_info` and :meth:`describe`, and set :attr:`url`,
    :attr:`capabilities` and :attr:`stats`; :meth:`exists`, :meth:`list`, :meth:`list_temp`
    (a backend whose puts can leave temporary objects must override it) and the batched
    operations have defaults built on those (override them where one request does better).
    Run :class:`ckptstore.testing.backend_suite.BackendSuite` against a new implementation.
    """

    url: str
    """The location this backend was opened on, as the user gave it (for messages and for
    ``Repository.url``)."""
    capabilities: Capabilities
    """What this backend guarantees beyond the contract, as data."""
    stats: Stats
    """Requests and bytes this backend object performed, tries included (retries counted
    apart). Counters only grow; a pickled copy starts from zero."""
    settings: Settings = DEFAULTS
    """The settings this backend was opened with (retries, timeouts, I/O bounds, fsync,
    threads): resolved at the edge that opened it, never read from the environment here."""

    # -- single objects ---------------------------------------------------------------------
    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object under ``key``, exactly the bytes the last put stored.

        Raises ObjectNotFoundError if there is none. (Keys name objects only: what a key
        that is merely a prefix of other keys answers, here or in :meth:`exists`, is not
        part of the contract; the store never asks.)
        """

    @abc.abstractmethod
    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (fewer where the object ends before ``end``;
        empty where it ends before ``start``). Raises ObjectNotFoundError if absent."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``. Absent is an answer, not an error:
        only storage failures raise."""
        try:
            self.size(key)
        except ObjectNotFoundError:
            return False
        return True

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size of the object in bytes. Raises ObjectNotFoundError if absent."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        """Store ``data`` under ``key`` atomically, creating any folders needed.

        Without ``create_only`` an existing object is replaced (and its modification time
        moves to the time of this put; see :meth:`list_info`). With ``create_only`` an
        existing object is never replaced, even by a writer racing this one: the put raises
        ObjectExistsError and the object (bytes and modification time) stays as it was. A
        create-only put whose first try stored the object but lost the answer, and whose
        retry finds the same bytes there, succeeds. On any error the key holds either the
        old object or none, never part of ``data``; a failed put may leave a temporary
        file, which listings never show.

        Raises ObjectExistsError (create-only, key taken), StorageFullError, AccessDeniedError,
        BucketNotFoundError, StorageUnavailableError, BackendError.
        """

    def put_fresh(self, key: str, data: bytes | memoryview) -> bool:
        """:meth:`put` (overwriting, so the object's modification time is now) that also
        says whether no object was under ``key`` before: True when this put created it.

        The answer is for figures only (a chunk a save wrote vs. one it found), and may say
        False for an object an earlier, failed try of this very call created. The default
        asks first (:meth:`exists`, then :meth:`put`: two requests); an implementation that
        can tell from one create-only request overrides it (an object store: a conditional
        PUT, then a plain one only when the key was taken).
        """
        existed = self.exists(key)
        self.put(key, data)
        return not existed

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object under ``key``. An absent key is not an error (a delete is
        idempotent: gc re-runs deletes after a crash). Raises only for storage failures."""

    def list(self, prefix: str) -> list[str]:
        """Keys of every object under folder ``prefix`` (recursively; ``""`` is the whole
        root), sorted, relative to the root. Temporary files (any path component starting
        with ``.tmp-``) are never listed. A missing folder lists empty."""
        return [info.key for info in self.list_info(prefix)]

    @abc.abstractmethod
    def list_info(self, prefix: str) -> list[ObjectInfo]:
        """Like :meth:`list` (same keys, same order, temporary files hidden), with each
        object's size in bytes and last-modified time ``mtime``.

        ``mtime`` is Unix seconds by **the storage's clock**: the time the object's current
        bytes were stored. A put that replaces an object (``create_only=False`` on an
        existing key) sets it anew to the time of that put, as for a new object; it never
        keeps the old time (gc takes a recently rewritten chunk for a recent one, which is
        what keeps a chunk that a save running beside it wrote again). A create-only put
        that failed leaves it unchanged. ``mtime`` may be rounded down to the storage's
        resolution (S3: whole seconds) and is ``None`` only where the storage cannot tell:
        gc then never deletes the object. One listing, not a request per object.
        """

    def list_temp(self, prefix: str) -> list[ObjectInfo]:
        """The temporary objects under folder ``prefix`` (recursively; ``""`` is the whole
        root), sorted, with size and ``mtime`` as in :meth:`list_info`: exactly the keys that
        :meth:`list` hides (a path component starting with ``.tmp-``). They are what puts in
        progress, or puts that never finished, hold; nothing refers to them, and
        :meth:`delete` removes one (gc deletes stale ones: docs/format.md, "Temporary
        files").

        ``mtime`` is the time of the last write to the object (by the storage's clock), so a
        put in progress has a recent one. The default lists nothing: right for a backend
        whose puts leave no objects behind (``capabilities.temp_files`` is False) and that
        never stores such keys. One listing, not a request per object.
        """
        return []

    @abc.abstractmethod
    def describe(self, key: str) -> str:
        """A human-readable location of ``key`` (``s3://bucket/run/chunks/ab/…``), used in
        every error message about the object. Never raises."""

    # -- batches and concurrency -----------------------------------------------------------
    def put_async(
        self,
        key: str,
        data: bytes | memoryview,
        *,
        create_only: bool = False,
        cancel: Cancel | None = None,
    ) -> Future[None]:
        """Start :meth:`put` on the process's I/O pool and return its future (the future
        raises what ``put`` raises).

        At most ``IO_REQUESTS`` requests run at once, and the caller waits here while the
        uploads already started hold ``IO_BYTES`` bytes: encoders stay ahead of the network
        by a bounded amount of memory. With ``cancel``, a put whose turn comes after
        ``cancel`` was set sends nothing and raises its error, and a put that fails for good
        sets it (see :class:`Cancel`).
        """
        return self._submit(len(data), lambda: self.put(key, data, create_only=create_only), cancel)

    def put_fresh_async(
        self, key: str, data: bytes | memoryview, *, cancel: Cancel | None = None
    ) -> Future[bool]:
        """:meth:`put_fresh` on the I/O pool, bounded and cancelled as :meth:`put_async`."""
        return self._submit(len(data), lambda: self.put_fresh(key, data), cancel)

    def _submit(self, n: int, fn: Callable[[], T], cancel: Cancel | None) -> Future[T]:
        pool, budget = io_pool(self.settings)
        budget.acquire(n)

        def run() -> T:
            if cancel is None:
                return fn()
            cancel.check()
            try:
                with cancel_scope(cancel):
                    return fn()
            except BaseException as exc:
                cancel.set(exc)
                raise

        try:
            fut = pool.submit(run)
        except BaseException:
            budget.release(n)
            raise
        fut.add_done_callback(lambda _: budget.release(n))
        return fut

    def get_many(self, keys: Iterable[str], threads: int | None = None) -> dict[str, bytes]:
        """:meth:`get` of many keys concurrently (``IO_REQUESTS`` at a time by default);
        a dict in the order of ``keys``, duplicates fetched once. The first error raises."""
        keys = list(dict.fromkeys(keys))
        n = threads if threads is not None else self.settings.io_requests
        return dict(zip(keys, self.map(self.get, keys, n), strict=True))

    def put_many(self, items: Mapping[str, bytes], threads: int | None = None) -> None:
        """:meth:`put` (overwriting) of many objects concurrently, each atomically; not a
        transaction: after an error some may be stored. The first error raises."""
        n = threads if threads is not None else self.settings.io_requests
        self.map(lambda kv: self.put(kv[0], kv[1]), list(items.items()), n)

    def map(self, fn: Callable[[Any], T], args: list[Any], threads: int | None = None) -> list[T]:
        """Run ``fn`` over ``args`` on a bounded thread pool (``THREADS`` knob, or
        ``threads``); results in the order of ``args``. The first error raises, after the
        calls already running have ended."""
        n = min(self.settings.threads if threads is None else threads, max(1, len(args)))
        if n <= 1:
            return [fn(a) for a in args]
        with ThreadPoolExecutor(n, thread_name_prefix="ckptstore-io") as pool:
            return list(pool.map(fn, args))


class WrappedBackend(Backend):
    """A backend that delegates everything to ``inner``: subclass it and override what the
    wrapper changes. ``url``, ``capabilities`` and ``stats`` are the inner backend's, and
    any other attribute (an implementation's ``path``, ``fs``, ``endpoint`` …) is looked up
    on it. Batched operations come from :class:`Backend`, built on this wrapper's own
    single-object methods, so an override sees every object of a batch."""

    def __init__(self, inner: Backend) -> None:
        if not isinstance(inner, Backend):
            raise TypeError(f"can only wrap a Backend, not {type(inner).__name__}")
        self.inner = inner

    @property  # type: ignore[override]
    def url(self) -> str:
        return self.inner.url

    @property  # type: ignore[override]
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    @property  # type: ignore[override]
    def stats(self) -> Stats:
        return self.inner.stats

    @property  # type: ignore[override]
    def settings(self) -> Settings:
        return self.inner.settings

    def __getattr__(self, name: str) -> Any:
        # only called for what the wrapper itself lacks; never for dunders (copy, pickle)
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.inner.get_range(key, start, end)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        self.inner.put(key, data, create_only=create_only)

    def put_fresh(self, key: str, data: bytes | memoryview) -> bool:
        # the inner backend's own (one request where it can); a wrapper that changes puts
        # overrides this too
        return self.inner.put_fresh(key, data)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        return self.inner.list_info(prefix)

    def list_temp(self, prefix: str) -> list[ObjectInfo]:
        return self.inner.list_temp(prefix)

    def describe(self, key: str) -> str:
        return self.inner.describe(key)


BackendWrapper = WrappedBackend
