"""Output helpers shared by the CLI verbs: byte formatting, rich tables, JSON."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

# without a terminal (pipes, CI logs) rich would wrap tables at 80 columns
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)


def progress(*columns: Any, hide: bool = False) -> Progress:
    """A transient progress bar on stderr, shown only when stderr is a terminal and not
    ``hide`` (``--json``, ``--quiet``). Off a terminal rich would still end its live display
    with a newline: a stray blank line in logs and in captured stderr."""
    from rich.progress import Progress

    return Progress(
        *columns, console=err_console, transient=True, disable=hide or not err_console.is_terminal
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def ratio(logical: int, stored: int) -> str:
    return f"{logical / stored:.3f}×" if stored else "-"


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
