"""Benchmarks of ckptstore: datasets, methods, reports, and one module per suite.

    python -m ckptstore.bench SUITE [options]      (python -m ckptstore.bench SUITE -h)

Suites (docs/benchmarks.md says what each measures and where its figures are):

    compare        ckptstore vs torch.save, DCP and DCP+zstd, one run (= ``ckptstore bench``);
                   ``--chunk-sweep`` compares chunk sizes
    gc             gc on 20 checkpoints of a MiniLM fine-tune, local and on loopback S3
    codec          the lossless codec alone: one-thread MB/s and ratio, and 1 vs N threads
    quantize       stored ratio, error and codec speed per quantizer on real weights
    s3             ckptstore vs DCP's fsspec writer on loopback S3: seconds, requests, bytes
    s3-kill        seconds from a kill -9 of the S3 server to the error of the save it cut
    distributed    a 4-rank FSDP2 save and 4→2 / 4→1 loads (gloo, CPU), vs DCP
    history        cost of save/load/ls/inspect/gc as a store grows to 1,000 checkpoints
    metadata-sim   metadata each rank reads and receives at up to 1,024 ranks (simulated)
    keycheck       what checking every chunk read against its key costs a load
    gpu            save/async_save/load of CUDA tensors vs DCP (needs a CUDA device)
    delta          delta saves on a MiniLM full fine-tune and a GPT pretraining run: stored
                   ratio, save/load time, load time vs chain depth
    tiers          a local save with a loopback-S3 mirror vs no mirror, a save straight to
                   S3 and DCP's FsspecWriter: blocked time, time to durable, bytes uploaded

Without a suite name the arguments go to ``compare`` (the older form
``python -m ckptstore.bench [--chunk-sweep] [URL]``). The building blocks:
:mod:`ckptstore.bench.datasets` (what is saved), :mod:`ckptstore.bench.methods` (the
save/load pairs compared), :mod:`ckptstore.bench.report` (machine info, cells, JSON); for
``compare``: :mod:`ckptstore.bench.measure` (timing the methods),
:mod:`ckptstore.bench.codec` (the codec micro-benchmark), :mod:`ckptstore.bench.tables`
(its tables) and :mod:`ckptstore.bench.chunk_sweep` (``--chunk-sweep``). Import them from
their modules; this package itself imports no torch.

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
    "gc": "ckptstore.bench.gc_suite",
    "codec": "ckptstore.bench.codec",
    "quantize": "ckptstore.bench.quantize",
    "s3": "ckptstore.bench.s3",
    "s3-kill": "ckptstore.bench.s3_kill",
    "distributed": "ckptstore.bench.distributed",
    "history": "ckptstore.bench.history",
    "metadata-sim": "ckptstore.bench.metadata_sim",
    "keycheck": "ckptstore.bench.keycheck",
    "gpu": "ckptstore.bench.gpu",
    "delta": "ckptstore.bench.delta",
    "tiers": "ckptstore.bench.tiers",
}

__all__ = ["SUITES", "main", "suite"]


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
