"""ckptstore vs plain DCP (FsspecWriter/FsspecReader) on a loopback S3 server, in one run.

Starts SeaweedFS (``ckptstore.testing.s3server``) on 127.0.0.1 unless ``--endpoint-url`` names
a server of yours (credentials then come from the environment), builds a GPT-like state with
AdamW moments (``ckptstore.bench.datasets.synthetic_state``), and for each method measures save and
load seconds, the request count by S3 operation and the bytes sent in request bodies. Every
S3 request of both methods goes through ``s3fs.S3FileSystem._call_s3``, which is counted.
Each method saves the same state twice (the second save is what a dedup store skips).

    python -m ckptstore.bench s3 --size-mb 500 --json docs/bench_s3.json

Figures from it are in docs/s3.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import fsspec.asyn
import torch

from ckptstore import load, save
from ckptstore.bench.datasets import first_difference, logical_bytes, synthetic_state
from ckptstore.bench.report import knobs, write_json
from ckptstore.knobs import Settings

BUCKET = "bench"


class RequestCounter:
    """Counts every S3 API call s3fs makes, and the bytes of request and response bodies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.calls: collections.Counter[str] = collections.Counter()
            self.bytes_up = 0
            self.bytes_down = 0

    def install(self) -> None:
        import s3fs

        original = s3fs.S3FileSystem._call_s3
        counter = self

        async def counted(fs: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
            name = method if isinstance(method, str) else getattr(method, "__name__", "?")
            body = kwargs.get("Body")
            with counter.lock:
                counter.calls[name] += 1
                if body is not None and hasattr(body, "__len__"):
                    counter.bytes_up += len(body)
            out = await original(fs, method, *args, **kwargs)
            if name == "get_object" and isinstance(out, dict):
                with counter.lock:
                    counter.bytes_down += int(out.get("ContentLength") or 0)
            return out

        s3fs.S3FileSystem._call_s3 = counted
        # open files (DCP's writer and reader) go through the sync wrapper, which holds the
        # original coroutine function: wrap it anew
        s3fs.S3FileSystem.call_s3 = fsspec.asyn.sync_wrapper(counted)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": sum(self.calls.values()),
                "by_operation": dict(sorted(self.calls.items())),
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
            }


def template_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.empty_like(state)
    if isinstance(state, dict):
        return {k: template_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [template_like(v) for v in state]
    return state


def measure(counter: RequestCounter, fn: Any) -> dict[str, Any]:
    counter.reset()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), **counter.snapshot(), "result": out}


def run(args: argparse.Namespace, settings: Settings | None = None) -> dict[str, Any]:
    """Start the server (unless ``args.endpoint_url``), measure every step, stop it."""
    import s3fs
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    settings = Settings.resolve(settings)
    server = None
    if args.endpoint_url:
        options: dict[str, Any] = {"endpoint_url": args.endpoint_url}
    else:
        from ckptstore.testing.s3server import S3Server

        tmp = tempfile.mkdtemp(prefix="bench-s3-")
        server = S3Server(os.path.join(tmp, "data"), buckets=[BUCKET]).start()
        options = server.storage_options()
    counter = RequestCounter()
    counter.install()
    try:
        print(f"building a ~{args.size_mb} MB state ...", flush=True)
        state = synthetic_state(args.size_mb)
        logical = logical_bytes(state)
        run_id = f"r{int(time.time())}"
        ck_url = f"s3://{BUCKET}/{run_id}/ckptstore"
        dcp_url = f"s3://{BUCKET}/{run_id}/dcp"
        results: dict[str, Any] = {
            "logical_bytes": logical,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "s3fs": s3fs.__version__,
                "server": "SeaweedFS weed mini on 127.0.0.1 (same machine)"
                if server
                else args.endpoint_url,
            },
            "knobs": knobs(settings, ("threads", "io_requests", "io_bytes", "chunk_bytes")),
        }

        # warm-up: connections, imports, bucket listing (not measured)
        save(
            {"w": torch.zeros(4)},
            f"s3://{BUCKET}/{run_id}/warm",
            step=0,
            storage_options=options,
            settings=settings,
        )

        def ck_save(step: int) -> dict[str, Any]:
            info = save(state, ck_url, step=step, storage_options=options, settings=settings)
            return {
                "stored": info.stored_bytes,
                "new": info.new_bytes,
                "chunks": info.chunks,
                "new_chunks": info.new_chunks,
            }

        def ck_load() -> dict[str, Any]:
            tpl = template_like(state)
            info = load(tpl, ck_url, step=1, storage_options=options, settings=settings)
            diff = first_difference(state, tpl)
            assert diff is None, diff
            return {"bytes_read": info.bytes_read, "objects": info.objects_read}

        def dcp_save(name: str) -> dict[str, Any]:
            writer = FsspecWriter(
                f"{dcp_url}/{name}", sync_files=False, thread_count=args.dcp_threads, **options
            )
            dcp.save(state, storage_writer=writer, no_dist=True)
            return {}

        def dcp_load() -> dict[str, Any]:
            tpl = template_like(state)
            dcp.load(tpl, storage_reader=FsspecReader(f"{dcp_url}/1", **options), no_dist=True)
            diff = first_difference(state, tpl)
            assert diff is None, diff
            return {}

        steps = [
            ("ckptstore save", lambda: ck_save(1)),
            ("ckptstore save again (same state)", lambda: ck_save(2)),
            ("ckptstore load", ck_load),
            ("DCP FsspecWriter save", lambda: dcp_save("1")),
            ("DCP FsspecWriter save again", lambda: dcp_save("2")),
            ("DCP FsspecReader load", dcp_load),
        ]
        rows = {}
        for name, fn in steps:
            print(f"{name} ...", flush=True)
            rows[name] = measure(counter, fn)
            r = rows[name]
            print(
                f"  {r['seconds']:.2f} s, {r['requests']} requests, "
                f"{r['bytes_up'] / 1e6:.1f} MB up, {r['bytes_down'] / 1e6:.1f} MB down",
                flush=True,
            )
        results["rows"] = rows
        return results
    finally:
        if server is not None:
            server.stop()


def render(res: dict[str, Any]) -> str:
    mb = res["logical_bytes"] / 1e6
    lines = [
        f"State: {mb:.0f} MB logical (fp32 GPT-like model + AdamW moments).",
        "",
        "| step | seconds | MB/s (logical) | requests | MB sent | MB received "
        "| requests by operation |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in res["rows"].items():
        ops = ", ".join(f"{k} {v}" for k, v in r["by_operation"].items())
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {mb / r['seconds']:.0f} | {r['requests']} | "
            f"{r['bytes_up'] / 1e6:.1f} | {r['bytes_down'] / 1e6:.1f} | {ops} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m ckptstore.bench s3", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--size-mb", type=float, default=500)
    p.add_argument("--endpoint-url", default=None, help="use this S3 server (bucket 'bench')")
    p.add_argument("--dcp-threads", type=int, default=1, help="FsspecWriter thread_count")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    res = run(args)
    text = render(res)
    print(text)
    if args.json:
        for r in res["rows"].values():
            r.pop("result", None) if not r.get("result") else None
        write_json(args.json, res)


if __name__ == "__main__":
    main()
