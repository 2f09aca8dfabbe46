"""The codec micro-benchmark: the default lossless pipeline over a state's tensors in
row-aligned chunks, one thread, so the codec's ratio and speed can be set beside a whole
checkpoint's (``ckptstore bench``'s codec table, the chunk-size sweep)."""

from __future__ import annotations

import time
from collections.abc import Sequence
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


def codec_threads(state: StateDict, threads: int, chunk_bytes: int | None = None) -> dict[str, Any]:
    """The default lossless pipelines over every chunk of ``state`` on ``threads`` threads:
    aggregate encode and decode MB/s by wall clock (decode into a preallocated buffer per
    chunk, as a load does), so 1 vs N threads shows what the GIL leaves to scale."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    chunk_bytes = Settings().chunk_bytes if chunk_bytes is None else chunk_bytes
    pieces = []
    for _, t in iter_tensors(state):
        if t.numel() == 0:
            continue
        pipeline = default_pipeline(dtype_name(t.dtype))
        view = _host_view(t)
        rows = t.shape[0] if t.dim() else 1
        row_bytes = len(view) // rows
        for a, b in row_ranges(rows, row_bytes, chunk_bytes):
            pieces.append((pipeline, view[a * row_bytes : b * row_bytes]))
    raw = sum(len(p) for _, p in pieces)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda pp: pp[0].encode(pp[1]), pieces[: threads * 2]))  # warm-up
        t0 = time.perf_counter()
        encoded = list(pool.map(lambda pp: pp[0].encode(pp[1]), pieces))
        t1 = time.perf_counter()
        outs = [np.empty(len(p), np.uint8) for _, p in pieces]
        t2 = time.perf_counter()
        list(pool.map(lambda i: pieces[i][0].decode_into(encoded[i], outs[i]), range(len(pieces))))
        t3 = time.perf_counter()
    for (_, p), o in zip(pieces, outs, strict=True):
        if memoryview(o) != p:
            raise AssertionError("codec did not round-trip a chunk")
    return {
        "threads": threads,
        "raw_bytes": raw,
        "encode_mb_s": raw / MB / (t1 - t0),
        "decode_mb_s": raw / MB / (t3 - t2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ckptstore.bench codec``: the codec alone on each data set — the one-thread
    table of ``ckptstore bench`` (best of ``--repeat``) and aggregate MB/s at each of
    ``--threads``."""
    import argparse
    import os
    import platform

    from ckptstore.bench.datasets import dataset
    from ckptstore.bench.report import write_json

    p = argparse.ArgumentParser(prog="python -m ckptstore.bench codec", description=main.__doc__)
    p.add_argument("--data", nargs="+", default=["minilm", "minilm-bf16", "synthetic"])
    p.add_argument("--size-mb", type=float, default=500)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load": os.getloadavg(),
        },
        "data": {},
    }
    for name in args.data:
        state, about = dataset(name, args.size_mb)
        if state is None:
            print(f"{name}: skipped ({about.get('skipped')})")
            continue
        runs = [codec_bench(state) for _ in range(args.repeat)]
        one = max(runs, key=lambda r: r["encode_mb_s"])
        one["encode_mb_s"] = max(r["encode_mb_s"] for r in runs)
        one["decode_mb_s"] = max(r["decode_mb_s"] for r in runs)
        scaling = []
        for n in args.threads:
            rs = [codec_threads(state, n) for _ in range(args.repeat)]
            scaling.append(
                {
                    "threads": n,
                    "encode_mb_s": max(r["encode_mb_s"] for r in rs),
                    "decode_mb_s": max(r["decode_mb_s"] for r in rs),
                }
            )
        res["data"][name] = {"one_thread": one, "threads": scaling}
        line = ", ".join(
            f"{s['threads']} threads {s['encode_mb_s']:.0f}/{s['decode_mb_s']:.0f}" for s in scaling
        )
        print(
            f"{name}: ratio {one['ratio']:.4f}, 1 thread encode {one['encode_mb_s']:.0f} MB/s, "
            f"decode {one['decode_mb_s']:.0f} MB/s; wall clock enc/dec MB/s: {line}",
            flush=True,
        )
    if args.json:
        write_json(args.json, res)
