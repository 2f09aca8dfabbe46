"""Settings, resolved once at the edge.

A :class:`Settings` object is built where a user call enters ckptstore (``save``, ``load``,
``Writer``/``Reader``, ``Store``, a CLI command, opening a store by URL) from, in rising
priority: the defaults below, ``CKPTSTORE_*`` environment variables, and the call's own
arguments. It is frozen and passed down; nothing below the edge reads the environment, so a
variable changed in the middle of a save changes nothing of that save.

The zstd level is not read from the environment: it is part of every chunk key (the codec
config is hashed with the bytes), so it is chosen per call (``Settings(zstd_level=3)``), never
by a variable that one rank may see and another not.

The chunk size was chosen by measurement (docs/benchmarks.md): on MiniLM weights 1, 4 and
16 MiB chunks compress within 0.1% of each other; 4 MiB is the fastest on the codec path
and small enough that a resharded rank reads little beyond its share.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _default_threads() -> int:
    return min(8, max(2, os.cpu_count() or 2))


@dataclass(frozen=True)
class Settings:
    """Every tunable of ckptstore; see docs/api.md, "Settings"."""

    chunk_bytes: int = 4 * 1024 * 1024
    """Target uncompressed bytes per chunk; chunks are cut on row boundaries."""
    inline_bytes: int = 16 * 1024
    """Shards up to this many raw bytes are stored inside the manifest."""
    threads: int = dataclasses.field(default_factory=_default_threads)
    """Threads that hash, encode, upload, download and decode chunks."""
    zstd_level: int = 1
    """zstd level for integer and byte data (floats use the entropy-coder mode). Part of
    the chunk key: not taken from the environment."""
    fsync: bool = True
    """Local files are fsync'ed before they are renamed into place."""
    stage_bytes: int = 512 * 1024 * 1024
    """Host copies (of GPU or non-contiguous tensors) a sync save keeps in flight at most."""
    pin_bytes: int = 256 * 1024 * 1024
    """Pinned (page-locked) host memory for the chunk-by-chunk copies of GPU tensors: device
    to host on save, host to device on load. One process-wide pool of chunk-sized buffers,
    reused by every call and never exceeded (docs/gpu.md)."""
    device_snapshot: bool = False
    """async_save: snapshot GPU tensors on their device (a clone; the call returns without
    waiting for any copy, at the cost of their size in GPU memory until the save is done)
    instead of in pinned host memory (docs/gpu.md)."""
    quantize_min_bytes: int = 64 * 1024
    """Tensors smaller than this (whole tensor) are never quantized."""
    device_quantize: bool = False
    """Quantize CPU tensors with the device (torch) path too; GPU tensors always use it."""
    retries: int = 4
    """Object storage: tries again of a request that failed transiently."""
    retry_base_ms: int = 200
    """First backoff in ms (doubled per try, with jitter, capped at 5 s)."""
    connect_timeout: int = 5
    read_timeout: int = 30
    io_requests: int = 16
    """Requests in flight at once for uploads and batched downloads."""
    io_bytes: int = 256 * 1024 * 1024
    """Bound on the bytes uploads in flight hold (encoders wait while it is reached)."""
    lease_ttl: int = 300
    """Seconds a lease lives after its last renewal (holders renew every TTL/5)."""
    clock_skew: int = 30
    """Most clock difference assumed between machines and the storage."""
    gc_grace: int = 3600
    """gc never deletes an unreferenced chunk younger than this (seconds)."""
    delta_chain: int = 8
    """Delta saves: most delta links from a chunk to its standalone root (a load reads at
    most this many + 1 objects per chunk; a damaged base breaks at most this many later
    checkpoints). 8, the smallest bound at which a full fine-tune stores ≥ 1.5× in a long
    run; it costs loads up to 7× (docs/benchmarks.md "Delta")."""
    delta_cache_bytes: int = 1024 * 1024 * 1024
    """Delta saves: raw bytes of recently written or decoded chunks this process keeps as
    bases for its next save (an LRU; a miss reads the base back from the store)."""
    gc_wait: int = 600
    """How long a commit waits for a running gc to publish what it deletes (seconds)."""

    @classmethod
    def resolve(
        cls,
        base: Settings | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Settings for one call: ``base`` (or the defaults), then ``CKPTSTORE_*`` variables
        (only when no ``base`` is given: a base was resolved at an outer edge already), then
        the ``overrides`` that are not None."""
        if base is None:
            env = os.environ if environ is None else environ
            found: dict[str, Any] = {}
            for f in dataclasses.fields(cls):
                if f.name in _NOT_FROM_ENV:
                    continue
                var = f"CKPTSTORE_{f.name.upper()}"
                text = env.get(var)
                if text is None or not text.strip():
                    continue
                try:
                    value = int(text)
                except ValueError as exc:
                    raise ValueError(f"{var}={text!r} is not an integer") from exc
                found[f.name] = bool(value) if f.type in ("bool", bool) else value
            base = cls(**found)
        return base.replace(**overrides)

    def replace(self, **overrides: Any) -> Settings:
        """A copy with the ``overrides`` that are not None."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        for k, v in given.items():
            if not isinstance(v, int) or (isinstance(v, bool) and k not in _BOOLS):
                raise TypeError(f"setting {k} must be an int, not {v!r}")
            if k in _BOOLS:
                given[k] = bool(v)
        return dataclasses.replace(self, **given) if given else self


_NOT_FROM_ENV = frozenset({"zstd_level"})
_BOOLS = frozenset({"fsync", "device_quantize", "device_snapshot"})

DEFAULTS = Settings()
