"""Test doubles that break storage on purpose.

:class:`FaultyBackend` wraps any :class:`~ckptstore.backend.Backend` and fails, corrupts,
truncates, pauses and counts the operations whose key matches a glob. Tests compose it
(``Repository.open(FaultyBackend(open_backend(url)))``, ``ckptstore.Store(faulty)``) rather
than patching classes, so only the backend object the test made misbehaves.

``faulty://`` is a fault-injecting in-memory fsspec filesystem: faults happen below fsspec,
so a test opened by URL exercises the whole real path (URL parsing, backend error
translation, store, DCP) and only the storage misbehaves. Its faults are set on the class
and cleared with :func:`reset` (tests use the ``faults`` fixture).

:class:`failing_puts` / :class:`failing_deletes` patch the fsspec backend class for a whole
process: only for code that opens its backend from a URL out of the test's reach (a
spawned rank); elsewhere use :class:`FaultyBackend`.
"""

from __future__ import annotations

import collections
import errno
import fnmatch
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

from ckptstore.backend.base import TEMP_PREFIX, Backend, ObjectInfo, WrappedBackend
from ckptstore.errors import BackendError, StorageFullError


@dataclass
class FaultPlan:
    fail_put_after: int | None = None
    """Let this many matching puts succeed, then fail every later one."""
    put_match: str = "*"
    corrupt_get_match: str | None = None
    """Flip one bit in the middle of every object read whose path matches."""
    truncate_get_match: str | None = None
    """Return only the first half of every object read whose path matches."""
    fail_delete_after: int | None = None
    """Let this many matching deletes succeed, then fail every later one."""
    delete_match: str = "*"
    puts: int = 0
    deletes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultyFileSystem(MemoryFileSystem):
    protocol = "faulty"
    store: dict = {}  # noqa: RUF012 - its own namespace, apart from memory://
    pseudo_dirs = [""]  # noqa: RUF012
    plan = FaultPlan()

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        plan = type(self).plan
        if fnmatch.fnmatch(path, plan.put_match) and plan.fail_put_after is not None:
            with plan.lock:
                plan.puts += 1
                n = plan.puts
            if n > plan.fail_put_after:
                raise OSError(f"injected put failure #{n} on {path}")
        return super().pipe_file(path, value, mode=mode, **kwargs)

    def rm_file(self, path):
        plan = type(self).plan
        if fnmatch.fnmatch(path, plan.delete_match) and plan.fail_delete_after is not None:
            with plan.lock:
                plan.deletes += 1
                n = plan.deletes
            if n > plan.fail_delete_after:
                raise OSError(f"injected delete failure #{n} on {path}")
        return super().rm_file(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        plan = type(self).plan
        if plan.corrupt_get_match and fnmatch.fnmatch(path, plan.corrupt_get_match) and data:
            buf = bytearray(data)
            buf[len(buf) // 2] ^= 0x10
            data = bytes(buf)
        if plan.truncate_get_match and fnmatch.fnmatch(path, plan.truncate_get_match):
            data = data[: len(data) // 2]
        return data


def reset() -> None:
    """Clear every fault and every stored object."""
    FaultyFileSystem.plan = FaultPlan()
    FaultyFileSystem.store.clear()
    FaultyFileSystem.pseudo_dirs[:] = [""]


def set_plan(**kwargs: object) -> FaultPlan:
    FaultyFileSystem.plan = FaultPlan(**kwargs)  # type: ignore[arg-type]
    return FaultyFileSystem.plan


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


class failing_puts:  # noqa: N801 - used like a function: ``with failing_puts(after=2):``
    """Make every fsspec backend in this process fail puts whose key contains ``match``
    after ``after`` of them succeeded — a backend that breaks on the Nth write, on any
    storage. Patches :class:`~ckptstore.backend.FsspecBackend`; prefer
    :class:`FaultyBackend` where the test hands the store its backend."""

    def __init__(self, after: int, match: str = "") -> None:
        self.after = after
        self.match = match
        self.count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> failing_puts:
        from ckptstore.backend import FsspecBackend as Backend

        self._original = original = Backend.put
        self._original_fresh = original_fresh = Backend.put_fresh
        outer = self

        def check(backend, key):
            if outer.match in key:
                with outer._lock:
                    outer.count += 1
                    n = outer.count
                if n > outer.after:
                    raise BackendError(f"injected put failure #{n} on {backend.describe(key)}")

        def put(backend, key, data, *, create_only=False):
            check(backend, key)
            return original(backend, key, data, create_only=create_only)

        def put_fresh(backend, key, data):
            check(backend, key)
            return original_fresh(backend, key, data)

        Backend.put = put  # type: ignore[method-assign]
        Backend.put_fresh = put_fresh  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from ckptstore.backend import FsspecBackend as Backend

        Backend.put = self._original  # type: ignore[method-assign]
        Backend.put_fresh = self._original_fresh  # type: ignore[method-assign]


class failing_deletes:  # noqa: N801 - used like a function: ``with failing_deletes(after=2):``
    """Make every fsspec backend in this process fail deletes whose key contains ``match``
    after ``after`` of them succeeded — a gc that breaks part-way, on any storage. Patches
    :class:`~ckptstore.backend.FsspecBackend`; prefer :class:`FaultyBackend` where the
    test hands the store its backend."""

    def __init__(self, after: int, match: str = "") -> None:
        self.after = after
        self.match = match
        self.count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> failing_deletes:
        from ckptstore.backend import FsspecBackend as Backend

        self._original = original = Backend.delete
        outer = self

        def delete(backend, key):
            if outer.match in key:
                with outer._lock:
                    outer.count += 1
                    n = outer.count
                if n > outer.after:
                    raise BackendError(f"injected delete failure #{n} on {backend.describe(key)}")
            return original(backend, key)

        Backend.delete = delete  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from ckptstore.backend import FsspecBackend as Backend

        Backend.delete = self._original  # type: ignore[method-assign]


# -- the fault-injecting wrapper -------------------------------------------------------------
OPS = ("get", "put", "delete", "exists", "size", "list")
"""Operation names of :class:`FaultyBackend` (``get`` covers ``get_range``, ``list`` covers
``list_info`` and ``list_temp``; the key of a ``list`` is its prefix)."""


@dataclass(eq=False)
class Fault:
    """One rule of a :class:`FaultyBackend`: acts on calls of ``op`` whose key matches the
    glob ``match`` (``fnmatch``; ``*`` crosses ``/``), letting the first ``after`` of them
    through and acting on the next ``times`` (None: on every later one)."""

    op: str
    match: str
    action: str
    """fail, full, corrupt, truncate, pause or call."""
    after: int = 0
    times: int | None = None
    error: Callable[[str], BaseException] | None = None
    """fail: builds the exception from the object's description (default: BackendError)."""
    hook: Callable[[str], None] | None = None
    """call: run with the key before the operation (kill a server on the Nth put, …)."""
    lost_answer: bool = False
    """fail on put/delete: the operation is done, then the error raised (a lost answer)."""
    release_after: float | None = None
    """pause: a timer releases the pause this many seconds after it was first reached."""
    timeout: float = 60.0
    """pause: a call held longer than this fails (a test that never releases it)."""
    seen: int = 0
    """Matching calls so far."""
    fired: int = 0
    """Calls this fault acted on."""
    reached: threading.Event = field(default_factory=threading.Event)
    """pause: set when a call is first held."""
    go: threading.Event = field(default_factory=threading.Event)
    """pause: held calls go on once this is set."""

    def release(self) -> None:
        """Let held calls go on (and every later matching one)."""
        self.go.set()

    def wait_reached(self, timeout: float = 60.0) -> bool:
        """Wait until a call is held by this pause."""
        return self.reached.wait(timeout)


class FaultyBackend(WrappedBackend):
    """Wraps a backend and breaks it on purpose, per operation and key glob.

    ``faulty.fail_puts("chunks/*", after=2)`` fails every chunk put after the first two;
    ``faulty.storage_full()`` makes puts raise :class:`~ckptstore.errors.StorageFullError`;
    ``faulty.capacity(50_000_000)`` makes the storage a disk of that size (puts that do not
    fit fail with ENOSPC, optionally leaving a partial temporary file; deletes free space);
    ``faulty.corrupt_gets("chunks/*")`` / ``truncate_gets`` damage what reads return;
    ``gate = faulty.pause("delete", "chunks/*")`` holds matching deletes until
    ``gate.release()``; ``faulty.on("put", "chunks/*", fn, after=5, times=1)`` calls ``fn``
    before the sixth chunk put; ``faulty.count("put", "checkpoints/*")`` counts calls. Each rule
    returns its :class:`Fault` (``seen``, ``fired``); :meth:`clear` removes them all. Every
    call is recorded in :attr:`log` whether or not a fault acted on it.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.faults: list[Fault] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._capacity: int | None = None
        self._leave_temp = False
        self._space_lock = threading.Lock()
        self.full_puts = 0
        """Puts refused by :meth:`capacity`."""

    # -- setting faults --------------------------------------------------------------------
    def add(self, fault: Fault) -> Fault:
        if fault.op not in OPS:
            raise ValueError(f"unknown operation {fault.op!r}; one of {', '.join(OPS)}")
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail(
        self,
        op: str,
        match: str = "*",
        *,
        after: int = 0,
        times: int | None = None,
        error: Callable[[str], BaseException] | None = None,
        lost_answer: bool = False,
    ) -> Fault:
        """Fail matching calls of ``op`` (after ``after`` succeeded; ``times`` of them, or
        all later ones). The Nth matching put fails with ``after=N-1, times=1``."""
        return self.add(
            Fault(op, match, "fail", after, times, error=error, lost_answer=lost_answer)
        )

    def fail_puts(self, match: str = "*", **kw) -> Fault:
        return self.fail("put", match, **kw)

    def fail_deletes(self, match: str = "*", **kw) -> Fault:
        return self.fail("delete", match, **kw)

    def storage_full(self, match: str = "*", *, after: int = 0, times: int | None = None) -> Fault:
        """Matching puts raise StorageFullError (ENOSPC) and store nothing."""
        return self.add(Fault("put", match, "full", after, times))

    def capacity(self, nbytes: int | None, *, leave_temp: bool = False) -> None:
        """Make the storage a disk of ``nbytes`` (None: unlimited again). The space used is
        the size of every object under the root, temporary objects included, counted anew at
        each put. A put that would not fit raises StorageFullError (errno ENOSPC) and stores
        nothing under its key — with ``leave_temp`` it leaves a ``.tmp-*`` object beside the
        key holding as many bytes as fitted, as a process killed mid-write (or a writer that
        did not clean up) would. Puts run one at a time while a capacity is set. Deletes free
        space, so gc can recover."""
        self._capacity = None if nbytes is None else int(nbytes)
        self._leave_temp = leave_temp

    def used_bytes(self) -> int:
        """Bytes the objects under the root hold now (temporary ones included)."""
        return sum(i.size for i in self.inner.list_info("")) + sum(
            i.size for i in self.inner.list_temp("")
        )

    def _put_within_capacity(self, key: str, data: bytes | memoryview, create_only: bool) -> None:
        import uuid

        with self._space_lock:
            limit = self._capacity
            assert limit is not None
            # a local put needs room for its whole temporary file before an object it
            # replaces goes: what counts is the free space, whatever the key holds now
            free = limit - self.used_bytes()
            if len(data) > free:
                self.full_puts += 1
                if self._leave_temp and free > 0:
                    folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
                    self.inner.put(f"{folder}{TEMP_PREFIX}{uuid.uuid4().hex}", bytes(data[:free]))
                err = StorageFullError(
                    f"injected: no space left on device writing {self.describe(key)} "
                    f"({len(data)} bytes, {max(0, free)} of {limit} free)"
                )
                err.errno = errno.ENOSPC
                raise err
            self.inner.put(key, data, create_only=create_only)

    def corrupt_gets(self, match: str = "*", *, after: int = 0, times: int | None = None) -> Fault:
        """Matching reads return their bytes with one bit flipped in the middle."""
        return self.add(Fault("get", match, "corrupt", after, times))

    def truncate_gets(self, match: str = "*", *, after: int = 0, times: int | None = None) -> Fault:
        """Matching reads return only the first half of their bytes."""
        return self.add(Fault("get", match, "truncate", after, times))

    def pause(
        self,
        op: str,
        match: str = "*",
        *,
        after: int = 0,
        times: int | None = None,
        release_after: float | None = None,
        timeout: float = 60.0,
    ) -> Fault:
        """Hold matching calls of ``op`` before they run until the returned fault is
        released (or ``release_after`` seconds after the first was held)."""
        return self.add(
            Fault(op, match, "pause", after, times, release_after=release_after, timeout=timeout)
        )

    def on(
        self,
        op: str,
        match: str,
        fn: Callable[[str], None],
        *,
        after: int = 0,
        times: int | None = None,
    ) -> Fault:
        """Call ``fn(key)`` before matching calls of ``op`` run (what it raises, the call
        raises): ``on("put", "chunks/*", lambda key: server.kill(), after=5, times=1)``."""
        return self.add(Fault(op, match, "call", after, times, hook=fn))

    def clear(self) -> None:
        """Remove every fault (held calls go on); counts and the log stay."""
        with self._lock:
            faults, self.faults = self.faults, []
        for f in faults:
            f.release()

    def count(self, op: str, match: str = "*") -> int:
        """Calls of ``op`` so far whose key matches ``match``."""
        with self._lock:
            return sum(1 for o, k in self.log if o == op and fnmatch.fnmatchcase(k, match))

    # -- the machinery ---------------------------------------------------------------------
    def _active(self, op: str, key: str) -> list[tuple[Fault, int]]:
        """Record the call; the faults that act on it, each with its matching-call number."""
        out = []
        with self._lock:
            self.calls[op] += 1
            self.log.append((op, key))
            for f in self.faults:
                if f.op != op or not fnmatch.fnmatchcase(key, f.match):
                    continue
                f.seen += 1
                n = f.seen - f.after
                if n > 0 and (f.times is None or n <= f.times):
                    f.fired += 1
                    out.append((f, f.seen))
        return out

    def _before(self, op: str, key: str) -> list[tuple[Fault, int]]:
        active = self._active(op, key)
        for f, n in active:
            if f.action == "pause":
                if not f.reached.is_set() and f.release_after is not None:
                    timer = threading.Timer(f.release_after, f.go.set)
                    timer.daemon = True
                    timer.start()
                f.reached.set()
                if not f.go.wait(f.timeout):
                    raise AssertionError(f"paused {op} of {key} was never released")
            elif f.action == "call" and f.hook is not None:
                f.hook(key)
            elif f.action == "full":
                err = StorageFullError(
                    f"injected: no space left on device writing {self.describe(key)}"
                )
                err.errno = errno.ENOSPC
                raise err
            elif f.action == "fail" and not f.lost_answer:
                raise self._error(f, op, key, n)
        return active

    def _after(self, active: list[tuple[Fault, int]], op: str, key: str) -> None:
        for f, n in active:
            if f.action == "fail" and f.lost_answer:
                raise self._error(f, op, key, n)

    def _error(self, f: Fault, op: str, key: str, n: int) -> BaseException:
        where = self.describe(key)
        if f.error is not None:
            return f.error(where)
        return BackendError(f"injected {op} failure #{n} on {where}")

    @staticmethod
    def _damage(active: list[tuple[Fault, int]], data: bytes) -> bytes:
        for f, _ in active:
            if f.action == "corrupt" and data:
                buf = bytearray(data)
                buf[len(buf) // 2] ^= 0x10
                data = bytes(buf)
            elif f.action == "truncate":
                data = data[: len(data) // 2]
        return data

    # -- the operations --------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        active = self._before("get", key)
        return self._damage(active, self.inner.get(key))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        active = self._before("get", key)
        return self._damage(active, self.inner.get_range(key, start, end))

    def exists(self, key: str) -> bool:
        active = self._before("exists", key)
        found = self.inner.exists(key)
        self._after(active, "exists", key)
        return found

    def size(self, key: str) -> int:
        active = self._before("size", key)
        n = self.inner.size(key)
        self._after(active, "size", key)
        return n

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        active = self._before("put", key)
        if self._capacity is not None:
            self._put_within_capacity(key, data, create_only)
        else:
            self.inner.put(key, data, create_only=create_only)
        self._after(active, "put", key)

    def put_fresh(self, key: str, data: bytes | memoryview) -> bool:
        if self._capacity is not None:  # a disk of this size: through put, which fills it
            return Backend.put_fresh(self, key, data)
        active = self._before("put", key)
        created = self.inner.put_fresh(key, data)
        self._after(active, "put", key)
        return created

    def delete(self, key: str) -> None:
        active = self._before("delete", key)
        self.inner.delete(key)
        self._after(active, "delete", key)

    def list(self, prefix: str) -> list[str]:
        active = self._before("list", prefix)
        keys = self.inner.list(prefix)
        self._after(active, "list", prefix)
        return keys

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        active = self._before("list", prefix)
        infos = self.inner.list_info(prefix)
        self._after(active, "list", prefix)
        return infos

    def list_temp(self, prefix: str) -> list[ObjectInfo]:
        active = self._before("list", prefix)
        infos = self.inner.list_temp(prefix)
        self._after(active, "list", prefix)
        return infos
