"""Defaults in one place. Each knob can be overridden by a ``CKPTSTORE_*`` environment
variable; an explicit function argument wins over both.

The chunk size was chosen by measurement (docs/benchmarks.md): on MiniLM weights 1, 4 and
16 MiB chunks compress within 0.1% of each other; 4 MiB is the fastest on the codec path
and small enough that a resharded rank reads little beyond its share.
"""

from __future__ import annotations

import os

_DEFAULTS: dict[str, int] = {
    # target uncompressed bytes per chunk; chunks are cut on row boundaries
    "CHUNK_BYTES": 4 * 1024 * 1024,
    # shards up to this many raw bytes are stored inside the manifest
    "INLINE_BYTES": 16 * 1024,
    # threads that hash, encode, upload, download and decode chunks
    "THREADS": min(8, max(2, os.cpu_count() or 2)),
    # zstd level for integer and byte data (floats use the entropy-coder mode)
    "ZSTD_LEVEL": 1,
    # 1: local files are fsync'ed before they are renamed into place, so after a power
    # loss a committed manifest never names a chunk that did not reach the disk
    "FSYNC": 1,
    # host copies (of GPU or non-contiguous tensors) a sync save keeps in flight at most
    "STAGE_BYTES": 512 * 1024 * 1024,
    # tensors smaller than this (whole tensor) are never quantized: norms, biases, counters
    "QUANTIZE_MIN_BYTES": 64 * 1024,
    # 1: quantize CPU tensors with the device (torch) path too; GPU tensors always use it
    "DEVICE_QUANTIZE": 0,
    # object storage: how many times a request that failed transiently (5xx, throttling,
    # connection reset, timeout) is tried again, and the first backoff in milliseconds
    # (doubled per try, with jitter, capped at 5 s)
    "RETRIES": 4,
    "RETRY_BASE_MS": 200,
    # object storage: seconds to connect, and to wait for the next bytes of a response
    "CONNECT_TIMEOUT": 5,
    "READ_TIMEOUT": 30,
    # requests in flight at once for uploads and batched downloads, and the bound on the
    # bytes those uploads hold (the encoders wait while it is reached)
    "IO_REQUESTS": 16,
    "IO_BYTES": 256 * 1024 * 1024,
    # leases (docs/format.md, "Leases and garbage collection"), in seconds: a lease lives
    # this long after its last renewal (holders renew every TTL/5)
    "LEASE_TTL": 300,
    # most clock difference assumed between any two machines (and the storage's clock);
    # every time comparison between writers, gc and object mtimes leaves this margin
    "CLOCK_SKEW": 30,
    # gc never deletes an unreferenced chunk younger than this (default of --grace)
    "GC_GRACE": 3600,
    # how long a commit waits for a running gc to publish what it deletes
    "GC_WAIT": 600,
}


def get(name: str, override: int | None = None) -> int:
    """Return knob ``name``: the override if given, else $CKPTSTORE_<name>, else the default."""
    if override is not None:
        return int(override)
    env = os.environ.get(f"CKPTSTORE_{name}")
    if env is not None and env.strip():
        try:
            return int(env)
        except ValueError as exc:
            raise ValueError(f"CKPTSTORE_{name}={env!r} is not an integer") from exc
    return _DEFAULTS[name]
