"""A Lightning ``CheckpointIO`` that keeps every checkpoint a Trainer writes in one ckptstore.

``Trainer(plugins=[CkptStoreIO("s3://bucket/run")])``: each checkpoint Lightning saves (a
``ModelCheckpoint`` top-k file, ``last.ckpt``, ``trainer.save_checkpoint(path)``) becomes the
store checkpoint named after the path's file name, deduplicated against the one saved before
and compressed; ``remove_checkpoint`` deletes it from the store, and loads read it back.

Lightning decides *which* checkpoints exist by looking at files (``ckpt_path="last"``, the
``-v1`` version counter, ``save_last="link"``), so by default a small JSON *pointer* file is
left at each path, naming the store and the checkpoint. See docs/integrations-lightning.md.
"""

from __future__ import annotations

import json
import logging
import os
import string
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch
from fsspec.core import url_to_fs

from ckptstore import (
    Retention,
    SaveOptions,
    Store,
    check_name,
    load_full,
    retain_in_background,
    save,
)
from ckptstore.backend import Backend
from ckptstore.errors import CheckpointNotFoundError, CkptStoreError
from ckptstore.knobs import Settings
from ckptstore.nested import map_leaves, walk

_BASES: list[type] = []
try:  # the unified package: ``import lightning``
    from lightning.fabric.plugins import CheckpointIO as _UnifiedIO

    _BASES.append(_UnifiedIO)
except ImportError:  # pragma: no cover - depends on what is installed
    pass
try:  # the standalone package: ``import pytorch_lightning`` (its Trainer checks this base)
    from lightning_fabric.plugins import CheckpointIO as _StandaloneIO

    _BASES.append(_StandaloneIO)
except ImportError:  # pragma: no cover - depends on what is installed
    pass
if not _BASES:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "ckptstore.integrations.lightning needs Lightning: pip install 'ckptstore[lightning]'"
    )

log = logging.getLogger(__name__)

POINTER_FORMAT = "ckptstore-lightning-pointer"
_POINTER_VERSION = 1
_POINTER_MAX_BYTES = 4096
_META_KEY = "_ckptstore_lightning"
"""Top-level key of the stored dict: (format version, paths of empty mappings). DCP's
flattening keeps no empty dict (a loop's ``state_dict: {}``), and Lightning needs them back."""
_META_VERSION = 1
# the save options a single save may override (trainer.save_checkpoint(storage_options=…)):
# not the store's own (storage_options, settings), nor what the plug-in decides itself
_SAVE_OPTIONS = frozenset(
    set(SaveOptions.names()) - {"storage_options", "settings", "keep_last", "overwrite"}
)
_SAFE = frozenset(string.ascii_letters + string.digits + ".-")
_HEX = frozenset("0123456789abcdef")


# -- file name <-> checkpoint name -------------------------------------------------------------
def checkpoint_name(path: str | os.PathLike[str]) -> str:
    """The store checkpoint name of a Lightning checkpoint path: its file name, escaped.

    Store names allow only ``[A-Za-z0-9._-]``, so ``_`` is written ``__`` and every other
    byte ``_xx`` (two lowercase hex digits): ``epoch=0-step=10.ckpt`` is
    ``epoch_3d0-step_3d10.ckpt``, ``val_loss`` is ``val__loss``. Reversed by
    :func:`file_name`."""
    base = os.path.basename(os.fspath(path).rstrip("/"))
    out = []
    for ch in base:
        if ch in _SAFE:
            out.append(ch)
        elif ch == "_":
            out.append("__")
        else:
            out.extend(f"_{b:02x}" for b in ch.encode("utf-8"))
    name = "".join(out)
    try:
        return check_name(name)
    except ValueError:
        raise ValueError(
            f"checkpoint file name {base!r} (of {os.fspath(path)!r}) cannot name a store "
            f"checkpoint: escaped it is {name!r}, and names must start with a letter or digit "
            "and have at most 200 characters; choose another ModelCheckpoint(filename=...)"
        ) from None


def file_name(name: str) -> str:
    """The file name a store checkpoint name stands for (inverse of :func:`checkpoint_name`);
    ValueError for a name that escaping did not make."""
    raw = bytearray()
    i = 0
    while i < len(name):
        ch = name[i]
        if ch != "_":
            raw += ch.encode()
            i += 1
        elif name[i + 1 : i + 2] == "_":
            raw += b"_"
            i += 2
        elif len(name) >= i + 3 and set(name[i + 1 : i + 3]) <= _HEX:
            raw.append(int(name[i + 1 : i + 3], 16))
            i += 3
        else:
            raise ValueError(f"{name!r} is not an escaped Lightning checkpoint file name")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name!r} is not an escaped Lightning checkpoint file name") from None


# -- pointer files ---------------------------------------------------------------------------
def _url_text(url: str | Backend) -> str:
    if isinstance(url, Backend):
        return url.url
    text = os.fspath(url)
    return text if "://" in text else os.path.abspath(text)


def _write_pointer(path: str, data: dict[str, Any]) -> None:
    """Write the pointer file at ``path``; a local one atomically (temp file + rename), so a
    crash never leaves half a pointer that ``ckpt_path="last"`` could pick."""
    body = (json.dumps(data, sort_keys=True) + "\n").encode()
    fs, fspath = url_to_fs(path)
    parent = os.path.dirname(fspath)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if "file" in _protocols(fs):
        tmp = f"{fspath}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, fspath)
    else:
        fs.pipe_file(fspath, body)


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _own_name(path: str) -> str | None:
    """The checkpoint name of ``path``, which a pointer written there by a save names; None
    for a file name that cannot name one."""
    try:
        return checkpoint_name(path)
    except ValueError:
        return None


def read_pointer(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The pointer at ``path`` (a dict with ``store``, ``name``, ``step``), or None when
    there is no file there or it is not a pointer (a regular Lightning checkpoint file)."""
    fs, fspath = url_to_fs(os.fspath(path))
    try:
        with fs.open(fspath, "rb") as f:
            head = f.read(_POINTER_MAX_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if len(head) > _POINTER_MAX_BYTES or not head.startswith(b"{"):
        return None
    try:
        data = json.loads(head)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("format") != POINTER_FORMAT:
        return None
    if data.get("version") != _POINTER_VERSION:
        raise CkptStoreError(
            f"pointer file {os.fspath(path)!r} has version {data.get('version')!r}; this "
            f"ckptstore reads version {_POINTER_VERSION}: upgrade ckptstore"
        )
    return data


# -- empty mappings --------------------------------------------------------------------------
_KeyPath = tuple[tuple[Any, bool], ...]  # (key or list index, is a list index) per step


def _empty_mappings(obj: Any) -> Iterator[_KeyPath]:
    """Paths of the empty mappings DCP's flattening drops (it stores a tuple whole, so
    none inside a tuple is lost)."""
    for path, value in walk(obj):
        if isinstance(value, Mapping) and not value and path:
            if all(kind != "tuple" for _, kind in path):
                yield tuple((key, kind == "list") for key, kind in path)


def _put_empty(root: dict[Any, Any], path: _KeyPath) -> None:
    """Put the empty mapping at ``path`` back into ``root``. The paths come from the store,
    so they are checked: ValueError for a step that does not fit ``root``. A list index may
    be at most the list's length: the paths are recorded in order, so each one of a saved
    checkpoint adds at most one item to a list (a huge index must not allocate a huge
    list)."""
    if not isinstance(path, tuple) or not path:
        raise ValueError(f"the path {path!r} is not a non-empty tuple of steps")
    steps = []
    for step in path:
        if not (isinstance(step, tuple) and len(step) == 2 and isinstance(step[1], bool)):
            raise ValueError(f"the path {path!r} has a step {step!r} that is not (key, bool)")
        steps.append(step)
    node: Any = root
    for i, (key, is_index) in enumerate(steps):
        last = i == len(steps) - 1
        fresh: Any = {} if last else [] if steps[i + 1][1] else {}
        if is_index:
            if not isinstance(node, list):
                raise ValueError(f"the path {path!r} indexes {type(node).__name__} as a list")
            if type(key) is not int or not 0 <= key <= len(node):
                raise ValueError(
                    f"the path {path!r} has list index {key!r} for a list of {len(node)} items"
                )
            if key == len(node):
                node.append(None)
            if node[key] is None:
                node[key] = fresh
            node = node[key]
        else:
            if not isinstance(node, dict):
                raise ValueError(f"the path {path!r} takes key {key!r} of a {type(node).__name__}")
            node = node.setdefault(key, fresh)


# -- map_location ----------------------------------------------------------------------------
def _relocate(obj: Any, move: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    return map_leaves(obj, lambda x: move(x) if isinstance(x, torch.Tensor) else x)


def _mover(map_location: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``torch.load``'s ``map_location`` for tensors that were all loaded on the CPU."""
    if map_location is None:
        return None
    if isinstance(map_location, Mapping):
        target = map_location.get("cpu")
        return None if target is None else _mover(target)
    if callable(map_location):

        def by_fn(t: torch.Tensor) -> torch.Tensor:
            storage = map_location(t.untyped_storage(), "cpu")
            if storage is None:
                return t
            if isinstance(storage, torch.TypedStorage):
                storage = storage.untyped()
            if storage is t.untyped_storage():
                return t
            out = torch.empty(0, dtype=t.dtype, device=storage.device)
            return out.set_(storage, t.storage_offset(), t.size(), t.stride())

        return by_fn
    device = torch.device(map_location)
    return lambda t: t.to(device)


# -- the plug-in -----------------------------------------------------------------------------
class CkptStoreIO(*_BASES):  # type: ignore[misc]
    """Lightning ``CheckpointIO`` storing checkpoints in the ckptstore store at ``url``.

    ``url``: the store; ``options`` (a :class:`ckptstore.SaveOptions`, or its fields as
    keywords: ``storage_options``, ``settings``, ``quantize``, ``delta``, …) apply to every
    save, as for :func:`ckptstore.save` (a save's own ``storage_options={...}`` in
    ``trainer.save_checkpoint`` may override ``quantize``, ``delta``, ``parent``,
    ``chunk_bytes``, ``inline_bytes``, ``threads``). Saves always replace a checkpoint of the
    same name (as a file would be); ``keep_last`` is refused: Lightning's ``ModelCheckpoint``
    decides which checkpoints stay. ``pointers``: leave a small JSON file at each path
    Lightning saves to, so that its file checks (``ckpt_path="last"``, version counters,
    ``save_last="link"``) see the checkpoint. ``gc``: after a checkpoint is removed, collect
    the chunks nothing references any more on a background thread (older than the store's
    gc grace). ``allow_pickle``: load store values that need full pickle (Lightning's
    ``weights_only`` does not switch it on for store checkpoints; a regular ``.ckpt`` file
    loads as Lightning would load it, ``weights_only`` included). See
    docs/integrations-lightning.md.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | Backend,
        *,
        options: SaveOptions | None = None,
        pointers: bool = True,
        gc: bool = True,
        allow_pickle: bool = False,
        **option_fields: Any,
    ) -> None:
        super().__init__()
        self.url: str | Backend = url if isinstance(url, Backend) else os.fspath(url)
        opts = SaveOptions.build(options, caller="CkptStoreIO", **option_fields)
        if opts.keep_last is not None:
            raise ValueError(
                "CkptStoreIO does not take keep_last: Lightning's ModelCheckpoint decides "
                "which checkpoints stay (save_top_k) and removes the others from the store"
            )
        self.options = opts.replace(overwrite=True)
        self.pointers = pointers
        self.gc = gc
        self.allow_pickle = allow_pickle
        self._start()

    @property
    def storage_options(self) -> dict[str, Any]:
        """The store's fsspec options."""
        return dict(self.options.storage_options or {})

    @property
    def settings(self) -> Settings | None:
        return self.options.settings

    def _start(self) -> None:
        self._lock = threading.Lock()
        self._saving: Counter[str] = Counter()  # names being saved now (AsyncCheckpointIO)
        self._doomed: set[str] = set()  # removed while being saved: deleted after the commit
        self._deleting: dict[str, Future[None]] = {}  # deletions queued or running, by name
        self._janitor: ThreadPoolExecutor | None = None  # runs the deletions, one at a time
        self._errors: list[BaseException] = []  # of deletions, raised by teardown
        self._gc_future: Future[Any] | None = None

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the Trainer's plug-ins
        live = ("_lock", "_saving", "_doomed", "_deleting", "_janitor", "_errors", "_gc_future")
        return {k: v for k, v in self.__dict__.items() if k not in live}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start()

    def __repr__(self) -> str:
        return f"CkptStoreIO({_url_text(self.url)!r})"

    # -- save ----------------------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` as the store checkpoint named after ``path`` (replacing one of
        that name, crash-safely, as a file would be), then write the pointer at ``path``."""
        path = os.fspath(path)
        name = checkpoint_name(path)
        options = self._save_options(storage_options)
        step = checkpoint.get("global_step")
        state = dict(checkpoint)
        state[_META_KEY] = (_META_VERSION, tuple(_empty_mappings(checkpoint)))
        with self._lock:
            pending = self._deleting.get(name)
        if pending is not None:  # a removal of this name asked for earlier goes first
            wait([pending])
        with self._lock:
            self._saving[name] += 1
        doomed = False
        try:
            save(
                state,
                self.url,
                name=name,
                step=step if isinstance(step, int) and step >= 0 else None,
                options=options,
                no_dist=True,  # Lightning saves on global rank 0 only: no collective
            )
        finally:
            with self._lock:
                self._saving[name] -= 1
                if self._saving[name] <= 0:
                    del self._saving[name]
                    doomed = name in self._doomed
                    self._doomed.discard(name)
            if doomed:  # remove_checkpoint ran while this save was in flight: it wins
                self._schedule_delete(name)
        if self.pointers and not doomed:
            _write_pointer(
                path,
                {
                    "format": POINTER_FORMAT,
                    "version": _POINTER_VERSION,
                    "store": _url_text(self.url),
                    "name": name,
                    "step": step,
                },
            )

    def _save_options(self, storage_options: Any | None) -> SaveOptions:
        if storage_options is None:
            return self.options
        if not isinstance(storage_options, Mapping) or set(storage_options) - _SAVE_OPTIONS:
            raise TypeError(
                "CkptStoreIO takes storage_options of trainer.save_checkpoint as a mapping "
                f"with keys among {sorted(_SAVE_OPTIONS)} (ckptstore.save arguments for this "
                f"save), not {storage_options!r}; the store's own fsspec options go to "
                "CkptStoreIO(storage_options=...)"
            )
        return self.options.replace(**storage_options)

    # -- remove --------------------------------------------------------------------------
    def remove_checkpoint(self, path: Any) -> None:
        """Remove the pointer at ``path`` now, and delete its checkpoint from the store on a
        background thread (the gc lock that a deletion takes may be held by a gc for a while;
        training need not wait). A checkpoint an AsyncCheckpointIO is saving right now is
        deleted after its commit. :meth:`teardown` waits for the deletions.

        Only the checkpoint a pointer stands for is deleted: a local symlink at ``path``
        (``save_last="link"``) is only unlinked, and a pointer that names another
        checkpoint than the one ``path``'s file name names (Lightning's copy of the target
        when it cannot make a symlink) is only removed. Both point at a checkpoint that
        Lightning keeps under its own path, and removes through that path."""
        path = os.fspath(path)
        fs, fspath = url_to_fs(path)
        if "file" in _protocols(fs) and os.path.islink(fspath):
            os.unlink(fspath)
            return
        pointer = read_pointer(path)
        if pointer is None:
            name = checkpoint_name(path)
        else:
            fs.rm(fspath)
            name = str(pointer.get("name"))
            if name != _own_name(path):
                log.info(
                    "removed pointer %r, a copy of the pointer of checkpoint %r, which stays",
                    path,
                    name,
                )
                return
            if pointer.get("store") != _url_text(self.url):
                log.warning(
                    "removed pointer %r; its checkpoint %r is in store %r, not in %s: not deleted",
                    path,
                    name,
                    pointer.get("store"),
                    self,
                )
                return
        with self._lock:
            if name in self._saving:
                self._doomed.add(name)
                return
        self._schedule_delete(name)

    def _schedule_delete(self, name: str) -> None:
        with self._lock:
            if self._janitor is None:
                self._janitor = ThreadPoolExecutor(1, thread_name_prefix="ckptstore-remove")
            fut = self._janitor.submit(self._delete, name)
            self._deleting[name] = fut

        def done(f: Future[None]) -> None:
            with self._lock:
                if self._deleting.get(name) is f:
                    del self._deleting[name]
                if f.exception() is not None:
                    self._errors.append(f.exception())  # type: ignore[arg-type]

        fut.add_done_callback(done)

    def _delete(self, name: str) -> None:
        settings = Settings.resolve(self.settings)
        try:
            Store(self.url, self.storage_options, settings=settings).delete(
                name=name, wait=settings.gc_wait
            )
        except CheckpointNotFoundError:
            log.info("checkpoint %r is not in %s: nothing to remove", name, self)
            return
        except BaseException:
            log.exception("removing checkpoint %r from %s failed", name, self)
            raise
        if self.gc:  # one at a time per store; its future is kept for tests and callers
            self._gc_future = retain_in_background(
                self.url,
                Retention(),
                storage_options=self.storage_options,
                settings=settings,
            )

    def teardown(self) -> None:
        """Wait for the queued deletions; raise the first that failed. (Lightning calls it
        at the end of ``fit``; an AsyncCheckpointIO around this plug-in does not pass its
        teardown on, and the deletions then finish before the process exits.)"""
        with self._lock:
            janitor, self._janitor = self._janitor, None
        if janitor is not None:
            janitor.shutdown(wait=True)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    # -- load ----------------------------------------------------------------------------
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path``: the store checkpoint its pointer names, or, with no
        file there, the one named after the file name. Tensors are on the CPU unless
        ``map_location`` says otherwise. A store checkpoint's values load through
        ckptstore's allow-list whatever ``weights_only`` says (Lightning passes False by
        default when it resumes); full pickle only with ``CkptStoreIO(allow_pickle=True)``.

        A regular Lightning checkpoint file at ``path`` (not a pointer) loads exactly as
        Lightning itself would load it: ``torch.load(..., weights_only=weights_only)``,
        which with ``weights_only=False`` (Lightning's default on resume) fully unpickles
        the file. The allow-list does not apply to it; load only files you trust."""
        path = os.fspath(path)
        pointer = read_pointer(path)
        if pointer is not None:
            name = self._check_pointer(path, pointer)
        else:
            fs, fspath = url_to_fs(path)
            if fs.exists(fspath):  # a regular checkpoint file: a run moving to the store
                with fs.open(fspath, "rb") as f:
                    return torch.load(f, map_location=map_location, weights_only=weights_only)
            if "file" in _protocols(fs):  # a dangling save_last="link" symlink: its target
                fspath = os.path.realpath(fspath)
            name = checkpoint_name(fspath)
        try:
            state = load_full(
                self.url,
                name=name,
                storage_options=self.storage_options,
                allow_pickle=self.allow_pickle,
                settings=self.settings,
                mirror=self.options.mirror,  # a node that lost its disk resumes from it
            )
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"no checkpoint {name!r} (for {path!r}) in store {_url_text(self.url)!r}: {exc}"
            ) from exc
        if pointer is not None and pointer.get("step") not in (None, state.get("global_step")):
            raise CkptStoreError(
                f"pointer file {path!r} is for step {pointer['step']} but checkpoint {name!r} "
                f"of store {_url_text(self.url)!r} is now step {state.get('global_step')}: "
                "another run saved a checkpoint of the same file name into this store (use "
                "one store per run)"
            )
        meta = state.pop(_META_KEY, None)
        if meta is not None:
            if isinstance(meta, tuple) and meta and meta[0] != _META_VERSION:
                raise CkptStoreError(
                    f"checkpoint {name!r} of store {_url_text(self.url)!r} was saved by a newer "
                    f"ckptstore Lightning plug-in (version {meta[0]}): upgrade ckptstore"
                )
            try:
                if not (isinstance(meta, tuple) and len(meta) == 2 and isinstance(meta[1], tuple)):
                    raise ValueError(f"it is a {type(meta).__name__}, not (version, paths)")
                for empty in meta[1]:
                    _put_empty(state, empty)
            except ValueError as exc:
                raise CkptStoreError(
                    f"checkpoint {name!r} of store {_url_text(self.url)!r} has a damaged record "
                    f"of its empty mappings (key {_META_KEY!r}): {exc}"
                ) from None
        move = _mover(map_location)
        return state if move is None else _relocate(state, move)

    def _check_pointer(self, path: str, pointer: dict[str, Any]) -> str:
        """The store name of a pointer, which must be of this plug-in's store."""
        if pointer.get("store") != _url_text(self.url):
            raise CkptStoreError(
                f"pointer file {path!r} names checkpoint {pointer.get('name')!r} of store "
                f"{pointer.get('store')!r}, but this CkptStoreIO uses store "
                f"{_url_text(self.url)!r}; load it with CkptStoreIO({pointer.get('store')!r})"
            )
        return str(pointer["name"])

    # -- a new machine -------------------------------------------------------------------
    def restore_pointers(self, dirpath: str | os.PathLike[str], suffix: str = ".ckpt") -> list[str]:
        """Write the pointer of every store checkpoint whose file name ends with ``suffix``
        into ``dirpath`` where none is (oldest first, so file times follow commit order);
        returns the paths written. For resuming with ``ckpt_path="last"`` on a machine
        that has the store but not the pointer files."""
        written = []
        for summary in Store(self.url, self.storage_options, settings=self.settings).list():
            try:
                fname = file_name(summary.name)
            except ValueError:
                continue
            if not fname.endswith(suffix) or "/" in fname:
                continue
            path = os.path.join(os.fspath(dirpath), fname)
            if read_pointer(path) is not None or url_to_fs(path)[0].exists(path):
                continue
            _write_pointer(
                path,
                {
                    "format": POINTER_FORMAT,
                    "version": _POINTER_VERSION,
                    "store": _url_text(self.url),
                    "name": summary.name,
                    "step": summary.step,
                },
            )
            written.append(path)
        return written


__all__ = ["POINTER_FORMAT", "CkptStoreIO", "checkpoint_name", "file_name", "read_pointer"]
