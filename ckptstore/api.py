"""The friendly functions: thin wrappers over ``torch.distributed.checkpoint`` with our
Writer/Reader, plus ``load_full`` and :class:`Store` for working with a store directly."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ckptstore.backend import Backend
from ckptstore.background import retain_in_background
from ckptstore.dcp.checks import check_state, check_state_dict, store_url
from ckptstore.dcp.reader import LoadInfo, Reader, load_object
from ckptstore.dcp.staging import Snapshot
from ckptstore.dcp.writer import SaveInfo, Writer
from ckptstore.errors import CkptStoreError, MismatchError
from ckptstore.knobs import Settings
from ckptstore.nested import walk
from ckptstore.store.facade import Store
from ckptstore.store.options import Mirror, SaveOptions
from ckptstore.store.repository import Repository
from ckptstore.store.retention import Retention
from ckptstore.store.session import LoadSession
from ckptstore.store.tiers import open_tiered
from ckptstore.tensors import iter_full_tensors

StateDict = dict[str, Any]


def _unwrap(exc: CheckpointException, no_dist: bool = False) -> BaseException:
    """DCP wraps every rank's failure; surface ours as themselves, naming the rank(s)."""
    failures = exc.failures
    if not failures:
        return exc
    ranks = sorted(failures)
    first = failures[ranks[0]][0]
    if len(ranks) == 1 and not _distributed(no_dist):
        return first  # single process: the original exception, whatever its type
    msg = f"failed on rank(s) {ranks}: " + "; ".join(
        f"rank {r}: {type(failures[r][0]).__name__}: {failures[r][0]}" for r in ranks
    )
    err: BaseException = CkptStoreError(msg)
    if isinstance(first, CkptStoreError):
        try:
            err = type(first)(msg)
        except TypeError:
            pass
    # every rank's own exception stays reachable, as DCP's CheckpointException has them
    err.failures = {r: failures[r][0] for r in ranks}  # type: ignore[attr-defined]
    return err


def _distributed(no_dist: bool = False) -> bool:
    """Whether a call is collective: torch.distributed is up and the caller did not say
    ``no_dist=True`` (this process alone, e.g. rank 0 of a job whose ranks hold the same
    state)."""
    return not no_dist and dist.is_available() and dist.is_initialized()


def _run(fn: Callable[[], Any], no_dist: bool = False) -> Any:
    try:
        with warnings.catch_warnings():
            # single-process use is intended, not a misconfiguration: no warning for it
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return fn()
    except CheckpointException as exc:
        err = _unwrap(exc, no_dist)
        if err is exc:
            raise
        if not _distributed(no_dist):
            # one process: its own exception, once (DCP's wrapper repeats it as text)
            raise err from None
        raise err from exc


def _writer(
    state_dict: StateDict,
    url: str | Backend,
    step: int | None,
    name: str | None,
    options: SaveOptions,
) -> Writer:
    """The Writer of a save/async_save call: settings resolved once (the edge), the dict
    keys that were ints recorded, and the state checked before DCP stages anything.
    ``keep_last`` is not the Writer's: the call applies it after the commit."""
    url = store_url(url)  # a TypeError for url=123, before anything else
    check_state_dict(state_dict)
    options = options.replace(keep_last=None, settings=options.resolved_settings())
    writer = Writer(url, step=step, name=name, options=options, int_keys=_int_key_paths(state_dict))
    check_state(state_dict)  # sparse/meta tensors: a clear error before DCP stages anything
    return writer


def save(
    state_dict: StateDict,
    url: str | Backend,
    *,
    step: int | None = None,
    name: str | None = None,
    options: SaveOptions | None = None,
    process_group: Any = None,
    no_dist: bool = False,
    planner: Any = None,
    **option_fields: Any,
) -> SaveInfo:
    """Save ``state_dict`` as checkpoint ``step``/``name`` of the store at ``url``.

    Collective under torch.distributed (every rank calls it with its shards); plain
    single-process use needs no process group. Returns the same :class:`SaveInfo` on every
    rank. Raises CheckpointExistsError ("Checkpoint already exists") rather than overwrite a
    checkpoint, unless ``overwrite=True``: then the new checkpoint replaces the old one at
    its commit — the old one stays loadable until then, a crash at any point leaves one of
    the two complete, and a gc beside it is safe (docs/format.md O1–O5).

    ``options``: a :class:`ckptstore.SaveOptions` (quantize, delta, parent, overwrite,
    keep_last, settings, …; each field documented there and in docs/api.md); its fields may
    also be given as keywords (``save(sd, url, step=3, quantize="int8")``; a keyword wins
    over ``options``). An unknown keyword is a TypeError naming the fields. With
    ``keep_last=N``, rank 0 runs ``gc --keep-last N`` on a background thread after the
    commit (``info.retention`` is its future); it finishes before the interpreter exits.

    ``no_dist=True``: this process saves alone even under torch.distributed — e.g. rank 0
    of a DDP job, whose ranks hold the same state (the trainer plug-ins do this); the other
    ranks do not call. Without it the call is collective over ``process_group``.
    """
    opts = SaveOptions.build(options, caller="save", **option_fields)
    keep_last = opts.keep_last
    retention = None if keep_last is None else Retention(keep_last=keep_last)
    writer = _writer(state_dict, url, step, name, opts)
    _decide_mirror(writer, process_group, no_dist)
    t0 = time.monotonic()
    try:
        _run(
            lambda: dcp.save(
                state_dict,
                storage_writer=writer,
                planner=planner,
                process_group=process_group,
                no_dist=not _distributed(no_dist),
            ),
            no_dist,
        )
    except BaseException:
        writer.abandon_mirror()  # nothing of a save that did not commit goes to the mirror
        raise
    finally:
        writer.release_lease()  # (the commit released it already when all went well)
    info = writer.save_info
    if info is not None:
        info.seconds = time.monotonic() - t0  # the whole call, planning included
    if _distributed(no_dist):  # only the coordinator saw every rank's results: share its figures
        info = _broadcast(info, process_group)
    assert info is not None
    info.mirrored = writer.mirrored  # this rank's own upload
    if retention is not None and writer.is_coordinator:
        info.retention = retain_in_background(
            url, retention, storage_options=opts.storage_options, settings=writer.settings
        )
    _raise_mirror_error(writer)
    return info


def async_save(
    state_dict: StateDict,
    url: str | Backend,
    *,
    step: int | None = None,
    name: str | None = None,
    options: SaveOptions | None = None,
    process_group: Any = None,
    no_dist: bool = False,
    planner: Any = None,
    **option_fields: Any,
) -> Future[SaveInfo]:
    """Like :func:`save`, but returns once the state is staged (copied out of training's
    reach).

    Training may change the tensors as soon as this returns: the checkpoint holds their
    values at the call. Encoding, upload and the commit run on a background thread; the
    returned future gives the :class:`SaveInfo` (or raises the save's error). Staging
    (docs/gpu.md): GPU tensors are copied into a pinned host arena, the call waiting only
    for those device-to-host copies (the arena, this rank's GPU bytes rounded up to 64 MiB,
    is kept for the next async save); with ``Settings(device_snapshot=True)`` they are
    cloned on their device instead (no wait; GPU memory of their size until the future
    completes). Other values get one host copy, as DCP's default stager makes, freed when
    the future completes. Wait for one async save before starting the next
    (``fut.result()``). ``keep_last`` as in :func:`save`: rank 0 starts the gc once the
    commit is done.
    """
    opts = SaveOptions.build(options, caller="async_save", **option_fields)
    keep_last = opts.keep_last
    retention = None if keep_last is None else Retention(keep_last=keep_last)
    writer = _writer(state_dict, url, step, name, opts)
    _decide_mirror(writer, process_group, no_dist)
    t0 = time.monotonic()
    # GPU tensors are staged in pinned memory (or on the device, Settings.device_snapshot);
    # everything else exactly as DCP's default stager does (docs/gpu.md)
    stager = Snapshot(writer.settings)
    try:
        started = _run(
            lambda: dcp.async_save(
                state_dict,
                storage_writer=writer,
                planner=planner,
                process_group=process_group,
                no_dist=not _distributed(no_dist),
                async_stager=stager,
            ),
            no_dist,
        )
    except BaseException:
        stager.done()
        writer.abandon_mirror()
        raise
    upload = getattr(started, "upload_completion", started)  # AsyncSaveResponse or Future
    result: Future[SaveInfo] = Future()

    def finished(done: Future[Any]) -> None:
        stager.done()  # the staged copies are written: their pinned arena serves the next
        try:
            done.result()
            info = writer.save_info
            if info is None:  # not the coordinator: the commit is done; its catalog entry
                repo = writer._repository()  # the catalog entry has the figures
                info = SaveInfo.from_summary(repo.summary(writer.name))
            info.seconds = time.monotonic() - t0
            info.mirrored = writer.mirrored
            if retention is not None and (
                not _distributed(no_dist) or dist.get_rank(process_group) == 0
            ):
                info.retention = retain_in_background(
                    url, retention, storage_options=opts.storage_options, settings=writer.settings
                )
            _raise_mirror_error(writer)
            result.set_result(info)
        except CheckpointException as exc:
            writer.release_lease()
            writer.abandon_mirror()
            result.set_exception(_unwrap(exc, no_dist))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller via the future
            writer.release_lease()
            writer.abandon_mirror()
            result.set_exception(exc)

    upload.add_done_callback(finished)
    return result


def _decide_mirror(writer: Writer, process_group: Any, no_dist: bool) -> None:
    """With a mirror whose uploads are ``max_pending`` behind and ``when_behind="skip"``:
    every rank skips mirroring this save, together (a rank that skipped alone would leave
    the coordinator waiting for its chunks)."""
    mirror = writer.mirror
    if mirror is None or mirror.when_behind != "skip":
        return
    behind = writer.mirror_uploader().full()
    if _distributed(no_dist):
        flags: list[Any] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(flags, behind, group=process_group)
        behind = any(flags)
    writer.mirror_skip = bool(behind)


def _raise_mirror_error(writer: Writer) -> None:
    """``Mirror(on_error="raise")``: an earlier upload's failure, raised after this
    save's commit (which it does not affect)."""
    if writer.mirror is not None and writer.mirror.on_error == "raise":
        err = writer.mirror_uploader().take_error(besides=writer.name)
        if err is not None:
            raise err


def _broadcast(value: Any, process_group: Any) -> Any:
    """``value`` of the group's coordinator (its rank 0), on every rank."""
    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    box = [value]
    dist.broadcast_object_list(box, src=src, group=process_group)
    return box[0]


def _int_key_paths(state_dict: Any) -> list[list[Any]]:
    """Paths to int dict keys (optimizer state is keyed by param index): DCP's flattening
    stores every dict key as str; we record which were ints so load_full restores them."""
    out: list[list[Any]] = []
    for path, _ in walk(state_dict):
        if path and path[-1][1] == "key":
            key = path[-1][0]
            if isinstance(key, int) and not isinstance(key, bool):
                out.append([str(k) if kind == "key" else k for k, kind in path])
    return out


def load(
    state_dict: StateDict,
    url: str | Backend,
    *,
    step: int | None = None,
    name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    process_group: Any = None,
    no_dist: bool = False,
    planner: Any = None,
    allow_pickle: bool = False,
    strict_dtype: bool = False,
    threads: int | None = None,
    settings: Settings | None = None,
    mirror: str | Mirror | None = None,
) -> LoadInfo:
    """Load a checkpoint into ``state_dict`` in place (any sharding; like ``dcp.load``).

    With neither ``step`` nor ``name`` the latest committed checkpoint is loaded. Every
    tensor in ``state_dict`` must be in the checkpoint with the same global shape; a tensor
    of another dtype than the saved one gets the values cast, as ``dcp.load`` does (an fp32
    checkpoint into a bf16 model and back), unless ``strict_dtype=True``, which makes that a
    :class:`~ckptstore.errors.MismatchError`. Non-tensor values load through an allow-list
    (docs/api.md, "Values other than tensors"); ``allow_pickle=True`` unpickles anything.
    ``no_dist=True``: this process loads alone even under torch.distributed.
    ``mirror`` (a URL or :class:`ckptstore.Mirror`): the durable tier of a two-tier job;
    "latest" is then the newest checkpoint committed in either store, and each rank reads
    from ``url`` what is there and the rest from the mirror (copying those chunks to
    ``url`` unless ``Mirror(read_through=False)``; docs/tiers.md).
    Returns what this rank read.
    """
    check_state_dict(state_dict, "load")
    reader = Reader(
        url,
        step=step,
        name=name,
        storage_options=storage_options,
        allow_pickle=allow_pickle,
        strict_dtype=strict_dtype,
        threads=threads,
        settings=Settings.resolve(settings, threads=threads),
        mirror=mirror,
    )
    # the coordinator resolves the checkpoint and reads its manifest once, for every rank:
    # a commit landing now must not make another rank load a different "latest", and no
    # other rank reads store metadata (each gets its records with its load plan)
    _open_everywhere(reader, process_group, no_dist)
    _check_template(state_dict, reader)
    _run(
        lambda: dcp.load(
            state_dict,
            storage_reader=reader,
            planner=planner,
            process_group=process_group,
            no_dist=not _distributed(no_dist),
        ),
        no_dist,
    )
    assert reader.load_info is not None
    return reader.load_info


def _open_everywhere(reader: Reader, process_group: Any, no_dist: bool = False) -> None:
    def open_here() -> tuple[str, Any]:
        try:
            reader.open()
            return "ok", (reader.name, reader.metadata)
        except CkptStoreError as exc:
            return "error", exc

    if _distributed(no_dist):
        coordinator = dist.get_rank(process_group) == 0
        status, value = _broadcast(open_here() if coordinator else None, process_group)
    else:
        status, value = open_here()
    if status == "error":
        raise value
    reader.preset(*value)


def _check_template(state_dict: StateDict, reader: Reader) -> None:
    """Clear errors for keys/shapes that do not match, before DCP plans anything."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _run(reader.read_metadata)
    flat, _ = flatten_state_dict(state_dict)
    ckpt = reader.name or "?"
    missing = sorted(k for k in flat if k not in md.state_dict_metadata)
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5]) + (" …" if len(missing) > 5 else "")
        raise MismatchError(
            f"{len(missing)} key(s) of the state dict are not in checkpoint {ckpt!r}: {shown}"
        )
    for fqn, value in flat.items():
        saved = md.state_dict_metadata[fqn]
        if isinstance(value, torch.Tensor):
            if not isinstance(saved, TensorStorageMetadata):
                raise MismatchError(
                    f"{fqn!r} is a tensor in the state dict but a value (not a tensor) in "
                    f"checkpoint {ckpt!r}"
                )
            if tuple(value.shape) != tuple(saved.size):
                raise MismatchError(
                    f"shape mismatch for {fqn!r}: checkpoint {ckpt!r} holds "
                    f"{list(saved.size)}, the state dict has {list(value.shape)}"
                )
            if reader.strict_dtype and value.dtype != saved.properties.dtype:
                raise MismatchError(
                    f"dtype mismatch for {fqn!r}: checkpoint {ckpt!r} holds "
                    f"{str(saved.properties.dtype).replace('torch.', '')}, the state dict has "
                    f"{str(value.dtype).replace('torch.', '')}"
                )
        elif isinstance(saved, TensorStorageMetadata):  # DCP's own error would be cryptic
            dtype = str(saved.properties.dtype).replace("torch.", "")
            raise MismatchError(
                f"{fqn!r} is a tensor in checkpoint {ckpt!r} ({dtype} {list(saved.size)}) "
                f"but the state dict has a value of type {type(value).__name__}; pass a tensor "
                "of that shape and dtype to load into"
            )


def load_full(
    url: str | Backend,
    *,
    step: int | None = None,
    name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    threads: int | None = None,
    settings: Settings | None = None,
    mirror: str | Mirror | None = None,
) -> StateDict:
    """The saved state as nested dicts/lists of whole CPU tensors and Python values.

    Needs no template and no process group; reads every chunk of the checkpoint.
    ``mirror`` as in :func:`load`.
    """
    url = store_url(url)  # a TypeError for url=123, before anything else
    settings = Settings.resolve(settings, threads=threads)
    tier = Mirror.of(mirror)
    if tier is not None:
        repo = open_tiered(url, tier, storage_options, settings=settings)
    else:
        repo = Repository.open(url, storage_options, settings=settings)
    session = LoadSession(repo, step=step, name=name)
    m, reader = session.manifest, session.reader
    flat: dict[str, Any] = {}
    with ThreadPoolExecutor(settings.threads) as pool:
        flat.update(iter_full_tensors(session, m.tensors, pool))
    for fqn, blob in m.objects.items():
        where = f"{fqn!r} of checkpoint {m.name!r}"
        flat[fqn] = load_object(
            reader.read_rows(blob, 0, blob.rows, where).tobytes(), where, allow_pickle
        )
    return _unflatten(flat, m.planner_data, m.int_keys)


def _unflatten(
    flat: dict[str, Any], mapping: dict[str, list[Any]] | None, int_keys: list[list[Any]]
) -> StateDict:
    """Rebuild nesting from DCP's flatten mapping: a path of str dict keys and int list
    indices; ``int_keys`` marks the str keys that were ints in the saved state dict."""
    if not mapping:
        return flat
    ints = {tuple(p) for p in int_keys}
    # a list index past this cannot come from a real state (every index names a leaf, up to
    # gaps where empty containers were dropped): refused, not allocated (a hostile manifest)
    most = len(flat) + 65536
    root: dict[Any, Any] = {}
    for fqn, value in flat.items():
        raw = list(mapping.get(fqn, [fqn]))
        # (key, is_list_index) per step
        steps = [
            (int(p), False)
            if isinstance(p, str) and tuple(raw[: i + 1]) in ints
            else (p, isinstance(p, int))
            for i, p in enumerate(raw)
        ]
        node: Any = root
        for (key, _), (_, next_is_index) in zip(steps[:-1], steps[1:], strict=True):
            empty: Any = [] if next_is_index else {}
            if isinstance(node, list):
                _check_index(key, most, fqn)
                node.extend([None] * (key + 1 - len(node)))
                if node[key] is None:
                    node[key] = empty
                node = node[key]
            else:
                node = node.setdefault(key, empty)
        key, is_index = steps[-1]
        if is_index:
            _check_index(key, most, fqn)
            node.extend([None] * (key + 1 - len(node)))
        node[key] = value
    return root


def _check_index(key: Any, most: int, fqn: str) -> None:
    if not isinstance(key, int) or not 0 <= key < most:
        raise CkptStoreError(
            f"the manifest's flatten mapping puts {fqn!r} at list index {key!r}, beyond any "
            f"list this checkpoint can hold ({most}): the manifest is damaged"
        )


__all__ = ["LoadInfo", "SaveInfo", "Store", "async_save", "load", "load_full", "save"]
