"""Object key names. The one place that knows where things live in a store (docs/format.md)."""

from __future__ import annotations

import re

STORE_JSON = "store.json"
CHUNKS = "chunks"
CHECKPOINTS = "checkpoints"
MANIFEST_SUFFIX = ".msgpack"
FORMAT_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_STEP_NAME = re.compile(r"^step-(\d+)$")


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
