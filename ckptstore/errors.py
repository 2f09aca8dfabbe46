"""The exception tree. Every error a user can see from ckptstore is a CkptStoreError.

Subclasses also derive from the builtin that fits, so ``except FileNotFoundError`` keeps
working for code that predates ckptstore. Messages name the checkpoint, tensor and object
key involved wherever they are known.
"""

from __future__ import annotations


class CkptStoreError(Exception):
    """Base class of every ckptstore error."""


class UnknownSchemeError(CkptStoreError, ValueError):
    """The URL's protocol is not one fsspec knows (or its package is not installed)."""


class InvalidURLError(CkptStoreError, ValueError):
    """The URL's protocol is known, but its filesystem cannot be built from the URL and the
    storage options given: no host (``ftp:///x``), a bad port, an option of the wrong type or
    one the filesystem does not take. The message names the URL."""


class StoreNotFoundError(CkptStoreError, FileNotFoundError):
    """No ckptstore store (no store.json) at the URL."""


class CheckpointNotFoundError(CkptStoreError, FileNotFoundError):
    """The store has no committed checkpoint by that name or step."""


class CheckpointExistsError(CkptStoreError, FileExistsError):
    """A checkpoint by that name is already committed; checkpoints are never overwritten."""


class FormatVersionError(CkptStoreError, ValueError):
    """The store or manifest was written by a format version this reader does not know."""


class UnknownCodecError(CkptStoreError, ValueError):
    """A manifest names a codec id this reader does not know."""


class CodecError(CkptStoreError, ValueError):
    """Bytes handed to a codec cannot be decoded by it (malformed, or larger than the size
    declared). Raised by the codec layer, which knows no chunk or checkpoint; the store layer
    turns it into a :class:`CorruptChunkError` naming the object, tensor and checkpoint."""


class StoreConfigError(CkptStoreError, ValueError):
    """``store.json`` exists but cannot be read as a ckptstore store config (not JSON, not
    an object, not marked ``"format": "ckptstore"``). An unknown version of a valid config is
    a :class:`FormatVersionError`."""


class CorruptChunkError(CkptStoreError, ValueError):
    """A chunk object failed its checksum, or could not be decoded."""


class ChunkNotFoundError(CkptStoreError, FileNotFoundError):
    """A chunk object a checkpoint references is missing from storage."""


class ManifestError(CkptStoreError, ValueError):
    """A manifest is truncated, corrupt or does not follow the schema."""


class ManifestCodecError(ManifestError, UnknownCodecError):
    """A manifest names a codec chain this reader cannot build (an unknown codec id or
    parameter): the manifest is unreadable (a ManifestError) because of an unknown codec
    (an UnknownCodecError). The message names the manifest and the tensor or object."""


class MismatchError(CkptStoreError, ValueError):
    """The state dict given to load does not match the checkpoint (shape, dtype, keys)."""


class UnsupportedValueError(CkptStoreError, TypeError):
    """A value of the state dict given to save cannot be stored: an object that does not
    pickle (a lambda, a local class, a lock, an open file), a sparse tensor, a meta tensor.
    Raised before the commit, naming the key; nothing is committed."""


class AllocationError(CkptStoreError, MemoryError):
    """A whole tensor of the checkpoint (``load_full``, ``export``) does not fit in this
    host's memory: the message names the tensor, its shape and its size in bytes."""


class UnsafeObjectError(CkptStoreError, ValueError):
    """A stored Python object needs full pickle to load; refused unless allow_pickle=True."""


class BackendError(CkptStoreError, OSError):
    """Storage failed (I/O error, permission, network) in a way not covered above."""


class AccessDeniedError(BackendError, PermissionError):
    """The storage refused the request: wrong or missing credentials, or no permission for
    that bucket or key. Not retried."""


class BucketNotFoundError(BackendError, FileNotFoundError):
    """The bucket named in the URL does not exist. Not retried, and never taken for an
    empty store (a save does not create buckets)."""


class StorageUnavailableError(BackendError, ConnectionError):
    """The storage did not answer, or kept failing with transient errors (5xx, throttling,
    connection reset, timeout), through every retry."""


class StorageFullError(BackendError):
    """The storage has no space left, or a quota is reached (ENOSPC, EDQUOT; S3 servers'
    storage-full and quota answers). Not retried; nothing partial is left under the key."""


class ObjectNotFoundError(BackendError, FileNotFoundError):
    """The backend has no object under that key (raised by the backend layer)."""


class ObjectExistsError(BackendError, FileExistsError):
    """A create-only put found the key already taken (raised by the backend layer)."""


class LeaseError(CkptStoreError):
    """A lease (of a save in flight, or of a gc run) could not be taken, kept or read."""


class LeaseExpiredError(LeaseError):
    """This process could not renew its lease in time: a gc elsewhere may have taken it for
    dead, so the save (or gc) stops rather than commit (or delete). Nothing was committed."""


class GcBusyError(LeaseError):
    """Another gc (or rm) holds the store's gc lock; try again when it has finished."""


class ConcurrentGcError(CkptStoreError):
    """A gc running beside this save deleted (or is deleting) a chunk the save meant to
    reference, so the save did not commit. Nothing was committed; saving again succeeds."""


class CheckpointBusyError(LeaseError):
    """A save is in flight for this checkpoint name (an ``overwrite=True`` save, or one that
    has not committed yet): it cannot be dropped now, and a second overwrite of the same name
    waits for the first. Try again once that save has finished (or its lease expired)."""


class MirrorError(CkptStoreError):
    """A checkpoint was not copied to the mirror (docs/tiers.md): the upload failed after
    the backend's retries, a rank never reported its chunks, or the commit was refused. The
    checkpoint in the primary store is not affected."""


__all__ = [name for name in dir() if name.endswith("Error")]
