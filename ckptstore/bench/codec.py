"""The codec micro-benchmark: the default lossless pipeline over a state's tensors in
row-aligned chunks, one thread, so the codec's ratio and speed can be set beside a whole
checkpoint's (``ckptstore bench``'s codec table, the chunk-size sweep)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ckptstore.bench.datasets import MB, StateDict, iter_tensors
from ckptstore.codecs import default_pipeline
from ckptstore.knobs import Settings
from ckptstore.store.chunks import row_ranges  # the store's chunk grid, so chunks are its own


def _host_view(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def dtype_name(dtype: torch.dtype) -> str:
    """The name the codecs' dtype table uses: torch's own (``torch.bfloat16`` → ``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


def codec_bench(state: StateDict, chunk_bytes: int | None = None) -> dict[str, Any]:
    """Default lossless pipeline per dtype over row-aligned chunks of ``chunk_bytes`` (the
    default setting's when None), one thread.

    Encode/decode MB/s are raw bytes over summed per-chunk seconds; ratio is raw/encoded;
    every chunk is checked to decode to its input (outside the timing).
    """
    chunk_bytes = Settings().chunk_bytes if chunk_bytes is None else chunk_bytes
    by_dtype: dict[str, dict[str, Any]] = {}
    pieces = 0  # chunks, plus one per tensor too small to be cut
    for _, t in iter_tensors(state):
        if t.numel() == 0:
            continue
        name = dtype_name(t.dtype)
        pipeline = default_pipeline(name)
        view = _host_view(t)
        rows = t.shape[0] if t.dim() else 1
        row_bytes = len(view) // rows
        acc = by_dtype.setdefault(
            name, {"pipeline": pipeline.short(), "raw": 0, "enc": 0, "enc_s": 0.0, "dec_s": 0.0}
        )
        for a, b in row_ranges(rows, row_bytes, chunk_bytes):
            piece = view[a * row_bytes : b * row_bytes]
            t0 = time.perf_counter()
            encoded = pipeline.encode(piece)
            t1 = time.perf_counter()
            decoded = pipeline.decode(encoded)
            t2 = time.perf_counter()
            if memoryview(decoded).cast("B") != piece:
                raise AssertionError(f"codec {pipeline.short()} did not round-trip a chunk")
            acc["raw"] += len(piece)
            acc["enc"] += memoryview(encoded).nbytes
            acc["enc_s"] += t1 - t0
            acc["dec_s"] += t2 - t1
            pieces += 1
    raw = sum(d["raw"] for d in by_dtype.values())
    enc = sum(d["enc"] for d in by_dtype.values())
    enc_s = sum(d["enc_s"] for d in by_dtype.values())
    dec_s = sum(d["dec_s"] for d in by_dtype.values())

    def rates(r: int, e: int, es: float, ds: float) -> dict[str, Any]:
        return {
            "raw_bytes": r,
            "encoded_bytes": e,
            "ratio": r / e if e else None,
            "encode_mb_s": r / MB / es if es else None,
            "decode_mb_s": r / MB / ds if ds else None,
        }

    return {
        "chunk_bytes": chunk_bytes,
        "pieces": pieces,
        **rates(raw, enc, enc_s, dec_s),
        "by_dtype": {
            k: {"pipeline": d["pipeline"], **rates(d["raw"], d["enc"], d["enc_s"], d["dec_s"])}
            for k, d in by_dtype.items()
        },
    }
