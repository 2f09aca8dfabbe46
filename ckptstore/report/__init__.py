"""``ckptstore report URL --output report.html``: one self-contained HTML page picturing a store.
Needs the ``report`` extra (plotly); nothing below the CLI imports it.

- :mod:`ckptstore.report.data` collects the figures (torch-free: the catalog, manifests,
  and chunks decoded with numpy for the change heat map);
- :mod:`ckptstore.report.page` draws them with plotly into one HTML file, plotly.js inlined.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ckptstore import Store
from ckptstore.report.data import Progress, ReportData, collect

__all__ = ["ReportData", "collect", "render_html", "require_plotly", "write_report"]

PLOTLY_MISSING = "the report page needs plotly: pip install 'ckptstore[report]'"


def require_plotly() -> None:
    """Raise ImportError with the install hint when plotly is missing."""
    try:
        import plotly  # noqa: F401
    except ImportError as exc:
        raise ImportError(PLOTLY_MISSING) from exc


def render_html(data: ReportData) -> str:
    """The page of collected ``data`` as one HTML string."""
    require_plotly()
    from ckptstore.report.page import render

    return render(data)


def write_report(
    url: str | Store,
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    max_checkpoints: int = 50,
    max_tensors: int = 50,
    changes: bool = True,
    threads: int | None = None,
    progress: Progress | None = None,
) -> ReportData:
    """Write the report page of the store at ``url`` (a URL or a :class:`ckptstore.Store`)
    to ``path``; returns what it shows.

    ``max_checkpoints``: the latest checkpoints whose manifests are read (quantization
    error, change heat map); sizes cover every checkpoint. ``max_tensors``: rows of the
    heat map and bars of the quantization figure (the largest tensors). ``changes=False``
    skips the heat map (nothing is decoded). ``progress(done, total)`` follows the bytes
    compared. Memory: a few chunks per thread (see :mod:`ckptstore.report.data`).
    """
    require_plotly()  # before any work
    target = Path(path)
    if not target.parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {target.parent} does not exist")
    data = collect(
        url,
        storage_options=storage_options,
        max_checkpoints=max_checkpoints,
        max_tensors=max_tensors,
        changes=changes,
        threads=threads,
        progress=progress,
    )
    page = render_html(data)
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)  # a reader never sees half a page
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return data
