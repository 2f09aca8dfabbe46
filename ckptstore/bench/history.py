"""How the cost of everyday operations grows with the number of checkpoints in a store.

For each N (default 10, 100, 1000): a store holding one real checkpoint of a 900-tensor,
~16 MB state (the tensor count of a 7B model's AdamW state) plus N − 1 older checkpoints,
then, measured: a save that changes 10 tensors, a load of the latest checkpoint into a
template, ``Store.list()`` (what ``ckptstore ls`` runs), ``inspect`` of one checkpoint, and a
dry-run gc that keeps everything. Each operation runs ``--repeat`` times (median seconds);
requests and metadata bytes come from a counting backend (``ckptstore.testing.counting``).

The older checkpoints are copies of a small checkpoint made by
``ckptstore.testing.history.replicate`` — objects exactly like real saves write, made in
seconds. None of the measured operations but gc reads them, so their size cannot change
those figures; gc (which must read every live checkpoint) grows with N by design.

    python -m ckptstore.bench history [--n 10 100 1000] [--s3] [--repeat 3] [--json out.json]

``--s3`` runs the same against SeaweedFS on 127.0.0.1 (started here). Results
belong in docs/benchmarks.md (none are recorded there yet).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from ckptstore import Store, __version__, load, save
from ckptstore.backend import open_backend
from ckptstore.bench.datasets import state_900
from ckptstore.bench.report import write_json
from ckptstore.knobs import Settings
from ckptstore.testing.counting import CountingBackend
from ckptstore.testing.history import replicate

BUCKET = "history"


def _template(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty_like(v) for k, v in sd.items()}


def measure(backend: CountingBackend, fn: Any, repeat: int) -> dict[str, Any]:
    times, counts = [], None
    for _ in range(repeat):
        backend.reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        counts = backend.summary()
    assert counts is not None
    reqs = counts["requests"]
    return {
        "seconds": round(statistics.median(times), 4),
        "requests": sum(reqs.values()),
        "metadata_requests": counts["metadata_requests"],
        "metadata_bytes": counts["metadata_bytes"],
        "manifest_reads": reqs.get("get checkpoints", 0),
        "keys_listed": sum(counts["keys_listed"].values()),
    }


def run_one(
    url: str, options: dict[str, Any], n: int, repeat: int, settings: Settings | None = None
) -> dict[str, Any]:
    """A store of ``n`` checkpoints at ``url``, then every operation measured."""
    settings = Settings.resolve(settings)
    sd = state_900()
    save({"w": torch.randn(64, 64)}, url, step=0, storage_options=options, settings=settings)
    if n > 1:
        store = Store(url, options, settings=settings)
        replicate(store.repo, store.latest(), n - 1, first_step=1)
    # the latest, a real one
    save(sd, url, step=n, storage_options=options, settings=settings)
    backend = CountingBackend(open_backend(url, options, settings))
    step = [n + 1]

    def save_one() -> None:
        for i in range(10):
            sd[f"layers.{(step[0] * 10 + i) % 300}.weight"] += 1e-3
        save(sd, backend, step=step[0], settings=settings)
        step[0] += 1

    template = _template(sd)
    out = {"checkpoints": n}
    out["save"] = measure(backend, save_one, repeat)
    out["load_latest"] = measure(
        backend, lambda: load(template, backend, settings=settings), repeat
    )
    # a fresh Store per call, as a new `ckptstore ls` / `inspect` process would open one (a
    # Store caches the manifests it read)
    out["ls"] = measure(backend, lambda: Store(backend, settings=settings).list(), repeat)
    out["inspect"] = measure(
        backend, lambda: Store(backend, settings=settings).inspect(step=n), repeat
    )
    out["gc_dry_run"] = measure(
        backend,
        lambda: Store(backend, settings=settings).gc(keep_last=10**6, dry_run=True),
        max(1, repeat // 2),
    )
    assert torch.equal(template["layers.0.bias"], sd["layers.0.bias"])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ckptstore.bench history", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--s3", action="store_true", help="SeaweedFS on 127.0.0.1, not local disk")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    settings = Settings.resolve()
    tmp = tempfile.mkdtemp(prefix="bench-history-")
    server = None
    options: dict[str, Any] = {}
    if args.s3:
        from ckptstore.testing.s3server import S3Server

        server = S3Server(os.path.join(tmp, "s3"), buckets=[BUCKET]).start()
        options = server.storage_options()
    rows = []
    try:
        for n in args.n:
            url = f"s3://{BUCKET}/n{n}" if args.s3 else os.path.join(tmp, f"n{n}")
            rows.append(run_one(url, options, n, args.repeat, settings))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            server.stop()
    result = {
        "storage": "SeaweedFS S3 on 127.0.0.1" if args.s3 else "local disk",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ckptstore": __version__,
        },
        "rows": rows,
    }
    print()
    ops = ("save", "load_latest", "ls", "inspect", "gc_dry_run")
    print(f"{'N':>6} " + " ".join(f"{op:>22}" for op in ops) + "   (s · metadata req · KB)")
    for r in rows:
        cells = [
            f"{r[op]['seconds']:.3f}s·{r[op]['metadata_requests']}·"
            f"{r[op]['metadata_bytes'] / 1e3:.0f}"
            for op in ops
        ]
        print(f"{r['checkpoints']:>6} " + " ".join(f"{c:>22}" for c in cells))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
