"""Retention after a save (``ckptstore.save(..., keep_last=N)``, the Lightning plug-in): a gc
on a background thread, at most one per store in this process, finished before exit.

The exit hook that lets those gcs finish is registered when the first one starts, not when
this module is imported. No torch here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from ckptstore.backend import Backend
from ckptstore.errors import GcBusyError
from ckptstore.knobs import Settings
from ckptstore.store.gc_run import GcReport, collect
from ckptstore.store.repository import Repository
from ckptstore.store.retention import Retention

__all__ = ["retain_in_background"]

log = logging.getLogger(__name__)

_background: dict[str, threading.Thread] = {}
_background_lock = threading.Lock()
_hook_registered = False


def _finish_background() -> None:
    """At interpreter exit, let retention gcs finish while thread pools still take work.

    Registered with ``threading._register_atexit``: those hooks run, last registered first,
    before the interpreter joins non-daemon threads — and before concurrent.futures' own
    hook (registered when it was imported, earlier) stops every executor, after which a gc
    could not start a thread pool ("cannot schedule new futures after interpreter
    shutdown")."""
    with _background_lock:
        threads = list(_background.values())
    for t in threads:
        t.join()


def _register_exit_hook() -> None:
    """Once, before the first retention gc starts (called holding ``_background_lock``)."""
    global _hook_registered
    if _hook_registered:
        return
    import concurrent.futures.thread  # noqa: F401 - its hook must be registered before ours

    threading._register_atexit(_finish_background)  # type: ignore[attr-defined]
    _hook_registered = True


def retain_in_background(
    url: str | Backend,
    retention: Retention,
    *,
    storage_options: Mapping[str, Any] | None = None,
    grace: str | float | None = None,
    settings: Settings | None = None,
) -> Future[GcReport | None]:
    """Run a gc with ``retention`` on a background thread and return its future.

    At most one such gc runs per store in this process: while one runs, the future of a
    new request resolves to None at once (the running gc, or the next save's, does the
    work). So does a gc that finds another gc holding the lock. Other errors are logged
    and set on the future; the checkpoint just saved is never affected. The thread is not
    a daemon, and an exit hook lets it finish before thread pools shut down: a script whose
    last call is ``save(..., keep_last=N)`` still applies its retention."""
    out: Future[GcReport | None] = Future()
    key = url.url if isinstance(url, Backend) else str(url)
    with _background_lock:
        running = _background.get(key)
        if running is not None and running.is_alive():
            out.set_result(None)
            return out

        def run() -> None:
            try:
                repo = Repository.open(url, storage_options, settings=settings)
                out.set_result(collect(repo, retention, grace=grace))
            except GcBusyError as exc:
                log.info("retention gc skipped: %s", exc)
                out.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - reported, never raised in training
                log.warning("retention gc of %s failed: %s", url, exc)
                out.set_exception(exc)

        _register_exit_hook()
        thread = threading.Thread(target=run, name="ckptstore-retention", daemon=False)
        _background[key] = thread
        thread.start()
    return out
