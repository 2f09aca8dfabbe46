"""The ways to save and load a state that the benchmarks compare, each a save/load pair.

- ``torch.save``: ``torch.save(state, "state.pt")`` / ``torch.load(..., weights_only=True)``;
- ``dcp``: DCP's ``FileSystemWriter`` / ``FileSystemReader``, one process, no process group;
- ``dcp+zstd``: the same with DCP's experimental ``ZStandard`` extension;
- ``ckptstore``: ``ckptstore.save`` / ``ckptstore.load`` into a store in the folder.

Every save writes into its own local folder and takes the run's :class:`ckptstore.Settings`;
``settings.fsync`` says whether it makes its files durable (torch.save: an fsync of its
file; DCP: ``sync_files``; ckptstore: the ``fsync`` setting). Every load returns the loaded
state and extra figures; the in-place ones fill a template made outside the timing.
"""

from __future__ import annotations

import gc  # the interpreter's collector (the gc suite is ckptstore.bench.gc_suite)
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ckptstore.bench.datasets import StateDict, template
from ckptstore.knobs import Settings

SaveFn = Callable[[StateDict, str, Settings], dict[str, Any]]
LoadFn = Callable[[str, Any, Settings], tuple[Any, dict[str, Any]]]


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    save: SaveFn  # (state, folder, settings) -> extra figures
    load: LoadFn  # (folder, template or None, settings) -> (state, extra figures)
    in_place: bool  # load fills a preallocated template (made outside the timing)


# -- torch.save -------------------------------------------------------------------------------
def torch_save(state: StateDict, folder: str, settings: Settings) -> dict[str, Any]:
    path = os.path.join(folder, "state.pt")
    torch.save(state, path)
    if settings.fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {}


def torch_load(folder: str, _: Any, settings: Settings) -> tuple[Any, dict[str, Any]]:
    path = os.path.join(folder, "state.pt")
    return torch.load(path, map_location="cpu", weights_only=True), {}


# -- DCP --------------------------------------------------------------------------------------
def dcp_save(zstd: bool) -> SaveFn:
    def save(state: StateDict, folder: str, settings: Settings) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        kwargs: dict[str, Any] = {"sync_files": settings.fsync}
        if zstd:
            from torch.distributed.checkpoint._extension import ZStandard

            kwargs["_extensions"] = [ZStandard()]
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, **kwargs), no_dist=True)
        return {}

    return save


def dcp_load(folder: str, template: Any, settings: Settings) -> tuple[Any, dict[str, Any]]:
    import torch.distributed.checkpoint as dcp

    dcp.load(template, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    return template, {}


# -- ckptstore --------------------------------------------------------------------------------
def ckptstore_save(
    state: StateDict, folder: str, settings: Settings, *, step: int = 0
) -> dict[str, Any]:
    from ckptstore import save

    info = save(state, folder, step=step, settings=settings)
    return {
        "logical_bytes": info.logical_bytes,
        "info_stored_bytes": info.stored_bytes,
        "new_bytes": info.new_bytes,
        "chunks": info.chunks,
        "new_chunks": info.new_chunks,
        "manifest_bytes": info.manifest_bytes,
    }


def ckptstore_load(folder: str, template: Any, settings: Settings) -> tuple[Any, dict[str, Any]]:
    from ckptstore import load

    info = load(template, folder, step=0, settings=settings)
    return template, {"bytes_read": info.bytes_read, "objects_read": info.objects_read}


METHODS = (
    Method("torch.save", "torch.save / torch.load", torch_save, torch_load, False),
    Method("dcp", "DCP FileSystemWriter", dcp_save(False), dcp_load, True),
    Method("dcp+zstd", "DCP + ZStandard extension", dcp_save(True), dcp_load, True),
    Method("ckptstore", "ckptstore.save / load", ckptstore_save, ckptstore_load, True),
)


# -- helpers ----------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of ``fn()``, after a garbage collection outside the timing."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def disk_usage(folder: str) -> tuple[int, int]:
    """(sum of file sizes, file count) under ``folder``."""
    total = files = 0
    for root, _, names in os.walk(folder):
        for n in names:
            total += os.lstat(os.path.join(root, n)).st_size
            files += 1
    return total, files


def work_root(url: str | None) -> tuple[str, bool]:
    """(absolute local folder, whether it is a new temporary one) to work in for ``url``:
    a temporary folder when None, else the local path or ``file://`` URL, created."""
    if url is None:
        return tempfile.mkdtemp(prefix="ckptstore-bench-"), True
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if scheme != "file":
            raise ValueError(f"bench works in a local folder, not {url!r}")
        url = rest
    os.makedirs(url, exist_ok=True)
    return os.path.abspath(url), False


def fresh_dir(folder: str) -> None:
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)


def warm_up(root: str, settings: Settings) -> None:
    """Run every method once on a tiny state so imports and first-call setup are not timed
    (never fsync'ed)."""
    state = {"w": torch.ones(64, 64), "n": {"b": torch.zeros(3)}}
    quick = settings.replace(fsync=False)
    for m in METHODS:
        folder = os.path.join(root, ".warm-up", m.key)
        try:
            fresh_dir(folder)
            m.save(state, folder, quick)
            m.load(folder, template(state) if m.in_place else None, quick)
        except Exception:
            pass  # a broken method reports its error when measured
    shutil.rmtree(os.path.join(root, ".warm-up"), ignore_errors=True)
