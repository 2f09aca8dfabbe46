"""Delta against the parent checkpoint (``save(..., delta=True)``): stored bytes, save and
load time, and load time against chain depth (docs/benchmarks.md, "Delta").

(a) ``finetune``: a full fine-tune of all-MiniLM-L6-v2 (every floating tensor trains, AdamW
    lr 1e-4, synthetic gradients), ``--n`` checkpoints ``--every`` steps apart;
(a') ``finetune-real``: the same with real gradients (``bench.datasets.fine_tune_real_states``:
    an in-batch contrastive loss on synthetic token pairs, through ``transformers``);
(b) ``pretrain``: a 5.3 M-parameter GPT trained from scratch on a bigram-model token stream
    (AdamW lr 6e-4, β2 0.95), ``--pre-n`` checkpoints ``--pre-every`` steps apart, saved as
    fp32 and as bf16 (every floating tensor cast).

Every checkpoint is saved twice, into two stores: without delta and with delta
(``delta_chain`` = ``--chain``, long enough that no chain restarts in the run, so checkpoint
i sits at depth i and (c) the load time of checkpoint i is the load time at depth i). Ratio =
raw tensor bytes / bytes the save wrote (chunks + manifest). Because a delta is always
taken against the direct parent's raw bytes, the size a shorter bound K would give follows
from the same run: every (K+1)-th checkpoint costs its standalone size (the store without
delta), the others their delta size — ``ratio_by_chain`` reports that for several K, and
``ratio_by_chain_long_run`` the same for a run of any length (one mean standalone checkpoint
of the later ones per K mean delta checkpoints). Plain
DCP (FileSystemWriter) is saved for the first and last checkpoint of each series.

    python -m ckptstore.bench delta [--n 20] [--every 20] [--pre-n 6] [--pre-every 100]
                                    [--chain 64] [--exact] [--json docs/results/delta.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ckptstore import load_full, save
from ckptstore.bench.datasets import GPT, fine_tune_real_states, fine_tune_states, gpt_shape
from ckptstore.bench.methods import dcp_save, disk_usage, fresh_dir
from ckptstore.bench.report import machine, write_json
from ckptstore.knobs import Settings
from ckptstore.store import Repository, layout
from ckptstore.store.delta_choice import EXACT_RULES, PROCESS_DELTA_STATE
from ckptstore.store.manifest import Manifest

MB = 1e6


def _group(fqn: str) -> str:
    if "exp_avg_sq" in fqn:
        return "exp_avg_sq"
    if "exp_avg" in fqn:
        return "exp_avg"
    if fqn.startswith("model"):
        return "weights"
    return "other"


def _groups(m: Manifest) -> dict[str, list[int]]:
    """group → [raw bytes, bytes written by the save]."""
    out: dict[str, list[int]] = {}
    for fqn, t in m.tensors.items():
        g = out.setdefault(_group(fqn), [0, 0])
        g[0] += t.logical_bytes
        g[1] += sum(s.blob.new_bytes for s in t.shards)
    return out


def _bf16(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.to(torch.bfloat16) if state.is_floating_point() else state
    if isinstance(state, dict):
        return {k: _bf16(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_bf16(v) for v in state]
    return state


def pretrain_states(
    n: int, every: int, *, seed: int = 0, size_mb: float = 64.0
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(step, ``{"model", "optim"}``) every ``every`` steps of a GPT of ~5.3 M params
    (``size_mb`` = params + AdamW moments in fp32) trained on tokens from a fixed random
    bigram model (learnable, unlike uniform noise), batch 8 × 64 tokens."""
    shape = gpt_shape(size_mb)
    shape["ctx"] = 64
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(**shape)
    vocab = shape["vocab"]
    nxt = torch.randint(0, vocab, (vocab, 4), generator=gen)  # 4 likely successors a token
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    step = 0
    for _ in range(n):
        for _ in range(every):
            tok = torch.empty(8, 65, dtype=torch.long)
            tok[:, 0] = torch.randint(0, vocab, (8,), generator=gen)
            for i in range(1, 65):
                tok[:, i] = nxt[tok[:, i - 1], torch.randint(0, 4, (8,), generator=gen)]
            logits = model(tok[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        yield step, {"model": model.state_dict(), "optim": opt.state_dict()}


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def series(
    label: str,
    states: Iterator[tuple[int, Any]],
    root: str,
    settings: Settings,
    chain: int,
    load_depths: Sequence[int],
    log: Any = print,
) -> dict[str, Any]:
    plain_url = os.path.join(root, f"{label}-plain")
    delta_url = os.path.join(root, f"{label}-delta")
    dsettings = settings.replace(delta_chain=chain)
    PROCESS_DELTA_STATE.bases.clear()
    rows: list[dict[str, Any]] = []
    dcp: list[dict[str, Any]] = []
    last_state = None
    for i, (step, sd) in enumerate(states):
        # the two saves take turns going first, and their CPU time (every thread) is kept
        # beside the wall time: on a shared machine it varies far less
        order = ("plain", "delta") if i % 2 == 0 else ("delta", "plain")
        took: dict[str, tuple[float, float]] = {}
        for which in order:
            cpu = time.process_time()
            if which == "plain":
                wall, _ = _timed(save, sd, plain_url, step=step, settings=settings)
            else:
                wall, _ = _timed(save, sd, delta_url, step=step, settings=dsettings, delta=True)
            took[which] = (wall, time.process_time() - cpu)
        (t_plain, c_plain), (t_delta, c_delta) = took["plain"], took["delta"]
        mp = Repository.open(plain_url).manifest(layout.step_name(step), cached=False)
        md = Repository.open(delta_url).manifest(layout.step_name(step), cached=False)
        row = {
            "checkpoint": i,
            "step": step,
            "raw_bytes": mp.logical_bytes,
            "plain_new_bytes": mp.new_bytes,
            "delta_new_bytes": md.new_bytes,
            "delta_chunk_bytes": md.delta_chunk_bytes,
            "max_chain": md.max_chain,
            "save_s_plain": round(t_plain, 3),
            "save_s_delta": round(t_delta, 3),
            "save_cpu_s_plain": round(c_plain, 3),
            "save_cpu_s_delta": round(c_delta, 3),
            "groups_plain": _groups(mp),
            "groups_delta": _groups(md),
        }
        rows.append(row)
        log(
            f"{label} #{i} step {step}: ratio plain {row['raw_bytes'] / mp.new_bytes:.3f}× "
            f"delta {row['raw_bytes'] / md.new_bytes:.3f}×, save {t_plain:.2f}s / {t_delta:.2f}s"
        )
        last_state = sd
        if i == 0:
            dcp.append(_dcp(sd, os.path.join(root, f"{label}-dcp"), settings, i))
    assert last_state is not None
    dcp.append(_dcp(last_state, os.path.join(root, f"{label}-dcp"), settings, len(rows) - 1))
    del last_state
    loads = []
    for d in load_depths:
        if d >= len(rows):
            continue
        step = rows[d]["step"]
        tp = min(_timed(load_full, plain_url, step=step, settings=settings)[0] for _ in "ab")
        td = min(_timed(load_full, delta_url, step=step, settings=settings)[0] for _ in "ab")
        loads.append({"depth": rows[d]["max_chain"], "checkpoint": d, "load_s_plain": round(tp, 3),
                      "load_s_delta": round(td, 3)})  # fmt: skip
        log(f"{label} load at depth {rows[d]['max_chain']}: plain {tp:.2f}s, delta {td:.2f}s")
    return {"label": label, "checkpoints": rows, "dcp": dcp, "loads": loads,
            "summary": summarize(rows, dcp)}  # fmt: skip


def _dcp(sd: Any, folder: str, settings: Settings, i: int) -> dict[str, Any]:
    fresh_dir(folder)
    t, _ = _timed(dcp_save(False), sd, folder, settings)
    size, files = disk_usage(folder)
    return {"checkpoint": i, "bytes": size, "files": files, "save_s": round(t, 3)}


def summarize(rows: list[dict[str, Any]], dcp: list[dict[str, Any]]) -> dict[str, Any]:
    raw = sum(r["raw_bytes"] for r in rows)
    later = rows[1:] or rows
    raw_later = sum(r["raw_bytes"] for r in later)

    def ratio(key: str, rs: list[dict[str, Any]], n: int) -> float:
        return round(n / sum(r[key] for r in rs), 4)

    groups: dict[str, dict[str, float]] = {}
    for g in rows[0]["groups_plain"]:
        gr = sum(r["groups_plain"][g][0] for r in later)
        groups[g] = {
            "plain": round(gr / max(1, sum(r["groups_plain"][g][1] for r in later)), 4),
            "delta": round(gr / max(1, sum(r["groups_delta"][g][1] for r in later)), 4),
        }
    by_chain, steady = {}, {}
    plain_mean = statistics.mean(r["plain_new_bytes"] for r in later)
    delta_mean = statistics.mean(r["delta_new_bytes"] for r in later)
    for k in (1, 2, 3, 4, 5, 6, 8, 16):
        cost = sum(
            r["plain_new_bytes"] if i % (k + 1) == 0 else r["delta_new_bytes"]
            for i, r in enumerate(rows)
        )
        by_chain[k] = round(raw / cost, 4)
        # a long run: one standalone checkpoint (the later ones' mean) every k + 1
        steady[k] = round(raw_later / len(later) * (k + 1) / (plain_mean + k * delta_mean), 4)
    save_p = statistics.median(r["save_s_plain"] for r in later)
    save_d = statistics.median(r["save_s_delta"] for r in later)
    return {
        "raw_bytes_per_checkpoint": rows[0]["raw_bytes"],
        "dcp_bytes_per_checkpoint": dcp[-1]["bytes"],
        "ratio_plain_all": ratio("plain_new_bytes", rows, raw),
        "ratio_delta_all": ratio("delta_new_bytes", rows, raw),
        "ratio_plain_after_first": ratio("plain_new_bytes", later, raw_later),
        "ratio_delta_after_first": ratio("delta_new_bytes", later, raw_later),
        "vs_dcp_plain": round(
            dcp[-1]["bytes"] * len(rows) / sum(r["plain_new_bytes"] for r in rows), 4
        ),
        "vs_dcp_delta": round(
            dcp[-1]["bytes"] * len(rows) / sum(r["delta_new_bytes"] for r in rows), 4
        ),
        "groups_after_first": groups,
        "ratio_by_chain": by_chain,
        "ratio_by_chain_long_run": steady,
        "save_s_median_plain": round(save_p, 3),
        "save_s_median_delta": round(save_d, 3),
        "save_time_ratio": round(save_d / save_p, 3),
        "save_cpu_ratio": round(
            statistics.median(r["save_cpu_s_delta"] for r in later)
            / statistics.median(r["save_cpu_s_plain"] for r in later),
            3,
        ),
        "dcp_save_s": dcp[-1]["save_s"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ckptstore.bench delta", description=__doc__)
    p.add_argument("--n", type=int, default=20, help="fine-tune checkpoints")
    p.add_argument("--every", type=int, default=20, help="fine-tune steps between them")
    p.add_argument("--pre-n", type=int, default=6, help="pretraining checkpoints")
    p.add_argument("--pre-every", type=int, default=100, help="pretraining steps between them")
    p.add_argument("--chain", type=int, default=64, help="delta_chain of the delta stores")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["finetune", "pretrain", "finetune-real"]
    )
    p.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    p.add_argument(
        "--exact",
        action="store_true",
        help="encode every chunk both ways and keep the smaller (no save-time heuristic)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.exact:
        PROCESS_DELTA_STATE.rules = EXACT_RULES  # never take a delta unseen, nor skip a try
    settings = Settings.resolve()
    depths = sorted({0, 1, 2, 4, 8, 12, 16, args.n - 1})
    result: dict[str, Any] = {"machine": machine(settings), "args": vars(args), "series": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        if "finetune" not in args.skip:
            states = fine_tune_states(args.n, args.every, 0, train_all=True)
            label = "finetune-minilm-fp32" + ("-exact" if args.exact else "")
            result["series"].append(series(label, states, root, settings, args.chain, depths))
        if "finetune-real" not in args.skip:
            import importlib.util

            if importlib.util.find_spec("transformers") is None:  # (the test extra has it)
                print("finetune-real skipped: needs `pip install transformers`")
            else:
                states = fine_tune_real_states(args.n, args.every)
                label = "finetune-minilm-fp32-real-grad" + ("-exact" if args.exact else "")
                result["series"].append(series(label, states, root, settings, args.chain, depths))
        if "pretrain" not in args.skip:
            pre_depths = list(range(args.pre_n))
            for dtype in ("fp32", "bf16"):
                states = pretrain_states(args.pre_n, args.pre_every)
                if dtype == "bf16":
                    states = ((s, _bf16(sd)) for s, sd in states)
                label = f"pretrain-gpt-{dtype}" + ("-exact" if args.exact else "")
                result["series"].append(
                    series(label, states, root, settings, args.chain, pre_depths)
                )
    for s in result["series"]:
        print(s["label"], s["summary"])
    if args.json:
        write_json(args.json, result)
