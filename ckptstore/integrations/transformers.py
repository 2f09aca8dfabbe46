"""Hugging Face ``Trainer`` checkpoints kept in a ckptstore store instead of on disk.

:class:`CkptStoreCallback` moves every ``checkpoint-N/`` folder the Trainer writes into the
store as checkpoint ``checkpoint-N`` (step N) and applies retention there;
:func:`restore_checkpoint` writes such a folder back, byte for byte, for
``trainer.train(resume_from_checkpoint=...)``. See docs/integrations-transformers.md.

How a folder is stored (every tensor's bytes cut out of its file and stored with its dtype,
the rest as raw bytes, plus a JSON index under ``INDEX_KEY``) is
:mod:`ckptstore.integrations.folder_archive`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        "ckptstore.integrations.transformers needs Hugging Face transformers: "
        "pip install 'ckptstore[transformers]'"
    ) from exc

import torch.distributed as dist

from ckptstore import GcReport, Mirror, SaveInfo, SaveOptions, Store, load_full, save
from ckptstore.errors import CheckpointNotFoundError, GcBusyError, StoreNotFoundError
from ckptstore.integrations.folder_archive import (
    FOLDER_NAME,
    INDEX_KEY,
    pack_folder,
    read_index,
    write_folder,
)
from ckptstore.knobs import Settings

__all__ = ["INDEX_KEY", "CkptStoreCallback", "latest_step", "restore_checkpoint"]

log = logging.getLogger(__name__)


# -- the callback --------------------------------------------------------------------------
def _same_path(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


class CkptStoreCallback(TrainerCallback):
    """Moves each ``checkpoint-N/`` folder the Trainer writes into the store at ``url`` as
    checkpoint ``checkpoint-N`` (step N), then deletes the folder.

    Retention happens in the store: after each save, ``keep_last``/``keep_every`` (as
    ``ckptstore gc``) drop older checkpoints, never the latest nor, with ``keep_best``, the
    Trainer's best one (``state.best_global_step``). Set ``save_total_limit=None`` in the
    ``TrainingArguments`` (a ValueError otherwise, unless ``keep_local``): the Trainer's
    own rotation counts folders on disk, which this callback removes.

    With ``load_best_model_at_end`` the best checkpoint's folder stays on disk until a
    better one replaces it, because the Trainer reads it back from there after training;
    it is deleted (it is in the store) once training ends. ``keep_local=True`` leaves
    every folder on disk (the store then holds a copy).

    Only the world's process zero stores; under torch.distributed every rank first waits
    at a barrier until all have written their files (each writes its ``rng_state_<i>``).
    The folder must be on a filesystem that process zero sees.

    ``options`` (a :class:`ckptstore.SaveOptions`, or its fields as keywords:
    ``storage_options``, ``settings``, ``quantize``, ``delta``, …) apply to every save, as
    for ``ckptstore.save``; ``keep_last`` is the callback's retention above (run with
    ``keep_every``/``keep_best``, not by the save). ``overwrite`` defaults to True here: a
    checkpoint of the same step is replaced, as the Trainer overwrites a folder of the same
    name (a resumed run saving a step again). ``gc_grace`` is the grace of the retention gc
    (default: the ``CKPTSTORE_GC_GRACE`` knob). ``last_save``/``last_gc`` hold the last
    :class:`SaveInfo` and :class:`GcReport`.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        options: SaveOptions | None = None,
        keep_every: int | None = None,
        keep_best: bool = True,
        keep_local: bool = False,
        gc_grace: str | float | None = None,
        **option_fields: Any,
    ) -> None:
        if options is None and "overwrite" not in option_fields:
            option_fields["overwrite"] = True
        opts = SaveOptions.build(options, caller="CkptStoreCallback", **option_fields)
        if keep_every is not None and (
            not isinstance(keep_every, int) or isinstance(keep_every, bool) or keep_every < 1
        ):
            raise ValueError(f"keep_every must be a positive int, got {keep_every!r}")
        self.url = os.fspath(url)
        self.options = opts.replace(keep_last=None)
        """What every save gets (retention is the callback's own)."""
        self.keep_last = opts.keep_last
        self.keep_every = keep_every
        self.keep_best = keep_best
        self.keep_local = keep_local
        self.gc_grace = gc_grace
        self.last_save: SaveInfo | None = None
        self.last_gc: GcReport | None = None
        self._best_on_disk: Path | None = None  # a stored folder left for load_best_model

    @property
    def storage_options(self) -> Mapping[str, Any] | None:
        return self.options.storage_options

    @property
    def settings(self) -> Settings | None:
        return self.options.settings

    # -- checks ------------------------------------------------------------------------
    def _check_args(self, args: Any) -> None:
        """Refuse the Trainer options that need the folders on disk after ``on_save``."""
        if self.keep_local:
            return
        if getattr(args, "save_total_limit", None) is not None:
            raise ValueError(
                f"CkptStoreCallback applies retention in the store: set save_total_limit=None "
                f"(it is {args.save_total_limit}) and give CkptStoreCallback(keep_last=...) "
                "instead; the Trainer's rotation only sees folders on disk, which the "
                "callback removes"
            )
        strategy = getattr(args, "hub_strategy", None)
        strategy = getattr(strategy, "value", strategy)
        if getattr(args, "push_to_hub", False) and strategy in ("checkpoint", "all_checkpoints"):
            raise ValueError(
                f"push_to_hub with hub_strategy={strategy!r} uploads each checkpoint folder in "
                "the background, which CkptStoreCallback deletes: use keep_local=True, or "
                "another hub_strategy"
            )

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check_args(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check_args(args)
        best = getattr(state, "best_model_checkpoint", None)
        if (
            state.is_world_process_zero
            and getattr(args, "load_best_model_at_end", False)
            and best is not None
            and os.path.isdir(best)
            and self._in_store(Path(best).name)
        ):
            self._best_on_disk = Path(best)  # a restored best folder: ours to remove later

    # -- saving ------------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank has written its part of the folder
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"CkptStoreCallback: the Trainer saved step {state.global_step} but there is "
                f"no folder {folder} (hyper-parameter search runs are not supported)"
            )
        self.last_save = self.store_folder(folder, state.global_step)
        self.last_gc = self._retain(state)
        if self.keep_local:
            return
        best = (
            state.best_model_checkpoint if getattr(args, "load_best_model_at_end", False) else None
        )
        previous = self._best_on_disk
        self._best_on_disk = folder if _same_path(folder, best) else None
        if self._best_on_disk is None:
            shutil.rmtree(folder)
        if previous is not None and previous != folder:
            if _same_path(previous, best):
                self._best_on_disk = previous  # still the best: the Trainer may load it
            else:
                shutil.rmtree(previous, ignore_errors=True)  # stored when it was saved

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the Trainer has loaded the best model by now (before on_train_end)
        if state.is_world_process_zero and self._best_on_disk is not None and not self.keep_local:
            shutil.rmtree(self._best_on_disk, ignore_errors=True)
        self._best_on_disk = None

    def store_folder(self, folder: str | os.PathLike, step: int) -> SaveInfo:
        """Store one checkpoint folder as ``<folder name>`` at ``step`` (no deletion, no
        retention). From this process alone, whether or not torch.distributed is on.

        The folder must be named ``checkpoint-N`` and hold only regular files and folders:
        a symbolic link, a FIFO, a socket or a device raises ValueError naming it before
        anything is stored (and ``on_save`` then leaves the folder where it is)."""
        folder = Path(folder)
        packed = pack_folder(folder)
        try:
            info = save(
                packed.state,
                self.url,
                step=step,
                name=folder.name,
                options=self.options,
                no_dist=True,  # process zero alone; the other ranks do not call
            )
        finally:
            packed.close()
        log.info(
            "stored %s as %s: %d bytes logical, %d stored, %d new",
            folder,
            info.name,
            info.logical_bytes,
            info.stored_bytes,
            info.new_bytes,
        )
        return info

    def _store(self) -> Store:
        return Store(self.url, self.storage_options, settings=self.settings)

    def _in_store(self, name: str) -> bool:
        try:
            return name in {c.name for c in self._store().list()}
        except StoreNotFoundError:  # no store yet (a missing bucket is an error, raised)
            return False

    def _retain(self, state: Any) -> GcReport | None:
        if self.keep_last is None and self.keep_every is None:
            return None
        store = self._store()
        keep: tuple[str, ...] = ()
        best_step = getattr(state, "best_global_step", None)
        if self.keep_best and best_step is not None:
            best = f"checkpoint-{best_step}"
            if best in {c.name for c in store.list()}:
                keep = (best,)
        try:
            return store.gc(
                keep_last=self.keep_last, keep_every=self.keep_every, keep=keep, grace=self.gc_grace
            )
        except GcBusyError as exc:  # another gc runs: the next save applies the policy
            log.warning("CkptStoreCallback: retention skipped this time: %s", exc)
            return None


# -- restoring -----------------------------------------------------------------------------
def _resolve(store: Store, url: str, step: int | None, name: str | None) -> str:
    try:
        return store.resolve(step=step, name=name)
    except CheckpointNotFoundError as exc:
        steps = sorted({c.step for c in store.list() if c.step is not None})
        what = f"step {step}" if step is not None else f"name {name!r}" if name else "checkpoint"
        raise CheckpointNotFoundError(
            f"store {url} has no {what} to restore (steps in the store: {steps})"
        ) from exc


def latest_step(
    url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> int | None:
    """The step of the store's latest checkpoint; None when there is no store or it is
    empty (a run to start from scratch). A missing bucket or denied access raises
    (BucketNotFoundError, AccessDeniedError): that is no reason to start from scratch."""
    try:
        return Store(os.fspath(url), storage_options).summary().step
    except (StoreNotFoundError, CheckpointNotFoundError):  # not BucketNotFoundError
        return None


def restore_checkpoint(
    url: str | os.PathLike[str],
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    with_best: bool = True,
    threads: int | None = None,
    mirror: str | Mirror | None = None,
) -> Path:
    """Write checkpoint ``step`` (or ``name``; default the latest) of the store at ``url``
    back as ``out_dir/checkpoint-N/``, every file byte for byte as the Trainer wrote it
    (sizes and sha256 checked), and return that path for ``resume_from_checkpoint=``.

    The folder appears only when complete (written beside it, then renamed). An existing
    one raises FileExistsError unless ``overwrite``; nothing else under ``out_dir`` is ever
    removed. ``with_best``: when the checkpoint's ``trainer_state.json`` names a best
    checkpoint under ``out_dir`` that is in the store, restore that one too (an existing
    folder of that name is kept unless ``overwrite``), so ``load_best_model_at_end`` keeps
    tracking it. A missing store or step raises StoreNotFoundError /
    CheckpointNotFoundError naming the store. ``mirror``: the durable tier of a two-tier
    run (docs/tiers.md), read for what ``url`` lacks (a new machine, a lost disk).

    The index is checked before anything is written: a checkpoint is written back only as
    ``out_dir/<its name>`` (``checkpoint-N``, which its index must name), every file path
    in it must be relative and plain (no ``..``, no empty part, no NUL), else ValueError.
    File modes come back as permission bits only, less the umask's (no setuid/setgid)."""
    url = os.fspath(url)
    store = Store(url, storage_options, mirror=mirror)
    ckpt = _resolve(store, url, step, name)
    path = _restore_one(
        url, store, ckpt, Path(out_dir), overwrite, storage_options, threads, mirror
    )
    if with_best:
        _restore_best(url, store, path, overwrite, storage_options, threads, mirror)
    return path


def _restore_one(
    url: str,
    store: Store,
    ckpt: str,
    out_dir: Path,
    overwrite: bool,
    storage_options: Mapping[str, Any] | None,
    threads: int | None,
    mirror: str | Mirror | None = None,
) -> Path:
    where = f"checkpoint {ckpt} of store {url}"
    if INDEX_KEY not in store.inspect(ckpt).objects:
        raise ValueError(
            f"{where} was not written by CkptStoreCallback (no {INDEX_KEY!r} entry); "
            "read it with ckptstore.load_full or ckptstore export"
        )
    if not FOLDER_NAME.fullmatch(ckpt):
        raise ValueError(f"{where}: only a checkpoint named checkpoint-N is restored")
    target = out_dir / ckpt  # the checkpoint's own name: never a name from the store's data
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    state = load_full(
        url, name=ckpt, storage_options=storage_options, threads=threads, mirror=mirror
    )
    index = read_index(state, ckpt, where)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir / f".{ckpt}.restore-{tag}"
    try:
        tmp.mkdir()
        write_folder(state, index, tmp, where)
        _put_in_place(tmp, target, out_dir / f".{ckpt}.replaced-{tag}", overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _put_in_place(tmp: Path, target: Path, aside: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``target``. What is at ``target`` (only with ``overwrite``) is
    moved aside first and removed once ``tmp`` is in its place (put back if that fails):
    a folder with its files, a link or a file alone (never what a link points to)."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    if not overwrite:  # appeared since the check
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    else:
        aside.unlink()


def _restore_best(
    url: str,
    store: Store,
    path: Path,
    overwrite: bool,
    storage_options: Mapping[str, Any] | None,
    threads: int | None,
    mirror: str | Mirror | None = None,
) -> None:
    try:
        recorded = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return
    best = recorded.get("best_model_checkpoint") if isinstance(recorded, dict) else None
    if not isinstance(best, str) or "\0" in best:
        return
    name = Path(best).name
    if name == path.name or not FOLDER_NAME.fullmatch(name):
        return
    if not _same_path(Path(best).parent, path.parent):
        log.warning(
            "restore_checkpoint: the best checkpoint is recorded as %s; restore into %s "
            "for load_best_model_at_end to find it (not restored)",
            best,
            Path(best).parent,
        )
        return
    if os.path.lexists(path.parent / name) and not overwrite:
        return  # already there (the folder it would write, whatever path was recorded)
    if name not in {c.name for c in store.list()}:
        log.warning("restore_checkpoint: the best checkpoint %s is not in %s", best, url)
        return
    _restore_one(url, store, name, path.parent, overwrite, storage_options, threads, mirror)
