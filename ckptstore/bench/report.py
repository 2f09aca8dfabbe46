"""Where figures come from and how they are shown: machine info, table cells, JSON output."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from typing import Any

from ckptstore.knobs import Settings

PAGE_CACHE_NOTE = (
    "loads read files just written, from the page cache (it cannot be dropped without root): "
    "they measure decoding/deserialising, not disk reads"
)


# -- machine ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine(settings: Settings | None = None) -> dict[str, Any]:
    """Where the figures come from: platform, CPUs, RAM, library versions and the
    ckptstore settings of the run (resolved from the environment when not given)."""
    import torch
    import zstandard

    from ckptstore import __version__

    settings = Settings.resolve(settings)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "ram_bytes": ram_bytes(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "zstandard": zstandard.__version__,
        "ckptstore": __version__,
        "ckptstore_threads": settings.threads,
        "chunk_bytes": settings.chunk_bytes,
    }


def knobs(settings: Settings, names: tuple[str, ...]) -> dict[str, Any]:
    """``{"THREADS": 8, …}``: the named settings of a run, keyed like their variables."""
    return {name.upper(): getattr(settings, name.lower()) for name in names}


# -- progress and cells -----------------------------------------------------------------------
def progress(show: bool, msg: str) -> None:
    """A dim progress line on stderr (the CLI's error console) when ``show``."""
    if show:
        from ckptstore.render import err_console

        err_console.print(f"[dim]{msg}[/dim]")


def seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


# -- JSON -------------------------------------------------------------------------------------
def write_json(path: str | os.PathLike[str], result: Mapping[str, Any] | list[Any]) -> None:
    """Write ``result`` to ``path`` (indented, with a final newline)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(result, indent=2, default=str) + "\n")


def print_json(result: Any) -> None:
    """``result`` as JSON on stdout (the CLI's ``--json`` output)."""
    from ckptstore.render import emit_json

    emit_json(result)
