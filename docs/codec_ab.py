"""The codec of an older commit vs this tree's, interleaved in one process (so a shared,
noisy machine slows both alike): per data set, the default lossless pipeline over 4 MiB
row-aligned chunks, encode / decode / decode_into MB/s (sum of per-chunk times, best of
REPS rounds) and the ratio. The old codec modules are read with ``git show REV:path``.

    REPS=5 OUT=docs/results/codec-ab.json REV=6f1ee4e \
        python docs/codec_ab.py minilm minilm-bf16 synthetic
"""

import json
import os
import sys
import time
import types

import numpy as np

import ckptstore.codecs.registry as reg
from ckptstore.bench.codec import _host_view, dtype_name
from ckptstore.bench.datasets import dataset, iter_tensors
from ckptstore.codecs.pipeline import default_pipeline as new_default
from ckptstore.store.chunks import row_ranges

REV = os.environ.get("REV", "6f1ee4e")


def load_old(name, path, repl):
    import subprocess

    src = subprocess.run(
        ["git", "show", f"{REV}:{path}"], capture_output=True, text=True, check=True
    ).stdout
    for a, b in repl:
        src = src.replace(a, b)
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    exec(compile(src, name, "exec"), mod.__dict__)
    return mod


orig = reg.register
reg.register = lambda c: c
load_old("oldbg", "ckptstore/codecs/bytegroup.py", [])
load_old("oldzstd", "ckptstore/codecs/zstd.py", [])
oldp = load_old(
    "oldpipe",
    "ckptstore/codecs/pipeline.py",
    [("ckptstore.codecs.bytegroup", "oldbg"), ("ckptstore.codecs.zstd", "oldzstd")],
)
reg.register = orig
REPS = int(os.environ.get("REPS", "5"))
out = {}
for name in sys.argv[1:]:
    state, _ = dataset(name, 500)
    pieces = []
    for _, t in iter_tensors(state):
        if t.numel() == 0:
            continue
        dn = dtype_name(t.dtype)
        view = _host_view(t)
        rows = t.shape[0] if t.dim() else 1
        rb = len(view) // rows
        for a, b in row_ranges(rows, rb, 4 << 20):
            pieces.append((dn, view[a * rb : b * rb]))
    best = {}
    raw = sum(len(p) for _, p in pieces)
    enc_bytes = {"old": 0, "new": 0}
    for rnd in range(REPS):
        for which in ("old", "new"):
            mk = oldp.default_pipeline if which == "old" else new_default
            te = td = ti = 0.0
            for dn, p in pieces:
                pipe = mk(dn)
                t0 = time.perf_counter()
                e = pipe.encode(p)
                t1 = time.perf_counter()
                d = pipe.decode(e)
                t2 = time.perf_counter()
                o = np.empty(len(p), np.uint8)
                t3 = time.perf_counter()
                pipe.decode_into(e, o)
                t4 = time.perf_counter()
                te += t1 - t0
                td += t2 - t1
                ti += t4 - t3
                if rnd == 0:
                    assert memoryview(d).cast("B") == p and memoryview(o) == p
                    enc_bytes[which] += memoryview(e).nbytes
            b = best.setdefault(which, [1e9, 1e9, 1e9])
            best[which] = [min(b[0], te), min(b[1], td), min(b[2], ti)]
    MB = 1 << 20
    row = {
        w: {
            "ratio": raw / enc_bytes[w],
            "encode_mb_s": raw / MB / v[0],
            "decode_mb_s": raw / MB / v[1],
            "decode_into_mb_s": raw / MB / v[2],
        }
        for w, v in best.items()
    }
    out[name] = row
    o_, n_ = row["old"], row["new"]
    parts = [f"{name}: ratio {o_['ratio']:.4f} -> {n_['ratio']:.4f}"]
    for k in ("encode_mb_s", "decode_mb_s", "decode_into_mb_s"):
        parts.append(f"{k[:-5]} {o_[k]:.0f} -> {n_[k]:.0f} ({n_[k] / o_[k]:.2f}x)")
    print("; ".join(parts), flush=True)
out["load"] = os.getloadavg()
if os.environ.get("OUT"):
    json.dump(out, open(os.environ["OUT"], "w"), indent=1)
