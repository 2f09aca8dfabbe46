"""A small CPU training job that checkpoints to a bucket with ckptstore and resumes from it.

Run with torchrun (gloo, any number of ranks) or as a single process::

    torchrun --nproc-per-node 2 docker/train_job.py --url s3://ckpt/run-1 --steps 200

Credentials and endpoint come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for MinIO) or ``--endpoint-url``. On start
every rank loads the latest checkpoint of the store if there is one and goes on from its
step; ``--stop-after N`` exits after N steps of this run (a preemption, for the demo and
the tests). Rank 0 prints one JSON line per event and, with ``--report``, writes a summary.

The data is synthetic and seeded by (seed, step, rank), so a run that was stopped and
resumed ends with the same weights, bit for bit, as one that ran straight through.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import ckptstore
from ckptstore.errors import CheckpointNotFoundError, StoreNotFoundError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("CKPT_URL", "s3://ckpt/train-job"))
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: environment)")
    p.add_argument("--steps", type=int, default=200, help="train until this step")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--stop-after", type=int, default=None, help="exit after N steps of this run")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="rank 0 writes a JSON summary here")
    return p.parse_args(argv)


class Model(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(32, width)
        self.hidden = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.inp(x))
        h = self.norm(h + torch.nn.functional.gelu(self.hidden(h)))
        return self.out(h)


def batch(seed: int, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    x = torch.randn(64, 32, generator=g)
    y = x[:, :4].sum(dim=1, keepdim=True).sin()
    return x, y


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def log(rank: int, /, **event: Any) -> None:
    if rank == 0:
        print(json.dumps(event), flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None

    model: torch.nn.Module = Model(args.width)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    # resume: every rank reads the latest checkpoint (its own shards; here, replicas)
    start, resumed_from = 0, None
    msd, osd = get_state_dict(model, opt)  # optimizer state initialized: a full template
    state = {"model": msd, "optim": osd, "step": 0}
    try:
        t0 = time.monotonic()
        info = ckptstore.load(state, args.url, storage_options=options)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = resumed_from = int(state["step"])
        log(
            rank,
            event="resumed",
            step=start,
            checkpoint=info.name,
            seconds=round(time.monotonic() - t0, 3),
        )
    except (StoreNotFoundError, CheckpointNotFoundError):
        log(rank, event="fresh start", url=args.url)

    saves = []
    ran = 0
    step = start
    while step < args.steps:
        if args.stop_after is not None and ran >= args.stop_after:
            log(rank, event="stopped", step=step)
            break
        x, y = batch(args.seed, step, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        ran += 1
        if step % args.save_every == 0 or step == args.steps:
            msd, osd = get_state_dict(model, opt)
            info = ckptstore.save(
                {"model": msd, "optim": osd, "step": step},
                args.url,
                step=step,
                storage_options=options,
            )
            saves.append(step)
            log(
                rank,
                event="saved",
                step=step,
                loss=round(loss.item(), 6),
                seconds=round(info.seconds, 3),
                logical=info.logical_bytes,
                written=info.new_bytes,
                chunks=info.chunks,
                new_chunks=info.new_chunks,
            )
    summary = {
        "rank": rank,
        "world_size": dist.get_world_size() if distributed else 1,
        "resumed_from": resumed_from,
        "final_step": step,
        "saves": saves,
        "digest": digest(model.module if distributed else model),
    }
    log(rank, event="done", **summary)
    if args.report and rank == 0:
        with open(args.report, "w") as f:
            json.dump(summary, f)
    if distributed:
        # every rank is done (the save is committed); the process group is torn down at
        # exit. An explicit destroy_process_group() here hung now and then under gloo in
        # the test suite (a rank stuck in it after the peer had left).
        dist.barrier()
    return summary


if __name__ == "__main__":
    main()
