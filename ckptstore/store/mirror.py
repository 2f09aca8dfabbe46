"""The mirror uploader: copies each committed checkpoint from the primary store to the
mirror in the background, per rank, and commits it there once every rank's chunks arrived.

One :class:`MirrorUploader` per (primary, mirror) pair in a process, with one worker thread
and a bounded queue of :class:`MirrorJob` (chunk keys, never chunk bytes). A job on rank r
(docs/tiers.md, docs/format.md "Mirror uploads"):

1. when queued, right after the primary commit (or, on other ranks, after their chunks are
   written): a save lease on the *primary* naming the checkpoint, so a gc there (retention
   ``keep_last``) neither drops it (G10) nor deletes its chunks before they are sent;
2. a save lease on the mirror (S1) — the coordinator's is its :class:`SaveSession`'s;
3. the rank's chunks the mirror lacks, read from the primary, checked, put;
4. the commit check on the rank's keys (S3), then its marker ``uploads/<name>/rank-r.json``;
5. the coordinator waits for every rank's marker, then commits the manifest — the same
   bytes as in the primary — create-only, writes its catalog entry and deletes the markers;
   the other ranks hold their leases until they see that commit (or an abort marker).

A reader of the mirror therefore sees a checkpoint whole or not at all, whichever process
dies when. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ckptstore.errors import CheckpointExistsError, CkptStoreError, GcBusyError, MirrorError
from ckptstore.knobs import Settings
from ckptstore.store import layout, leases
from ckptstore.store.copy import chunk_exists, copy_chunk
from ckptstore.store.gc_run import collect
from ckptstore.store.manifest import Manifest
from ckptstore.store.options import Mirror
from ckptstore.store.repository import Repository
from ckptstore.store.retention import Retention
from ckptstore.store.session import SaveSession

__all__ = ["MirrorJob", "MirrorReport", "MirrorUploader", "uploader_for", "wait_for_mirrors"]

log = logging.getLogger(__name__)


@dataclass
class MirrorReport:
    """What mirroring one checkpoint did on this rank."""

    name: str
    url: str
    """The mirror's URL."""
    rank: int = 0
    durable: bool = False
    """The checkpoint is committed in the mirror."""
    skipped: bool = False
    """Not mirrored: uploads were behind (``Mirror.when_behind="skip"``)."""
    seconds: float = 0.0
    """From the save call to the mirror commit (seen by this rank)."""
    objects_sent: int = 0
    """Objects this rank put into the mirror (chunks; the coordinator: and the manifest)."""
    bytes_sent: int = 0
    objects_skipped: int = 0
    """Chunks of this rank's share that the mirror held already."""
    bytes_skipped: int = 0
    manifest_bytes: int = 0
    """The manifest's size (coordinator only; 0 elsewhere)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if k == "seconds" else v) for k, v in self.__dict__.items()}


ChunkEntry = tuple[bytes, bool, int]
"""(chunk key, written new by this save, stored size)."""


@dataclass
class MirrorJob:
    """One checkpoint to mirror from one rank: its share's chunk keys, not their bytes.

    A job may be queued before its chunks exist (``streamed``): the writer then calls
    :meth:`add` with each blob's chunks as it is written (the upload starts while the save
    still runs), :meth:`close` when all are in and, on the coordinator, :meth:`committed`
    once the primary commit is done — or :meth:`cancel` when the save failed. A job made
    with ``keys`` is complete (closed, committed) from the start."""

    name: str
    rank: int
    world: int
    save_id: str
    """The save's id, the same on every rank (the coordinator's): markers of another
    attempt at the same name are not this save's."""
    keys: set[bytes] = field(default_factory=set)
    """Every chunk this rank's share of the checkpoint references (with delta bases)."""
    new_keys: set[bytes] = field(default_factory=set)
    """Those this rank wrote to the primary in this save: put to the mirror unprobed."""
    sizes: dict[bytes, int] = field(default_factory=dict)
    coordinator: bool = False
    """The coordinator's job commits the manifest in the mirror (read from the primary)."""
    started: float = field(default_factory=time.monotonic)
    """When the save call began (monotonic), for ``MirrorReport.seconds``."""
    skip: bool = False
    streamed: bool = False
    """Keys come by :meth:`add` until :meth:`close` (else ``keys`` is all of them)."""
    cancelled: str | None = None
    _feed: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    _committed: threading.Event = field(default_factory=threading.Event, repr=False)
    _closed: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.streamed:
            self._feed.put([(k, k in self.new_keys, self.sizes.get(k, 0)) for k in self.keys])
            self._feed.put(None)
            self._committed.set()
            self._closed.set()

    def add(self, entries: list[ChunkEntry]) -> None:
        """More chunks of this rank's share (from a writer thread)."""
        if not entries or self.skip:
            return
        with self._lock:
            for key, new, size in entries:
                self.keys.add(key)
                self.sizes[key] = size
                if new:
                    self.new_keys.add(key)
        self._feed.put(entries)

    def close(self) -> None:
        """Every chunk of the share has been added."""
        self._feed.put(None)
        self._closed.set()

    def committed(self) -> None:
        """The coordinator's primary commit is done: the mirror commit may follow."""
        self._committed.set()

    def cancel(self, why: str) -> None:
        """The save failed (or this rank's part of it): upload nothing more, commit
        nothing; the future gets a MirrorError saying ``why``."""
        if self.cancelled is None:
            self.cancelled = why
        self._feed.put(None)
        self._committed.set()
        self._closed.set()

    def batches(self) -> Iterator[list[ChunkEntry]]:
        """The chunks as they are added, until closed or cancelled."""
        while True:
            batch = self._feed.get()
            if batch is None or self.cancelled is not None:
                return
            yield batch

    def wait_committed(self, timeout: float) -> bool:
        return self._committed.wait(timeout)

    def wait_closed(self, timeout: float) -> bool:
        return self._closed.wait(timeout)


class MirrorUploader:
    """The uploads of this process from ``primary`` to ``mirror`` (see the module)."""

    def __init__(
        self,
        primary: Repository,
        mirror: Mirror,
        *,
        storage_options: Mapping[str, Any] | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.primary = primary
        self.config = mirror
        self.settings = settings if settings is not None else primary.settings
        self.storage_options = mirror.options_for(primary.url, storage_options)
        self._mirror: Repository | None = None
        self._cond = threading.Condition()
        self._queue: deque[tuple[MirrorJob, Future[MirrorReport], Any]] = deque()
        self._busy = 0  # jobs taken by the worker and not finished
        self._errors: list[tuple[str, MirrorError]] = []  # not yet raised (on_error="raise")
        self._thread: threading.Thread | None = None
        self._paused = 0
        # what this rank's previous mirrored checkpoint held: chunks known to be in the
        # mirror while that checkpoint is there (checked under the next job's lease)
        self._confirmed: tuple[str, set[bytes]] | None = None

    # -- the training side ---------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Checkpoints queued or uploading (skipped ones do not count)."""
        with self._cond:
            return self._busy + len(self._queue)

    def full(self) -> bool:
        """Would a new job wait (or be skipped)?"""
        return self.pending >= self.config.max_pending

    def submit(self, job: MirrorJob) -> Future[MirrorReport]:
        """Queue ``job``; waits while ``max_pending`` jobs are pending (``when_behind``
        "wait"). A ``job.skip`` (every rank skips that save together) resolves at once,
        not mirrored. Takes the primary lease first (step 1)."""
        out: Future[MirrorReport] = Future()
        if job.skip:
            log.warning(
                "checkpoint %r not mirrored to %s: %d upload(s) still pending",
                job.name,
                self.config.url,
                self.pending,
            )
            out.set_result(MirrorReport(job.name, self.config.url, job.rank, skipped=True))
            return out
        lease = leases.Lease.acquire(
            self.primary.backend,
            "save",
            checkpoint=job.name,
            ttl=self.settings.lease_ttl,
            skew=self.settings.clock_skew,
        )
        try:
            with self._cond:
                while self.pending >= self.config.max_pending:
                    self._cond.wait()
                self._queue.append((job, out, lease))
                self._start()
                self._cond.notify_all()
        except BaseException:
            lease.release()
            raise
        _register_exit_hook()
        return out

    def take_error(self, *, besides: str | None = None) -> MirrorError | None:
        """The oldest failure not yet raised (for ``on_error="raise"``), once; not that of
        checkpoint ``besides`` (the save asking: its own upload may still be running)."""
        with self._cond:
            for i, (name, err) in enumerate(self._errors):
                if name != besides:
                    del self._errors[i]
                    return err
            return None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Start no new upload inside the block (the one running finishes): a maintenance
        window, or a test of a queue that falls behind. Saves still queue (and wait or
        skip when ``max_pending`` are pending: with ``when_behind="wait"`` a save in the
        block that finds the queue full waits for the block to end, so save there from
        another thread, or with ``"skip"``)."""
        with self._cond:
            self._paused += 1
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job is pending; False when ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- the worker ----------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="ckptstore-mirror", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._paused and self._queue:
                    self._cond.wait()
                if not self._queue:
                    self._thread = None
                    self._cond.notify_all()
                    return
                job, out, lease = self._queue.popleft()
                self._busy += 1
            report: MirrorReport | None = None
            err: MirrorError | None = None
            try:
                report = self._run(job)
            except BaseException as exc:  # noqa: BLE001 - reported on the future, logged
                if isinstance(exc, MirrorError):
                    err = exc
                else:
                    err = MirrorError(
                        f"checkpoint {job.name!r} not mirrored to {self.config.url} "
                        f"(rank {job.rank}): {exc}"
                    )
                    err.__cause__ = exc
                log.error("%s", err)
            finally:
                lease.release()
                with self._cond:  # no longer pending once its future resolves
                    self._busy -= 1
                    if err is not None and self.config.on_error == "raise":
                        self._errors.append((job.name, err))
                    self._cond.notify_all()
            if err is not None:
                out.set_exception(err)
            else:
                out.set_result(report)  # type: ignore[arg-type]

    def _repo(self) -> Repository:
        if self._mirror is None:
            self._mirror = Repository.open(
                self.config.url, self.storage_options, create=True, settings=self.settings
            )
        return self._mirror

    def _run(self, job: MirrorJob) -> MirrorReport:
        if not self.config.stream:  # nothing of the upload competes with the save
            self._wait_closed(job)
            if job.coordinator:  # (its save ends with the commit)
                self._wait_for_primary(job, _NO_LEASE)
        mirror = self._repo()
        report = MirrorReport(job.name, mirror.url, job.rank)
        session: SaveSession | None = None
        lease: leases.Lease | None = None
        if job.coordinator:
            try:
                session = SaveSession(mirror, job.name, parent=None).begin()
            except CheckpointExistsError:
                return self._already(mirror, job, report)
            lease = session.lease
        else:
            lease = leases.Lease.acquire(
                mirror.backend,
                "save",
                checkpoint=job.name,
                ttl=self.settings.lease_ttl,
                skew=self.settings.clock_skew,
            )
        assert lease is not None
        alone = job.world == 1  # no other rank to wait for: no markers
        try:
            self._send(mirror, job, report)
            if session is None:  # (the coordinator's commit checks every key under its lease)
                leases.check_commit(
                    mirror.backend, lease, job.keys, checkpoint=job.name, wait=self.settings.gc_wait
                )
            if not alone:
                self._marker(mirror, job, "done")
            if session is not None:
                if not alone:
                    self._wait_for_ranks(mirror, job, lease)
                self._wait_for_primary(job, lease)
                data = self.primary.manifest_data(job.name)
                manifest = Manifest.decode(data, self.primary.backend.describe(job.name))
                report.manifest_bytes = session.commit(manifest, data=data)
                report.objects_sent += 1
                report.bytes_sent += report.manifest_bytes
                if not alone:
                    self._tidy(mirror, job.name)
            else:
                self._wait_for_commit(mirror, job, lease)
        except BaseException:
            if session is not None:
                if not alone:
                    self._abort(mirror, job)
            else:
                try:
                    self._marker(mirror, job, "failed")
                except CkptStoreError:
                    pass
            raise
        finally:
            if session is not None:
                session.release()
            else:
                lease.release()
        self._confirmed = (job.name, set(job.keys))
        report.durable = True
        report.seconds = time.monotonic() - job.started
        if session is not None and self.config.keep_last is not None:
            self._retain(mirror)
        return report

    def _wait_closed(self, job: MirrorJob) -> None:
        """Until the rank's share is written (or the save failed)."""
        if not job.wait_closed(self.config.ranks_wait):
            raise MirrorError(f"checkpoint {job.name!r}: its chunks were never all written")
        if job.cancelled is not None:
            raise MirrorError(
                f"checkpoint {job.name!r} not mirrored to {self.config.url}: {job.cancelled}"
            )

    def _wait_for_primary(self, job: MirrorJob, lease: leases.Lease) -> None:
        """The coordinator: until the primary commit is done (the manifest is read from
        there, under the primary lease, which no drop or overwrite passes: G10, O1)."""
        deadline = time.monotonic() + self.config.ranks_wait
        while not job.wait_committed(1.0):
            lease.check(f"mirror checkpoint {job.name!r}")
            if time.monotonic() >= deadline:
                raise MirrorError(f"checkpoint {job.name!r}: its primary commit never came")
        if job.cancelled is not None:
            raise MirrorError(
                f"checkpoint {job.name!r} not mirrored to {self.config.url}: {job.cancelled}"
            )

    def _already(self, mirror: Repository, job: MirrorJob, report: MirrorReport) -> MirrorReport:
        """The mirror holds ``job.name`` already (a copy, or a retried upload)."""
        self._wait_for_primary(job, _NO_LEASE)
        data = self.primary.manifest_data(job.name)
        if mirror.backend.get(layout.manifest_key(job.name)) != data:
            raise MirrorError(
                f"checkpoint {job.name!r} exists in the mirror {mirror.url} with another "
                "manifest than in the primary; not mirrored (remove it there first)"
            )
        report.durable = True
        report.seconds = time.monotonic() - job.started
        return report

    def _send(self, mirror: Repository, job: MirrorJob, report: MirrorReport) -> None:
        """Send the job's chunks the mirror lacks as they come (``io_requests`` at once);
        at the first failure no new put starts and it is raised."""
        known: set[bytes] = set()
        if self._confirmed is not None and mirror.exists(self._confirmed[0]):
            known = self._confirmed[1]  # committed there, and kept while our lease lives
        probe = chunk_exists(mirror)
        seen: set[bytes] = set()
        failed: list[BaseException] = []
        lock = threading.Lock()

        def one(entry: ChunkEntry) -> None:
            key, new, size = entry
            if failed or job.cancelled is not None:
                return
            try:
                if key in known or (not new and probe(key)):
                    with lock:
                        report.objects_skipped += 1
                        report.bytes_skipped += size
                    return
                sent = copy_chunk(self.primary, mirror, key)
            except BaseException as exc:  # noqa: BLE001 - raised by _send below
                with lock:
                    failed.append(exc)
                return
            with lock:
                report.objects_sent += 1
                report.bytes_sent += sent

        with ThreadPoolExecutor(
            self.settings.io_requests, thread_name_prefix="ckptstore-mirror-io"
        ) as pool:
            for batch in job.batches():
                if failed:
                    break
                fresh = [e for e in batch if e[0] not in seen]
                seen.update(e[0] for e in fresh)
                for entry in fresh:
                    pool.submit(one, entry)
        if failed:
            raise failed[0]
        if job.cancelled is not None:
            raise MirrorError(
                f"checkpoint {job.name!r} not mirrored to {mirror.url}: {job.cancelled}"
            )

    def _marker(self, mirror: Repository, job: MirrorJob, status: str) -> None:
        body = {
            "save": job.save_id,
            "status": status,
            "rank": job.rank,
            "world": job.world,
            "chunks": len(job.keys),
            "time": time.time(),
            "pid": os.getpid(),
        }
        mirror.backend.put(layout.upload_marker_key(job.name, job.rank), json.dumps(body).encode())

    def _markers(self, mirror: Repository, name: str) -> dict[str, dict[str, Any]]:
        out = {}
        for key in mirror.backend.list(layout.upload_prefix(name)):
            try:
                body = json.loads(mirror.backend.get(key))
            except (CkptStoreError, ValueError):
                continue  # removed meanwhile, or half-written by a crashed rank
            if isinstance(body, dict):
                out[key] = body
        return out

    def _poll(self, job: MirrorJob, lease: leases.Lease, done: Any, what: str) -> None:
        deadline = time.monotonic() + self.config.ranks_wait
        pause = 0.02
        while True:
            lease.check(f"mirror checkpoint {job.name!r}")
            if done():
                return
            if time.monotonic() >= deadline:
                raise MirrorError(
                    f"checkpoint {job.name!r} not mirrored to {self.config.url}: {what} "
                    f"within {self.config.ranks_wait:.0f}s (a rank died or cannot reach it)"
                )
            time.sleep(pause)
            pause = min(pause * 1.5, 2.0)

    def _wait_for_ranks(self, mirror: Repository, job: MirrorJob, lease: leases.Lease) -> None:
        """The coordinator: until every rank's marker says done (MirrorError when one says
        it failed or skipped)."""

        def done() -> bool:
            markers = self._markers(mirror, job.name)
            ranks = {}
            for key, body in markers.items():
                if key.endswith("abort.json") or body.get("save") not in (job.save_id, ""):
                    continue  # (a marker left by an earlier attempt at this name)
                ranks[body.get("rank")] = body.get("status")
            bad = {r: s for r, s in ranks.items() if s != "done"}
            if bad:
                rank, status = next(iter(sorted(bad.items(), key=lambda x: str(x[0]))))
                raise MirrorError(
                    f"checkpoint {job.name!r} not mirrored to {self.config.url}: rank {rank} "
                    f"reports its upload {status}"
                )
            return all(ranks.get(r) == "done" for r in range(job.world))

        self._poll(job, lease, done, "not every rank's chunks arrived")

    def _wait_for_commit(self, mirror: Repository, job: MirrorJob, lease: leases.Lease) -> None:
        """Other ranks: hold the lease until the coordinator committed (or gave up)."""

        def done() -> bool:
            if mirror.exists(job.name):
                return True
            try:
                body = json.loads(mirror.backend.get(layout.upload_abort_key(job.name)))
            except (CkptStoreError, ValueError):
                return False
            if isinstance(body, dict) and body.get("save") == job.save_id:
                raise MirrorError(
                    f"checkpoint {job.name!r} not mirrored to {self.config.url}: the "
                    f"coordinator gave the commit up ({body.get('why', '?')})"
                )
            return False

        self._poll(job, lease, done, "the coordinator did not commit it")

    def _abort(self, mirror: Repository, job: MirrorJob) -> None:
        """The coordinator gave up: tell waiting ranks (best effort; they time out else)."""
        try:
            body = {"save": job.save_id, "time": time.time(), "why": "an upload failed"}
            mirror.backend.put(layout.upload_abort_key(job.name), json.dumps(body).encode())
            keys = mirror.backend.list(layout.upload_prefix(job.name))
            mirror.backend.map(
                mirror.backend.delete, [k for k in keys if not k.endswith("abort.json")]
            )
        except CkptStoreError as exc:
            log.warning("abort marker of %r not written: %s", job.name, exc)

    def _tidy(self, mirror: Repository, name: str) -> None:
        """After the commit: the markers of ``name`` are done with."""
        try:
            keys = mirror.backend.list(layout.upload_prefix(name))
            mirror.backend.map(mirror.backend.delete, keys)
        except CkptStoreError as exc:
            log.info("upload markers of %r left in %s: %s", name, mirror.url, exc)

    def _retain(self, mirror: Repository) -> None:
        try:
            collect(mirror, Retention(keep_last=self.config.keep_last))
        except GcBusyError as exc:
            log.info("mirror retention skipped: %s", exc)
        except CkptStoreError as exc:
            log.warning("mirror retention on %s failed: %s", mirror.url, exc)


class _NoLease:
    def check(self, doing: str = "") -> None:
        pass


_NO_LEASE: Any = _NoLease()

_uploaders: dict[tuple[str, str], MirrorUploader] = {}
_uploaders_lock = threading.Lock()
_hook_registered = False


def uploader_for(
    primary: Repository,
    mirror: Mirror,
    *,
    storage_options: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> MirrorUploader:
    """This process's uploader from ``primary`` to ``mirror`` (made at first use). A new
    ``Mirror`` value for the same pair replaces its settings for later jobs."""
    key = (primary.url, mirror.url)
    with _uploaders_lock:
        up = _uploaders.get(key)
        if up is None:
            up = MirrorUploader(primary, mirror, storage_options=storage_options, settings=settings)
            _uploaders[key] = up
        else:
            up.config = mirror
        return up


def wait_for_mirrors(timeout: float | None = None) -> bool:
    """Block until every upload of this process finished (committed or failed); False
    when ``timeout`` passed first. Failures are on each save's ``mirrored`` future."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _uploaders_lock:
        ups = list(_uploaders.values())
    for up in ups:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not up.wait(left):
            return False
    return True


def _finish_uploads() -> None:
    """At interpreter exit: let pending uploads finish (their failures are logged), while
    thread pools still take work (see ckptstore.background)."""
    with _uploaders_lock:
        ups = list(_uploaders.values())
    pending = sum(up.pending for up in ups)
    if pending:
        log.warning("waiting for %d checkpoint upload(s) to the mirror before exit", pending)
    wait_for_mirrors()


def _register_exit_hook() -> None:
    global _hook_registered
    with _uploaders_lock:
        if _hook_registered:
            return
        import concurrent.futures.thread  # noqa: F401 - its hook must be registered before ours

        threading._register_atexit(_finish_uploads)  # type: ignore[attr-defined]
        _hook_registered = True
