"""Two tiers: a save to a local folder with a loopback-S3 mirror, against the same save
without the mirror, a ckptstore save straight to S3 and DCP's FsspecWriter straight to S3 —
in one run, on the same checkpoints.

For each checkpoint of a series it measures (a) the seconds the training loop is blocked by
the save call, with and without the mirror; (b) the seconds from the call until the
checkpoint is durable in the mirror (``MirrorReport.seconds``), against a ckptstore save and
a DCP ``FsspecWriter`` save straight to the bucket; (c) the bytes sent to S3 for the mirror
copy (every request body, counted at s3fs), against the checkpoint's new compressed chunks
plus its manifest. Series: the synthetic GPT + AdamW state (every tensor changes between
checkpoints, as in pretraining) and the MiniLM fine-tune series (the last two layers train).

    python -m ckptstore.bench tiers --json docs/results/tiers.json

Figures from it are in docs/benchmarks.md ("Two tiers").
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ckptstore import Mirror, save
from ckptstore.bench.datasets import fine_tune_states, logical_bytes, minilm_path, synthetic_state
from ckptstore.bench.report import knobs, write_json
from ckptstore.bench.s3 import BUCKET, RequestCounter
from ckptstore.knobs import Settings


def synthetic_series(size_mb: float, n: int) -> Iterator[tuple[int, Any]]:
    """``n`` checkpoints of the synthetic state; between two, every float tensor moves a
    little (as every weight and moment does in pretraining)."""
    state = synthetic_state(size_mb)
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        if i:
            for t in _floats(state):
                scale = float(t.abs().mean()) * 1e-4
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * scale)
        yield i, state


def _floats(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _floats(v)


def run(args: argparse.Namespace, settings: Settings | None = None) -> dict[str, Any]:
    import s3fs
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    from ckptstore.testing.s3server import S3Server

    settings = Settings.resolve(settings)
    tmp = tempfile.mkdtemp(prefix="bench-tiers-")
    server = S3Server(os.path.join(tmp, "s3"), buckets=[BUCKET]).start()
    options = server.storage_options()
    counter = RequestCounter()
    counter.install()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "s3fs": s3fs.__version__,
            "disk": "local folder (page cache; fsync as the knob says)",
            "server": "SeaweedFS weed mini on 127.0.0.1 (same machine)",
            "load": os.getloadavg(),
        },
        "knobs": knobs(settings, ("threads", "io_requests", "chunk_bytes", "fsync")),
        "series": {},
    }
    try:
        save({"w": torch.zeros(4)}, f"s3://{BUCKET}/warm", step=0, storage_options=options)
        series: dict[str, Iterator[tuple[int, Any]]] = {
            "synthetic": synthetic_series(args.size_mb, args.synthetic_checkpoints)
        }
        if minilm_path() is not None:
            series["minilm"] = (
                (i, s) for i, (_, s) in enumerate(fine_tune_states(args.checkpoints, 20, 2))
            )
        for label, states in series.items():
            rows = []
            run_id = f"{label}-{int(time.time())}"
            plain, fast = os.path.join(tmp, run_id, "plain"), os.path.join(tmp, run_id, "fast")
            tier = Mirror(f"s3://{BUCKET}/{run_id}/mirror", storage_options=options)
            streamed = Mirror(
                f"s3://{BUCKET}/{run_id}/streamed", storage_options=options, stream=True
            )
            fast_s = os.path.join(tmp, run_id, "fast-streamed")
            for i, state in states:
                row: dict[str, Any] = {"checkpoint": i, "logical_bytes": logical_bytes(state)}
                # the two saves alternate which goes first (the page cache, the allocator),
                # and each starts after a pause: the S3 server settles after the uploads
                if i % 2:
                    time.sleep(args.settle)
                    row["blocked_plain_s"] = _timed(save, state, plain, i, settings)
                counter.reset()
                time.sleep(args.settle)
                t0 = time.perf_counter()
                info = save(state, fast, step=i, mirror=tier, settings=settings)
                row["blocked_mirror_s"] = time.perf_counter() - t0
                report = info.mirrored.result()
                if not i % 2:
                    time.sleep(args.settle)
                    row["blocked_plain_s"] = _timed(save, state, plain, i, settings)
                snap = counter.snapshot()
                row.update(
                    durable_s=report.seconds,
                    mirror_bytes_up=snap["bytes_up"],
                    mirror_requests=snap["requests"],
                    mirror_objects_sent=report.objects_sent,
                    mirror_bytes_sent=report.bytes_sent,
                    new_bytes=info.new_bytes,  # new chunks + inline data + manifest
                )
                t0 = time.perf_counter()
                info = save(state, fast_s, step=i, mirror=streamed, settings=settings)
                row["blocked_streamed_s"] = time.perf_counter() - t0
                row["durable_streamed_s"] = info.mirrored.result().seconds
                t0 = time.perf_counter()
                save(
                    state,
                    f"s3://{BUCKET}/{run_id}/direct",
                    step=i,
                    storage_options=options,
                    settings=settings,
                )
                row["direct_s3_s"] = time.perf_counter() - t0
                if i < args.dcp_checkpoints:
                    t0 = time.perf_counter()
                    writer = FsspecWriter(
                        f"s3://{BUCKET}/{run_id}/dcp/{i}", sync_files=False, **options
                    )
                    dcp.save(state, storage_writer=writer, no_dist=True)
                    row["dcp_s3_s"] = time.perf_counter() - t0
                rows.append(row)
                print(_line(label, row), flush=True)
            results["series"][label] = rows
            shutil.rmtree(os.path.join(tmp, run_id), ignore_errors=True)
        return results
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _timed(fn: Any, state: Any, url: str, step: int, settings: Settings) -> float:
    t0 = time.perf_counter()
    fn(state, url, step=step, settings=settings)
    return time.perf_counter() - t0


def _line(label: str, r: dict[str, Any]) -> str:
    dcp_s = f"{r['dcp_s3_s']:.2f}" if "dcp_s3_s" in r else "-"
    return (
        f"{label} #{r['checkpoint']}: blocked {r['blocked_plain_s']:.2f} → "
        f"{r['blocked_mirror_s']:.2f} s with mirror ({r['blocked_streamed_s']:.2f} streamed); "
        f"durable {r['durable_s']:.2f} s ({r['durable_streamed_s']:.2f} streamed) "
        f"(direct S3 {r['direct_s3_s']:.2f}, DCP {dcp_s}); up {r['mirror_bytes_up'] / 1e6:.2f} "
        f"MB for {r['new_bytes'] / 1e6:.2f} MB new"
    )


def render(res: dict[str, Any]) -> str:
    lines = [
        "| series | checkpoints | (a) blocked, mirror ÷ none (sums) | (b) durable ÷ direct S3 "
        "| (b) durable ÷ DCP S3 | (c) bytes up ÷ new bytes | first checkpoint: (a) / (b) / (c) "
        "| stream=True: (a) / (b) direct |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for label, rows in res["series"].items():
        a = sum(r["blocked_mirror_s"] for r in rows) / sum(r["blocked_plain_s"] for r in rows)
        b = sum(r["durable_s"] for r in rows) / sum(r["direct_s3_s"] for r in rows)
        with_dcp = [r for r in rows if "dcp_s3_s" in r]
        bd = sum(r["durable_s"] for r in with_dcp) / sum(r["dcp_s3_s"] for r in with_dcp)
        c = sum(r["mirror_bytes_up"] for r in rows) / sum(r["new_bytes"] for r in rows)
        f = rows[0]
        first = (
            f"{f['blocked_mirror_s'] / f['blocked_plain_s']:.2f}× / "
            f"{f['durable_s'] / f['direct_s3_s']:.2f}× direct, "
            f"{f['durable_s'] / f.get('dcp_s3_s', float('nan')):.2f}× DCP / "
            f"{f['mirror_bytes_up'] / f['new_bytes']:.3f}×"
        )
        med_a = statistics.median(r["blocked_mirror_s"] / r["blocked_plain_s"] for r in rows)
        med_b = statistics.median(r["durable_s"] / r["direct_s3_s"] for r in rows)
        sa = sum(r["blocked_streamed_s"] for r in rows) / sum(r["blocked_plain_s"] for r in rows)
        sb = sum(r["durable_streamed_s"] for r in rows) / sum(r["direct_s3_s"] for r in rows)
        lines.append(
            f"| {label} | {len(rows)} | {a:.2f}× (median {med_a:.2f}×) | {b:.2f}× (median "
            f"{med_b:.2f}×) | {bd:.2f}× ({len(with_dcp)} ckpts) "
            f"| {c:.3f}× | {first} | {sa:.2f}× / {sb:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m ckptstore.bench tiers", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--size-mb", type=float, default=500, help="synthetic state (500: 476 MiB)")
    p.add_argument("--checkpoints", type=int, default=10, help="MiniLM series length")
    p.add_argument("--synthetic-checkpoints", type=int, default=3)
    p.add_argument("--dcp-checkpoints", type=int, default=3, help="DCP saves per series")
    p.add_argument("--settle", type=float, default=1.0, help="pause before each local save")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    res = run(args)
    print(render(res))
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
