"""What checking every chunk against its content key costs a load.

Every chunk a load reads is hashed again (xxh3-128 of the codec spec and the decoded bytes)
and compared with its key, so two chunk objects swapped or overwritten load as an error,
never as the wrong rows. This suite saves each dataset once, times ``ckptstore.load`` into a
template (median of ``--repeat``, page cache warm, as `compare` does), and times exactly the
work the check adds — the key hash of every chunk's decoded bytes, chunks fetched and decoded
outside the timing — on one thread, as one thread of the loader's pool does it.

    python -m ckptstore.bench keycheck [--data minilm --data synthetic] [--size-mb 500]

Results: docs/benchmarks.md, "Key check".
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from ckptstore.knobs import Settings


def measure(name: str, size_mb: float, repeat: int, settings: Settings) -> dict[str, Any]:
    from ckptstore import load, save
    from ckptstore.bench.datasets import dataset, template
    from ckptstore.codecs import Pipeline
    from ckptstore.store import Repository
    from ckptstore.store.chunks import content_key
    from ckptstore.store.session import LoadSession

    state, about = dataset(name, size_mb)
    if state is None:
        return {"dataset": name, **about}
    root = tempfile.mkdtemp(prefix="bench-keycheck-")
    try:
        url = os.path.join(root, "s")
        save(state, url, step=0, settings=settings)
        target = template(state)
        load(target, url, settings=settings)  # warm the page cache
        loads = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            load(target, url, settings=settings)
            loads.append(time.perf_counter() - t0)
        session = LoadSession(Repository.open(url, settings=settings))
        hashing = 0.0
        chunks = raw_bytes = 0
        for fqn, blob in session.manifest.blobs():
            pipeline = Pipeline.from_config(blob.codec)
            row_bytes = blob.nbytes // blob.rows if blob.rows else blob.nbytes
            for ref in blob.chunks:
                body, _ = session.reader.fetch_chunk_parts(ref, pipeline, row_bytes, fqn)
                t0 = time.perf_counter()
                content_key(pipeline, body)
                hashing += time.perf_counter() - t0
                chunks += 1
                raw_bytes += memoryview(body).nbytes
        load_s = statistics.median(loads)
        return {
            "dataset": name,
            "description": about.get("description"),
            "logical_bytes": about.get("logical_bytes"),
            "chunks": chunks,
            "load_seconds": round(load_s, 4),
            "key_hash_seconds_one_thread": round(hashing, 4),
            "key_hash_gb_s": round(raw_bytes / hashing / 1e9, 2) if hashing else None,
            "share_of_load": round(hashing / load_s, 4) if load_s else None,
            "threads": settings.threads,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ckptstore.bench keycheck", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument("--data", action="append", choices=("minilm", "minilm-bf16", "synthetic"))
    ap.add_argument("--size-mb", type=float, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    from ckptstore.bench.report import machine, write_json

    settings = Settings.resolve(fsync=False)
    rows = [measure(d, args.size_mb, args.repeat, settings) for d in args.data or ["minilm"]]
    print(f"{'dataset':<12} {'load s':>8} {'key hash s (1 thread)':>22} {'GB/s':>6} {'share':>7}")
    for r in rows:
        if "load_seconds" not in r:
            print(f"{r['dataset']:<12} skipped: {r.get('skipped')}")
            continue
        print(
            f"{r['dataset']:<12} {r['load_seconds']:>8.3f} "
            f"{r['key_hash_seconds_one_thread']:>22.4f} {r['key_hash_gb_s']:>6} "
            f"{100 * r['share_of_load']:>6.1f}%"
        )
    if args.json:
        write_json(args.json, {"machine": machine(settings), "rows": rows})


if __name__ == "__main__":
    main()
