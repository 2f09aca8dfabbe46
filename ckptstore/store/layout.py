"""Object key names. The one place that knows where things live in a store (docs/format.md)."""

from __future__ import annotations

import re

STORE_JSON = "store.json"
CHUNKS = "chunks"
CHECKPOINTS = "checkpoints"
MANIFEST_SUFFIX = ".msgpack"
LEASES = "leases"
TRASH = "trash"
CATALOG = "catalog"
UPLOADS = "uploads"
FORMAT_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_STEP_NAME = re.compile(r"^step-(\d+)$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_LEASE = re.compile(r"^(save|gc)-([0-9a-f]{32})\.json$")


def chunk_key(digest_hex: str) -> str:
    """``chunks/ab/abcdef…``: a two-hex-digit fan-out keeps folders small."""
    return f"{CHUNKS}/{digest_hex[:2]}/{digest_hex}"


def manifest_key(name: str) -> str:
    return f"{CHECKPOINTS}/{name}{MANIFEST_SUFFIX}"


def name_from_manifest_key(key: str) -> str | None:
    """The checkpoint name of a manifest key, or None if the key is not a manifest."""
    if not key.startswith(CHECKPOINTS + "/") or not key.endswith(MANIFEST_SUFFIX):
        return None
    name = key[len(CHECKPOINTS) + 1 : -len(MANIFEST_SUFFIX)]
    return name if _NAME.match(name) else None


def step_name(step: int) -> str:
    """Name of the checkpoint of ``step``; zero-padded so names sort by step."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"step-{step:012d}"


def step_of_name(name: str) -> int | None:
    m = _STEP_NAME.match(name)
    return int(m.group(1)) if m else None


def check_name(name: str) -> str:
    """Validate a checkpoint name: letters, digits, '.', '_', '-'; no path separators."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid checkpoint name {name!r}: use 1-200 of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name


def resolve_name(step: int | None, name: str | None) -> str:
    """The checkpoint name for a save given ``step`` and/or ``name``."""
    if name is not None:
        check_name(name)
        named_step = step_of_name(name)
        if step is not None and named_step is not None and named_step != step:
            raise ValueError(f"name {name!r} and step={step} disagree")
        return name
    if step is None:
        raise ValueError("give step= or name= to name the checkpoint")
    return step_name(step)


def chunk_digest(key: str) -> bytes | None:
    """The 16-byte content key of a ``chunks/ab/<hex>`` object key, or None if it is not one."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != CHUNKS or not _HEX32.match(parts[2]):
        return None
    if parts[1] != parts[2][:2]:
        return None
    return bytes.fromhex(parts[2])


# -- leases (docs/format.md, "Leases and garbage collection") ----------------------------
def lease_key(kind: str, lease_id: str) -> str:
    """``leases/save-<id>.json`` (a save in flight) or ``leases/gc-<id>.json`` (a gc run)."""
    if kind not in ("save", "gc") or not _HEX32.match(lease_id):
        raise ValueError(f"bad lease {kind!r}/{lease_id!r}")
    return f"{LEASES}/{kind}-{lease_id}.json"


def parse_lease_key(key: str) -> tuple[str, str] | None:
    """(kind, id) of a lease object key, or None if the key is not a lease."""
    if not key.startswith(LEASES + "/"):
        return None
    m = _LEASE.match(key[len(LEASES) + 1 :])
    return (m.group(1), m.group(2)) if m else None


def gc_plan_key(lease_id: str) -> str:
    """``leases/gc-<id>.plan``: the chunk keys a gc run deletes, published before it does."""
    if not _HEX32.match(lease_id):
        raise ValueError(f"bad lease id {lease_id!r}")
    return f"{LEASES}/gc-{lease_id}.plan"


def trash_key(name: str, deleted_ms: int, tag: str) -> str:
    """``trash/<name>.<deleted unix ms>.<8 hex>.msgpack``: a dropped checkpoint's manifest."""
    check_name(name)
    if not re.match(r"^[0-9a-f]{8}$", tag) or deleted_ms < 0:
        raise ValueError(f"bad trash tag {tag!r}/{deleted_ms!r}")
    return f"{TRASH}/{name}.{deleted_ms}.{tag}{MANIFEST_SUFFIX}"


def parse_trash_key(key: str) -> tuple[str, int] | None:
    """(checkpoint name, deletion time in Unix ms) of a trash key, or None."""
    if not key.startswith(TRASH + "/") or not key.endswith(MANIFEST_SUFFIX):
        return None
    rest = key[len(TRASH) + 1 : -len(MANIFEST_SUFFIX)]
    parts = rest.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not re.match(r"^[0-9a-f]{8}$", parts[2]):
        return None
    if not _NAME.match(parts[0]):
        return None
    return parts[0], int(parts[1])


def upload_prefix(name: str) -> str:
    """``uploads/<name>/``: the markers of a mirror upload of checkpoint ``name`` in flight."""
    return f"{UPLOADS}/{name}/"


def upload_marker_key(name: str, rank: int) -> str:
    """A rank's marker: its chunks of checkpoint ``name`` are in this store (or it failed)."""
    return f"{upload_prefix(name)}rank-{int(rank):06d}.json"


def upload_abort_key(name: str) -> str:
    """The coordinator's marker: the mirror commit of ``name`` was given up."""
    return f"{upload_prefix(name)}abort.json"
