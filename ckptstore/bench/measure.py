"""Measuring the compared methods on one state: each saves and loads it ``repeat`` times,
round-robin, into its own folder; every load is checked bit-exact; the best save and load
are kept. For ckptstore a second save of the same state measures what dedup leaves to write.
"""

from __future__ import annotations

import os
from typing import Any

from ckptstore.bench.datasets import StateDict, first_difference, template
from ckptstore.bench.methods import METHODS, Method, ckptstore_save, disk_usage, fresh_dir, timed
from ckptstore.bench.report import progress
from ckptstore.knobs import Settings


def _round(
    m: Method, state: StateDict, folder: str, res: dict[str, Any], settings: Settings
) -> None:
    """One save + load (+ for ckptstore a second save of the same state) of ``m``."""
    fresh_dir(folder)
    seconds, extra = timed(lambda: m.save(state, folder, settings))
    res["saves"].append(seconds)
    res.update(extra)
    res["stored_bytes"], res["files"] = disk_usage(folder)
    tpl = template(state) if m.in_place else None
    seconds, (got, extra) = timed(lambda t=tpl: m.load(folder, t, settings))
    res["loads"].append(seconds)
    res.update(extra)
    diff = first_difference(state, got)
    if diff and "mismatch" not in res:
        res["mismatch"] = diff
    del got, tpl
    if m.key == "ckptstore":
        again = res.setdefault(
            "resave", {"method": "ckptstore-resave", "label": "ckptstore, same state again"}
        )
        before, _ = disk_usage(folder)
        seconds, info = timed(lambda: ckptstore_save(state, folder, settings, step=1))
        again.setdefault("saves", []).append(seconds)
        again.update(
            new_bytes=info["new_bytes"],
            new_chunks=info["new_chunks"],
            chunks=info["chunks"],
            disk_growth_bytes=disk_usage(folder)[0] - before,
        )


def measure_methods(
    state: StateDict,
    root: str,
    logical: int,
    repeat: int,
    show: bool,
    name: str,
    settings: Settings,
) -> list[dict[str, Any]]:
    """Every method ``repeat`` times under ``root/<method>``, round-robin (so load on the
    machine hits all alike); best save and best load kept. One row per method, in
    :data:`~ckptstore.bench.methods.METHODS` order, the ckptstore re-save after ckptstore's;
    a method that fails has ``error`` and no figures, the others are still measured."""
    runs = {m.key: {"method": m.key, "label": m.label, "saves": [], "loads": []} for m in METHODS}
    for i in range(repeat):
        for m in METHODS:
            res = runs[m.key]
            if "error" in res:
                continue
            progress(
                show, f"{name}: {m.label}" + (f" (run {i + 1}/{repeat})" if repeat > 1 else "")
            )
            try:
                _round(m, state, os.path.join(root, m.key), res, settings)
            except Exception as exc:  # one failing method must not hide the others' figures
                res["error"] = f"{type(exc).__name__}: {exc}"
    out: list[dict[str, Any]] = []
    for m in METHODS:
        res = runs[m.key]
        resave = res.pop("resave", None)
        saves, loads = res.pop("saves"), res.pop("loads")
        res["save_s"] = min(saves) if saves else None
        res["load_s"] = min(loads) if len(loads) == len(saves) and loads else None
        if "error" not in res:
            res["ratio"] = logical / res["stored_bytes"] if res.get("stored_bytes") else None
            res["exact"] = "mismatch" not in res
        out.append(res)
        if resave is not None:
            resaves = resave.pop("saves", [])
            if resaves:
                resave.update(save_s=min(resaves), load_s=None)
                out.append(resave)
    return out
