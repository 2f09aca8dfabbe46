"""A store on a backend: its config (store.json), its committed checkpoints, and the
commit itself. Knows nothing of torch."""

from __future__ import annotations

import json
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from ckptstore.backend import Backend, open_backend
from ckptstore.errors import (
    CheckpointBusyError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    FormatVersionError,
    ManifestError,
    ObjectExistsError,
    ObjectNotFoundError,
    StoreConfigError,
    StoreNotFoundError,
)
from ckptstore.knobs import Settings
from ckptstore.store import catalog, layout, leases, refs
from ckptstore.store.catalog import CheckpointSummary
from ckptstore.store.manifest import Manifest, now
from ckptstore.version import __version__

HASH_ALGORITHM = "xxh3-128"
CHECKSUM_ALGORITHM = "xxh3-64"


class Repository:
    """Open store: read its config, list and read manifests, commit new ones."""

    def __init__(
        self, backend: Backend, config: dict[str, Any], settings: Settings | None = None
    ) -> None:
        self.backend = backend
        self.config = config
        self.settings = settings if settings is not None else backend.settings
        """Settings of the operations on this store (chunk size, threads, gc grace…)."""
        self._manifests: dict[str, Manifest] = {}  # manifests are immutable: cache freely
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.backend.url

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        create: bool = False,
        settings: Settings | None = None,
    ) -> Repository:
        """Open the store at ``url`` (or on a Backend object); with ``create`` make it if
        there is none. ``settings`` as resolved at the edge (by URL, resolved here if None;
        a Backend object brings its own)."""
        if isinstance(url, Backend):
            backend = url
        else:
            backend = open_backend(url, storage_options, settings)
        try:
            raw = backend.get(layout.STORE_JSON)
        except ObjectNotFoundError:
            if not create:
                raise StoreNotFoundError(
                    f"no ckptstore store at {backend.url} (missing {layout.STORE_JSON})"
                ) from None
            raw = cls._create(backend)
        return cls(backend, cls._parse_config(raw, backend), settings)

    @staticmethod
    def _create(backend: Backend) -> bytes:
        config = {
            "format": "ckptstore",
            "version": layout.FORMAT_VERSION,
            "hash": HASH_ALGORITHM,
            "checksum": CHECKSUM_ALGORITHM,
            "created_by": f"ckptstore {__version__}",
            "created": now(),
        }
        data = json.dumps(config, indent=2).encode() + b"\n"
        try:
            backend.put(layout.STORE_JSON, data, create_only=True)
        except ObjectExistsError:  # another process created it first: use theirs
            return backend.get(layout.STORE_JSON)
        return data

    @staticmethod
    def _parse_config(raw: bytes, backend: Backend) -> dict[str, Any]:
        where = backend.describe(layout.STORE_JSON)
        try:
            config = json.loads(raw)
        except ValueError as exc:
            raise StoreConfigError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict) or config.get("format") != "ckptstore":
            raise StoreConfigError(f"{where} is not a ckptstore store config")
        if config.get("version") != layout.FORMAT_VERSION:
            raise FormatVersionError(
                f"{where} has format version {config.get('version')!r}; this ckptstore "
                f"({__version__}) reads version {layout.FORMAT_VERSION} — upgrade ckptstore"
            )
        if config.get("hash") != HASH_ALGORITHM or config.get("checksum") != CHECKSUM_ALGORITHM:
            raise FormatVersionError(
                f"{where} uses hash {config.get('hash')!r} / checksum "
                f"{config.get('checksum')!r}, which this ckptstore does not support"
            )
        return config

    # -- checkpoints --------------------------------------------------------------------
    def names(self) -> list[str]:
        """Names of all committed checkpoints (unordered)."""
        keys = self.backend.list(layout.CHECKPOINTS)
        return [n for k in keys if (n := layout.name_from_manifest_key(k)) is not None]

    def manifest(self, name: str, *, cached: bool = True) -> Manifest:
        """Checkpoint ``name``'s manifest. Cached by name; ``cached=False`` reads it anew (a
        name can be removed and saved again by another process)."""
        with self._lock:
            hit = self._manifests.get(name) if cached else None
        if hit is not None:
            return hit
        key = layout.manifest_key(name)
        data = self.manifest_data(name)
        m = Manifest.decode(data, self.backend.describe(key))
        if m.name != name:
            raise ManifestError(
                f"manifest {self.backend.describe(key)} says it is checkpoint {m.name!r}"
            )
        m.manifest_bytes = len(data)
        with self._lock:
            self._manifests[name] = m
        return m

    def manifest_data(self, name: str) -> bytes:
        """Checkpoint ``name``'s manifest as stored (a copy to another store puts these
        bytes unchanged); CheckpointNotFoundError when there is none."""
        key = layout.manifest_key(name)
        try:
            return self.backend.get(key)
        except ObjectNotFoundError:
            raise CheckpointNotFoundError(
                f"checkpoint {name!r} not found in {self.url} (no {key})"
            ) from None

    def manifests(self) -> list[Manifest]:
        """Every committed checkpoint, oldest first (by commit time, then step).

        Raises the first error if any manifest cannot be read: use :meth:`scan` to get the
        readable ones and the errors separately.
        """
        found, bad = self.scan()
        if bad:
            raise next(iter(bad.values()))
        return found

    def scan(self) -> tuple[list[Manifest], dict[str, CkptStoreError]]:
        """Readable manifests, oldest first, and the error of each unreadable one by name.

        Every manifest is read anew, never from this object's cache: a checkpoint may have
        been overwritten, or removed and saved again, since (gc must see what is there now).
        A manifest removed (by gc or rm) between the listing and its read is skipped: the
        checkpoint no longer exists, which is not damage."""
        bad: dict[str, CkptStoreError] = {}

        def read(name: str) -> Manifest | None:
            try:
                return self.manifest(name, cached=False)
            except CheckpointNotFoundError:
                return None
            except CkptStoreError as exc:
                bad[name] = exc
                return None

        found = [m for m in self.backend.map(read, self.names()) if m is not None]
        found.sort(key=lambda m: (m.created, m.step if m.step is not None else -1, m.name))
        return found, dict(sorted(bad.items()))

    def summaries(self) -> tuple[list[CheckpointSummary], dict[str, CkptStoreError]]:
        """Every committed checkpoint's summary, oldest first, and the error of each one
        that cannot be read.

        Costs two listings (``catalog/``, then ``checkpoints/``) and a read only of the
        manifests that have no catalog entry — none, in a store whose saves all finished
        (docs/format.md, "Catalog"). A manifest removed while this runs is skipped."""
        entries = catalog.entries_by_name(self.backend.list(layout.CATALOG))
        found: list[CheckpointSummary] = []
        uncatalogued: list[str] = []
        for name in self.names():
            entry = entries.get(name)
            if entry is not None:
                found.append(entry[1])
            else:
                uncatalogued.append(name)
        bad: dict[str, CkptStoreError] = {}

        def read(name: str) -> CheckpointSummary | None:
            try:
                return CheckpointSummary.of(self.manifest(name, cached=False))
            except CheckpointNotFoundError:
                return None
            except CkptStoreError as exc:
                bad[name] = exc
                return None

        found += [s for s in self.backend.map(read, uncatalogued) if s is not None]
        found.sort(key=lambda s: s.order)
        return found, dict(sorted(bad.items()))

    def resolve(self, step: int | None = None, name: str | None = None) -> str:
        """The checkpoint name meant by ``step``/``name``; the latest when both are None.

        By name: one read (the manifest, cached for the caller). By step: one existence
        check of ``step-%012d``, else the catalog. Latest: the catalog (two listings)."""
        if name is not None:
            layout.check_name(name)
            if step is not None and layout.step_of_name(name) not in (None, step):
                raise ValueError(f"name {name!r} and step={step} disagree")
            self.manifest(name, cached=False)  # (read anew; the caller's next read is cached)
            return name
        if step is not None:
            wanted = layout.step_name(step)
            if self.exists(wanted):
                return wanted
            found, _ = self.summaries()
            matches = [s.name for s in found if s.step == step]
            if not matches:
                raise CheckpointNotFoundError(f"no checkpoint of step {step} in {self.url}")
            return matches[-1]
        pointed = self._pointed()
        if pointed is not None:
            return pointed
        found, bad = self.summaries()
        if bad:
            warnings.warn(
                f"latest checkpoint of {self.url} chosen among the readable ones; unreadable: "
                + ", ".join(f"{n!r} ({e})" for n, e in bad.items()),
                stacklevel=2,
            )
        if not found:
            raise CheckpointNotFoundError(f"no committed checkpoint in {self.url}")
        return found[-1].name

    def _pointed(self) -> str | None:
        """The newest checkpoint ``refs/latest/`` names whose manifest exists (one listing of
        about one key, one existence check), or None: then the catalog decides."""
        for name in refs.candidates(self.backend)[:2]:
            if self.exists(name):
                return name
        return None

    def latest(self) -> CheckpointSummary | None:
        """The newest committed checkpoint's summary (None in an empty store): by
        ``refs/latest/`` and the checkpoint's own catalog entry when they are there, else
        from the whole catalog."""
        name = self._pointed()
        if name is not None:
            entries = catalog.entries_by_name(self.backend.list(catalog.entry_prefix(name)))
            if name in entries:
                return entries[name][1]
        found, _ = self.summaries()
        return found[-1] if found else None

    def exists(self, name: str) -> bool:
        return self.backend.exists(layout.manifest_key(name))

    def commit_manifest(self, manifest: Manifest, *, data: bytes | None = None) -> int:
        """Write ``manifest`` with a create-only put: the commit. Returns its size; raises
        :class:`~ckptstore.errors.CheckpointExistsError` when its name is taken.

        Saves reach it through :class:`ckptstore.store.session.SaveSession`, after the chunks
        are written and the commit check passed (docs/format.md S1–S4), then write the
        catalog entry. Call it directly only to place a manifest without that protocol —
        replicating or synthesising checkpoints in a store for tests and benchmarks
        (:func:`ckptstore.testing.history.add_checkpoint`) — where no gc runs beside and
        the chunks it names are in the store or will not be read: it takes no lease, runs
        no commit check and writes no catalog entry (:meth:`write_catalog_entry`).
        ``data``: the bytes to put, when they are ``manifest``'s as read elsewhere."""
        key = layout.manifest_key(manifest.name)
        if data is None:
            data = manifest.encode()
        try:
            self.backend.put(key, data, create_only=True)
        except ObjectExistsError:
            raise CheckpointExistsError(
                f"Checkpoint already exists: {manifest.name!r} in {self.url}; "
                "checkpoints are never overwritten (choose another step/name or delete it)"
            ) from None
        manifest.manifest_bytes = len(data)
        with self._lock:
            self._manifests[manifest.name] = manifest
        return len(data)

    def _replace_manifest(self, manifest: Manifest) -> int:
        """The commit of an ``overwrite=True`` save (docs/format.md O1–O5): put ``manifest``
        in place of the checkpoint of its name, which stays complete until then. Returns the
        manifest's size.

        Only :class:`ckptstore.store.session.SaveSession` calls this, holding the save lease,
        after its commit check, as the only overwriter of that name (O1). Order: read the
        old manifest; copy it to ``trash/`` (create-only, as a drop does: a save that read it
        as its parent keeps its chunks, G4); delete its catalog entry (C3); one atomic put of
        the new manifest over it. A crash before that put leaves the old checkpoint complete
        (and a trash entry gc removes), after it the new one. With no old manifest, a
        create-only put, as :meth:`commit_manifest` does."""
        key = layout.manifest_key(manifest.name)
        data = manifest.encode()
        while True:
            try:
                old = self.backend.get(key)
            except ObjectNotFoundError:
                try:
                    self.backend.put(key, data, create_only=True)
                    break
                except ObjectExistsError:  # a plain save of that name committed meanwhile
                    continue
            try:
                Manifest.decode(old, self.backend.describe(key))
                readable = True
            except (ManifestError, FormatVersionError):  # no save can have read it (G2)
                readable = False
            entries = self.backend.list(catalog.entry_prefix(manifest.name))  # all of them
            if readable:  # O2
                tkey = layout.trash_key(
                    manifest.name, int(time.time() * 1000), uuid.uuid4().hex[:8]
                )
                self.backend.put(tkey, old, create_only=True)
            self.backend.map(self.backend.delete, entries)  # O3 (C3)
            self.backend.put(key, data)  # O4: the commit, one atomic put
            break
        manifest.manifest_bytes = len(data)
        with self._lock:
            self._manifests[manifest.name] = manifest
        return len(data)

    def saves_of(self, name: str) -> list[leases.LeaseInfo]:
        """The live save leases that name checkpoint ``name`` (O1, G10)."""
        now = time.time()
        return [
            info
            for info in leases.read_leases(self.backend)
            if info.kind == "save"
            and info.checkpoint == name
            and info.live(now, self.settings.clock_skew)
        ]

    def summary(self, name: str) -> CheckpointSummary:
        """One checkpoint's summary: its catalog entry (one listing of one key), else its
        manifest."""
        entry = catalog.entries_by_name(self.backend.list(catalog.entry_prefix(name))).get(name)
        return entry[1] if entry is not None else CheckpointSummary.of(self.manifest(name))

    def write_catalog_entry(self, manifest: Manifest) -> None:
        """Put the catalog entry of committed ``manifest`` (C1: after its commit)."""
        self.backend.put(catalog.entry_key(CheckpointSummary.of(manifest)), b"")

    def tidy_catalog(self) -> tuple[int, int]:
        """Make ``catalog/`` match ``checkpoints/``: delete entries whose manifest is gone,
        write the missing ones (reading those manifests). gc runs it; returns (deleted,
        written). Unreadable manifests get no entry."""
        keys = self.backend.list(layout.CATALOG)
        names = set(self.names())
        entries = catalog.entries_by_name(keys)
        current = {key for key, _ in entries.values()}
        stale = [k for k in keys if catalog.parse_entry_key(k) is not None and k not in current]
        stale += [key for name, (key, _) in entries.items() if name not in names]
        self.backend.map(self.backend.delete, stale)
        written = 0
        for name in sorted(names - set(entries)):
            try:
                self.write_catalog_entry(self.manifest(name, cached=False))
                written += 1
            except (CheckpointNotFoundError, ManifestError, FormatVersionError):
                continue
        return len(stale), written

    # -- dropping checkpoints (gc, rm; docs/format.md "Leases and garbage collection") ----
    def trash(self, name: str, *, deleted: float | None = None) -> tuple[str | None, int]:
        """Drop checkpoint ``name``: copy its manifest to ``trash/`` (create-only put), then
        delete the manifest. From then on the checkpoint does not exist; the trash entry
        keeps its chunks from gc while a save that may have read its manifest runs.

        Returns the trash key (None when the manifest was unreadable: it is deleted
        outright, as no save's dedup index can have used it) and the manifest's size.

        G10: a checkpoint that a live save lease names (an ``overwrite=True`` save may be
        replacing it) is not dropped: :class:`~ckptstore.errors.CheckpointBusyError`. The
        caller holds the gc lock; this reads the leases after taking it."""
        key = layout.manifest_key(layout.check_name(name))
        busy = self.saves_of(name)
        if busy:
            raise CheckpointBusyError(
                f"checkpoint {name!r} in {self.url} is not dropped: {busy[0].describe()} is "
                "saving it (overwrite=True); try again once that save has finished"
            )
        try:
            data = self.backend.get(key)
        except ObjectNotFoundError:
            raise CheckpointNotFoundError(
                f"checkpoint {name!r} not found in {self.url} (no {key})"
            ) from None
        readable = True
        try:
            Manifest.decode(data, self.backend.describe(key))
        except (ManifestError, FormatVersionError):
            readable = False
        # C3: the catalog entries go first, so an entry never outlives its manifest — every
        # entry under the name (one short listing), not just the one this manifest implies:
        # an entry written late, or by a tidy from an older manifest, must not survive
        entries = self.backend.list(catalog.entry_prefix(name))
        self.backend.map(self.backend.delete, entries)
        tkey = None
        if readable:
            when = time.time() if deleted is None else deleted
            tkey = layout.trash_key(name, int(when * 1000), uuid.uuid4().hex[:8])
            self.backend.put(tkey, data, create_only=True)
        self.backend.delete(key)
        with self._lock:
            self._manifests.pop(name, None)
        return tkey, len(data)

    def trash_entries(self) -> list[TrashEntry]:
        """The manifests in ``trash/``, oldest deletion first. Raises ManifestError if one
        cannot be read (gc must then not guess which chunks it protects)."""
        keys = [k for k in self.backend.list(layout.TRASH) if layout.parse_trash_key(k)]

        def read(key: str) -> TrashEntry | None:
            name, ms = layout.parse_trash_key(key)  # type: ignore[misc]
            try:
                data = self.backend.get(key)
            except ObjectNotFoundError:
                return None
            m = Manifest.decode(data, self.backend.describe(key))
            m.manifest_bytes = len(data)
            return TrashEntry(key, name, ms / 1000, m)

        found = [e for e in self.backend.map(read, keys) if e is not None]
        return sorted(found, key=lambda e: (e.deleted, e.key))


class TrashEntry:
    """A dropped checkpoint's manifest in ``trash/``: when it was dropped, what it named."""

    __slots__ = ("deleted", "key", "manifest", "name")

    def __init__(self, key: str, name: str, deleted: float, manifest: Manifest) -> None:
        self.key = key
        self.name = name
        self.deleted = deleted
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"TrashEntry({self.key!r})"
