"""Leases: short-lived markers, under ``leases/``, of the saves in flight and of gc runs.

They are what makes gc safe beside running saves (docs/format.md, "Leases and garbage
collection", has the rules with MUST and the reasoning). In short:

- A save holds a *save lease* from before it reads the dedup index until after its commit.
  gc keeps every chunk such a save may need: chunks written since the lease began, and the
  chunks of checkpoints dropped since then (their manifests wait in ``trash/``).
- A gc run holds a *gc record*, which is also the store's exclusive gc lock. Before it
  deletes any chunk it publishes the exact list (``leases/gc-<id>.plan``).
- Before its commit, a save reads the records of every gc that ran during its lease; if one
  of them deletes a chunk the save references, the save does not commit
  (:class:`~ckptstore.errors.ConcurrentGcError`). gc and save each write first and read the
  other's marker second, so at least one of them sees the other.

Holders renew their lease from a background thread; a holder that could not renew in time
stops (:class:`~ckptstore.errors.LeaseExpiredError`) instead of committing or deleting.
Every comparison of times written by different machines leaves a margin of ``CLOCK_SKEW``.
No torch here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ckptstore.backend import Backend
from ckptstore.errors import (
    ConcurrentGcError,
    GcBusyError,
    LeaseError,
    LeaseExpiredError,
    ObjectNotFoundError,
)
from ckptstore.store import layout
from ckptstore.version import __version__

log = logging.getLogger(__name__)

PLAN_MAGIC = b"CKP1"
_PLAN_HEADER = struct.Struct("<4sQ")


def ttl_of(backend: Backend, override: float | None = None) -> float:
    """The lease TTL: ``override``, else the backend's settings."""
    return float(override) if override is not None else float(backend.settings.lease_ttl)


def skew_of(backend: Backend, override: float | None = None) -> float:
    """The clock-skew margin: ``override``, else the backend's settings."""
    return float(override) if override is not None else float(backend.settings.clock_skew)


def _check_timing(ttl: float, skew: float) -> None:
    if skew < 0 or ttl <= 3 * skew or ttl <= 0:
        raise ValueError(
            f"lease TTL ({ttl}s) must be positive and more than 3x the clock skew margin "
            f"({skew}s): set CKPTSTORE_LEASE_TTL / CKPTSTORE_CLOCK_SKEW accordingly"
        )


# -- lease objects as read --------------------------------------------------------------
@dataclass
class LeaseInfo:
    """One object under ``leases/``, parsed."""

    key: str
    kind: str  # "save" or "gc"
    id: str
    created: float
    renewed: float
    expires: float
    host: str = ""
    pid: int = 0
    checkpoint: str | None = None
    """save leases: the checkpoint being saved."""
    state: str = "running"
    """gc records: running → planned (the plan is published) → done."""
    finished: float | None = None
    plan: dict[str, Any] | None = None
    """gc records: {"key": plan object key, "chunks": n, "bytes": b} once published."""
    dropped: list[str] = field(default_factory=list)

    def live(self, now: float, skew: float) -> bool:
        """Still to be honoured: not past its expiry by more than the skew margin."""
        return now < self.expires + skew

    def end(self, now: float, skew: float) -> float:
        """For a gc record: when it stopped deleting (finished; its expiry if it died;
        +inf while it runs)."""
        if self.state == "done" and self.finished is not None:
            return self.finished
        return self.expires if not self.live(now, skew) else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "created": self.created,
            "renewed": self.renewed,
            "expires": self.expires,
            "host": self.host,
            "pid": self.pid,
            "writer": f"ckptstore {__version__}",
            **({"checkpoint": self.checkpoint} if self.kind == "save" else {}),
            **(
                {
                    "state": self.state,
                    "finished": self.finished,
                    "plan": self.plan,
                    "dropped": self.dropped,
                }
                if self.kind == "gc"
                else {}
            ),
        }

    @classmethod
    def parse(cls, key: str, data: bytes, where: str) -> LeaseInfo:
        kind_id = layout.parse_lease_key(key)
        try:
            if kind_id is None:
                raise ValueError("not a lease key")
            d = json.loads(data)
            if not isinstance(d, dict) or (d.get("kind"), d.get("id")) != kind_id:
                raise ValueError("kind/id do not match the key")
            info = cls(
                key=key,
                kind=kind_id[0],
                id=kind_id[1],
                created=float(d["created"]),
                renewed=float(d.get("renewed", d["created"])),
                expires=float(d["expires"]),
                host=str(d.get("host", "")),
                pid=int(d.get("pid", 0)),
                checkpoint=d.get("checkpoint"),
                state=str(d.get("state", "running")),
                finished=None if d.get("finished") is None else float(d["finished"]),
                plan=d.get("plan"),
                dropped=list(d.get("dropped") or []),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise LeaseError(
                f"lease {where} cannot be read ({exc}); if no save or gc is running from "
                "the host it names, delete it"
            ) from exc
        if info.state not in ("running", "planned", "done"):
            raise LeaseError(f"lease {where} has unknown state {info.state!r}")
        return info

    def describe(self) -> str:
        what = f"save of {self.checkpoint!r}" if self.kind == "save" else f"gc ({self.state})"
        return f"{what} on {self.host or '?'} (pid {self.pid}), lease {self.id[:8]}"


def read_leases(backend: Backend) -> list[LeaseInfo]:
    """Every lease object of the store (save leases and gc records), oldest first.

    A lease deleted between the listing and its read is skipped (its holder finished)."""
    keys = [k for k in backend.list(layout.LEASES) if layout.parse_lease_key(k) is not None]

    def read(key: str) -> LeaseInfo | None:
        try:
            data = backend.get(key)
        except ObjectNotFoundError:
            return None
        return LeaseInfo.parse(key, data, backend.describe(key))

    found = [x for x in backend.map(read, keys) if x is not None]
    return sorted(found, key=lambda x: (x.created, x.id))


# -- gc plans -------------------------------------------------------------------------------
def encode_plan(keys: Iterable[bytes]) -> bytes:
    """``CKP1`` + u64 xxh3_64(body) + body, body = the 16-byte chunk keys, sorted."""
    body = b"".join(sorted(keys))
    return _PLAN_HEADER.pack(PLAN_MAGIC, xxhash.xxh3_64_intdigest(body)) + body


def decode_plan(data: bytes, where: str) -> set[bytes]:
    if len(data) < _PLAN_HEADER.size:
        raise LeaseError(f"gc plan {where} is truncated")
    magic, check = _PLAN_HEADER.unpack_from(data)
    body = data[_PLAN_HEADER.size :]
    if magic != PLAN_MAGIC or xxhash.xxh3_64_intdigest(body) != check or len(body) % 16:
        raise LeaseError(f"gc plan {where} is corrupt")
    return {body[i : i + 16] for i in range(0, len(body), 16)}


def read_plan(backend: Backend, record: LeaseInfo) -> set[bytes]:
    if not record.plan:
        return set()
    key = layout.gc_plan_key(record.id)
    try:
        data = backend.get(key)
    except ObjectNotFoundError:
        raise LeaseError(
            f"gc record {backend.describe(record.key)} names a plan that is missing"
        ) from None
    return decode_plan(data, backend.describe(key))


# -- leases this process holds ----------------------------------------------------------------
class Lease:
    """A lease this process holds: created with a create-only put, renewed by a background
    thread every TTL/5, deleted by :meth:`release`.

    ``check()`` raises :class:`LeaseExpiredError` once the lease may have looked dead to
    another machine: when more than ``TTL - 2 * CLOCK_SKEW`` passed (by this process's
    monotonic clock) since the start of the last renewal that succeeded, now or at any
    earlier renewal. A holder calls it before every step that relies on the lease."""

    def __init__(self, backend: Backend, info: LeaseInfo, ttl: float, skew: float) -> None:
        self.backend = backend
        self.info = info
        self.ttl = ttl
        self.skew = skew
        self._lock = threading.Lock()
        self._last_ok = time.monotonic()
        self._broken = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.released = False

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def key(self) -> str:
        return self.info.key

    @property
    def created(self) -> float:
        return self.info.created

    @classmethod
    def acquire(
        cls,
        backend: Backend,
        kind: str,
        *,
        checkpoint: str | None = None,
        ttl: float | None = None,
        skew: float | None = None,
        renew: bool = True,
    ) -> Lease:
        """Create a new lease object (create-only put) and start renewing it."""
        ttl, skew = ttl_of(backend, ttl), skew_of(backend, skew)
        _check_timing(ttl, skew)
        lease_id = uuid.uuid4().hex
        t_mono, now = time.monotonic(), time.time()
        info = LeaseInfo(
            key=layout.lease_key(kind, lease_id),
            kind=kind,
            id=lease_id,
            created=now,
            renewed=now,
            expires=now + ttl,
            host=socket.gethostname(),
            pid=os.getpid(),
            checkpoint=checkpoint,
        )
        backend.put(info.key, _encode(info), create_only=True)
        lease = cls(backend, info, ttl, skew)
        lease._last_ok = t_mono
        if renew:
            lease._thread = threading.Thread(
                target=lease._renew_loop, name=f"ckptstore-lease-{lease_id[:8]}", daemon=True
            )
            lease._thread.start()
        return lease

    def _limit(self) -> float:
        return self.ttl - 2 * self.skew

    def valid(self) -> bool:
        with self._lock:
            return not self._broken and time.monotonic() - self._last_ok < self._limit()

    def check(self, doing: str = "continue") -> None:
        if self.released:
            raise LeaseExpiredError(f"lease {self.key} was released; cannot {doing}")
        if not self.valid():
            raise LeaseExpiredError(
                f"lease {self.backend.describe(self.key)} could not be renewed within "
                f"{self._limit():.0f}s (storage unreachable, or this process stalled); a gc "
                f"may have taken it for dead, so this process will not {doing}"
            )

    def update(self, **fields: Any) -> None:
        """Change fields (a gc record's state, plan …) and rewrite the object; counts as
        a renewal. If the rewrite fails (a full storage), the fields change back, so that
        later renewals do not publish what was never stored (a plan not written)."""
        with self._lock:
            old = {k: getattr(self.info, k) for k in fields}
            for k, v in fields.items():
                setattr(self.info, k, v)
        try:
            self.renew()
        except BaseException:
            with self._lock:
                for k, v in old.items():
                    setattr(self.info, k, v)
            raise

    def renew(self) -> None:
        """Rewrite the lease with a new expiry. Raises on storage errors."""
        if self.released:
            return
        t_mono, now = time.monotonic(), time.time()
        with self._lock:
            self.info.renewed = now
            self.info.expires = now + self.ttl
            data = _encode(self.info)
        self.backend.put(self.info.key, data)
        with self._lock:
            if t_mono - self._last_ok >= self._limit():
                self._broken = True  # there was a gap: others may have seen it expire
            self._last_ok = max(self._last_ok, t_mono)

    def _renew_loop(self) -> None:
        interval = self.ttl / 5
        while not self._stop.wait(interval * random.uniform(0.9, 1.0)):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - staleness is what check() reports
                log.warning("could not renew lease %s: %s", self.key, exc)

    def stop(self) -> None:
        """Stop renewing (the object stays, and expires)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def release(self, *, delete: bool = True) -> None:
        """Stop renewing and delete the lease object (best effort: an object left behind
        expires). Safe to call more than once."""
        if self.released:
            return
        self.stop()
        self.released = True
        if delete:
            try:
                self.backend.delete(self.info.key)
            except Exception as exc:  # noqa: BLE001 - it expires on its own
                log.warning("could not delete lease %s: %s", self.key, exc)

    def __repr__(self) -> str:
        return f"Lease({self.key!r})"


def _encode(info: LeaseInfo) -> bytes:
    return json.dumps(info.to_dict(), indent=1).encode() + b"\n"


# -- the gc lock ----------------------------------------------------------------------------
def acquire_gc(
    backend: Backend,
    *,
    wait: float = 0.0,
    ttl: float | None = None,
    skew: float | None = None,
) -> Lease:
    """Take the store's exclusive gc lock: create our gc record, then list the others; if
    another gc record is still active (running or planned, not expired), withdraw ours and
    try again until ``wait`` seconds have passed (then :class:`GcBusyError`).

    Two gcs that race both see each other and both withdraw; one that lists before the
    other creates its record proceeds alone, and the other sees it. So at most one runs."""
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        lease = Lease.acquire(backend, "gc", ttl=ttl, skew=skew)
        try:
            now = time.time()
            others = [
                r
                for r in read_leases(backend)
                if r.kind == "gc"
                and r.id != lease.id
                and r.state != "done"
                and r.live(now, lease.skew)
            ]
        except BaseException:
            lease.release()
            raise
        if not others:
            return lease
        lease.release()
        if time.monotonic() >= deadline:
            busy = others[0]
            raise GcBusyError(
                f"another gc holds the gc lock of {backend.url}: {busy.describe()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(busy.created))}; "
                "try again when it has finished (or once its lease expires, if it died)"
            )
        time.sleep(random.uniform(0.2, 1.0))


# -- the save side: the check before a commit -------------------------------------------------
def check_commit(
    backend: Backend,
    lease: Lease,
    keys: Iterable[bytes] | Callable[[], Iterable[bytes]],
    *,
    checkpoint: str,
    wait: float | None = None,
    poll: float = 0.25,
) -> None:
    """Run right before a save commits; returns when no gc that ran during this save's
    lease has deleted, or will delete, a chunk in ``keys``. Otherwise raises
    :class:`ConcurrentGcError` (the save must not commit).

    A gc record matters when it was still deleting at or after this lease began (minus the
    skew margin). Until such a gc has published its plan we wait. When its plan names chunks
    we reference, we wait until it is done (it deletes nothing after that) and then check
    that each of them exists: it does exactly when it was written (by us or anyone) after
    the gc deleted it. The check repeats for gc records that appeared meanwhile. Waits last
    at most ``GC_WAIT`` seconds in all. ``keys`` may be a function that returns them: the
    set is then built only when a gc plan must be compared with it (at 1,000 ranks it holds
    a million keys, and most commits see no gc)."""
    key_set: set[bytes] | None = None

    def ours() -> set[bytes]:
        nonlocal key_set
        if key_set is None:
            key_set = set(keys() if callable(keys) else keys)
        return key_set

    wait = float(backend.settings.gc_wait) if wait is None else float(wait)
    deadline = time.monotonic() + wait
    skew = lease.skew
    settled: set[str] = set()  # gc runs whose planned chunks we found present after them
    while True:
        lease.check(f"commit checkpoint {checkpoint!r}")
        now = time.time()
        records = [
            r
            for r in read_leases(backend)
            if r.kind == "gc" and r.id not in settled and r.end(now, skew) >= lease.created - skew
        ]
        running = [r for r in records if r.end(now, skew) == math.inf]
        blocking = [r for r in running if r.plan is None]
        if blocking:
            what = "publish what it deletes"
        else:
            hits = {r.id: ours() & read_plan(backend, r) for r in records if r.plan}
            hits = {rid: hit for rid, hit in hits.items() if hit}
            if not hits:
                return
            blocking = [r for r in running if r.id in hits]
            if not blocking:
                missing = [k for rid in hits for k in hits[rid] if not _chunk_exists(backend, k)]
                if missing:
                    gone = layout.chunk_key(missing[0].hex())
                    raise ConcurrentGcError(
                        f"checkpoint {checkpoint!r} not committed: a gc running beside the "
                        f"save deleted {len(missing)} chunk(s) it references (e.g. {gone}); "
                        "save again"
                    )
                settled |= set(hits)
                continue
            what = "finish deleting"
        if time.monotonic() >= deadline:
            raise ConcurrentGcError(
                f"checkpoint {checkpoint!r} not committed: {blocking[0].describe()} did not "
                f"{what} within {wait:.0f}s; save again"
            )
        time.sleep(poll)


def _chunk_exists(backend: Backend, key: bytes) -> bool:
    return backend.exists(layout.chunk_key(key.hex()))
