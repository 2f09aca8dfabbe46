"""Benchmarks of ckptstore: datasets, methods, reports, and one module per suite.

    python -m ckptstore.bench SUITE [options]      (python -m ckptstore.bench SUITE -h)

Suites (docs/benchmarks.md says what each measures and where its figures are):

    compare        ckptstore vs torch.save, DCP and DCP+zstd, one run (= ``ckptstore bench``);
                   ``--chunk-sweep`` compares chunk sizes
    gc             gc on 20 checkpoints of a MiniLM fine-tune, local and on loopback S3
    quantize       stored ratio, error and codec speed per quantizer on real weights
    s3             ckptstore vs DCP's fsspec writer on loopback S3: seconds, requests, bytes
    distributed    a 4-rank FSDP2 save and 4→2 / 4→1 loads (gloo, CPU), vs DCP
    history        cost of save/load/ls/inspect/gc as a store grows to 1,000 checkpoints
    metadata-sim   metadata each rank reads and receives at up to 1,024 ranks (simulated)
    keycheck       what checking every chunk read against its key costs a load
    gpu            save/async_save/load of CUDA tensors vs DCP (needs a CUDA device)
    delta          delta saves on a MiniLM full fine-tune and a GPT pretraining run: stored
                   ratio, save/load time, load time vs chain depth

Without a suite name the arguments go to ``compare`` (the older form
``python -m ckptstore.bench [--chunk-sweep] [URL]``). The building blocks:
:mod:`ckptstore.bench.datasets` (what is saved), :mod:`ckptstore.bench.methods` (the
save/load pairs compared), :mod:`ckptstore.bench.report` (machine info, cells, JSON).

Every suite resolves its :class:`ckptstore.Settings` once (``CKPTSTORE_*`` variables and its
own options) and passes them to every ckptstore call; none changes the environment.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

SUITES = {
    "compare": "ckptstore.bench.compare",
    "gc": "ckptstore.bench.gc",
    "quantize": "ckptstore.bench.quantize",
    "s3": "ckptstore.bench.s3",
    "distributed": "ckptstore.bench.distributed",
    "history": "ckptstore.bench.history",
    "metadata-sim": "ckptstore.bench.metadata_sim",
    "keycheck": "ckptstore.bench.keycheck",
    "gpu": "ckptstore.bench.gpu",
    "delta": "ckptstore.bench.delta",
}

# the names ``ckptstore.bench`` offered when it was one module, imported on first use
# (importing this package does not import torch)
_LAZY = {
    "run_bench": "ckptstore.bench.compare",
    "bench_dataset": "ckptstore.bench.compare",
    "chunk_sweep": "ckptstore.bench.compare",
    "codec_bench": "ckptstore.bench.compare",
    "render": "ckptstore.bench.compare",
    "DATASETS": "ckptstore.bench.datasets",
    "load_minilm": "ckptstore.bench.datasets",
    "minilm_path": "ckptstore.bench.datasets",
    "synthetic_state": "ckptstore.bench.datasets",
    "gpt_shape": "ckptstore.bench.datasets",
    "iter_tensors": "ckptstore.bench.datasets",
    "first_difference": "ckptstore.bench.datasets",
    "METHODS": "ckptstore.bench.methods",
    "disk_usage": "ckptstore.bench.methods",
    "machine": "ckptstore.bench.report",
    "PAGE_CACHE_NOTE": "ckptstore.bench.report",
}

__all__ = ["SUITES", "main", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptstore.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def suite(name: str) -> Any:
    """The module of suite ``name`` (``metadata_sim`` and ``metadata-sim`` alike)."""
    key = name.replace("_", "-")
    if key not in SUITES:
        raise KeyError(f"unknown suite {name!r} (choose from {', '.join(SUITES)})")
    return importlib.import_module(SUITES[key])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ckptstore.bench SUITE [options]``: run one suite with its own options."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return
    if args and args[0].replace("_", "-") in SUITES:
        suite(args[0]).main(args[1:])
    else:
        suite("compare").main(args)
