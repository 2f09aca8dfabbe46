"""How long a save takes to fail when its S3 server dies: kill -9 of SeaweedFS in the middle
of a save of 12 × 32 MiB, many tries, default settings.

Each try saves the same state (384 MiB fp32, 96 chunks of 4 MiB) to a fresh prefix of a
loopback SeaweedFS (``ckptstore.testing.s3server``) and kills the server (SIGKILL) from another
thread once a random number of chunk puts (5–60) has started, so requests are in flight when
it dies. It records the seconds from the kill to the save's error, the error's class and
whether it names a chunk object, then starts the server again on the same data. The bound
these figures check is in docs/s3.md ("A dead server").

    python -m ckptstore.bench s3-kill --tries 20 --json docs/results/s3_kill.json
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from ckptstore import save
from ckptstore.backend import open_backend
from ckptstore.bench.report import knobs, write_json
from ckptstore.knobs import Settings
from ckptstore.testing.faulty import FaultyBackend

BUCKET = "bench"


def one_try(server: Any, state: dict[str, torch.Tensor], url: str, after: int) -> dict[str, Any]:
    """One save killed after ``after`` chunk puts started: seconds from kill to error."""
    settings = Settings.resolve()
    faulty = FaultyBackend(open_backend(url, server.storage_options(), settings))
    killed: dict[str, float] = {}

    def kill() -> None:
        killed["at"] = time.monotonic()
        server.kill()

    faulty.on(
        "put", "chunks/*", lambda key: threading.Thread(target=kill).start(), after=after, times=1
    )
    t0 = time.monotonic()
    error: BaseException | None = None
    try:
        save(state, faulty, step=1, settings=settings)
    except Exception as exc:  # what the user gets
        error = exc
    end = time.monotonic()
    while "at" not in killed and error is None:  # (a save that ended before the kill)
        time.sleep(0.01)
    row: dict[str, Any] = {
        "kill_after_chunk_puts": after,
        "save_seconds_before_kill": round(killed.get("at", end) - t0, 3),
        "seconds_after_kill": round(end - killed["at"], 3) if "at" in killed else None,
        "error": type(error).__name__ if error else None,
        "names_chunk": bool(error and "/chunks/" in str(error)),
        "message": str(error)[:300] if error else None,
        "chunk_puts_started": faulty.count("put", "chunks/*"),
    }
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ckptstore.testing.s3server import S3Server

    tmp = tempfile.mkdtemp(prefix="bench-s3-kill-")
    server = S3Server(os.path.join(tmp, "data"), buckets=[BUCKET]).start()
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows = 32 * 1024 * 1024 // 4 // 1024
    state = {f"layer{i}.weight": torch.randn(rows, 1024, generator=gen) for i in range(12)}
    tries = []
    try:
        for i in range(args.tries):
            row = one_try(server, state, f"s3://{BUCKET}/kill-{i}", rng.randint(5, 60))
            tries.append(row)
            print(
                f"try {i + 1}: killed after {row['kill_after_chunk_puts']} chunk puts "
                f"({row['save_seconds_before_kill']:.2f} s in), failed "
                f"{row['seconds_after_kill']} s after the kill: {row['error']}",
                flush=True,
            )
            server.start()
    finally:
        server.stop()
    after = [t["seconds_after_kill"] for t in tries if t["seconds_after_kill"] is not None]
    return {
        "state": "12 x 32 MiB fp32 (384 MiB), default chunking",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "server": "SeaweedFS weed mini on 127.0.0.1 (same machine)",
            "load": os.getloadavg(),
        },
        "knobs": knobs(
            Settings.resolve(),
            ("retries", "retry_base_ms", "connect_timeout", "read_timeout", "io_requests"),
        ),
        "tries": tries,
        "failed": sum(1 for t in tries if t["error"]),
        "max_seconds_after_kill": max(after) if after else None,
        "median_seconds_after_kill": sorted(after)[len(after) // 2] if after else None,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m ckptstore.bench s3-kill", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--tries", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    res = run(args)
    print(
        f"{res['failed']} of {len(res['tries'])} saves failed; seconds from kill to error: "
        f"median {res['median_seconds_after_kill']}, max {res['max_seconds_after_kill']}"
    )
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
