"""Hugging Face ``Trainer`` checkpoints kept in a ckptstore store instead of on disk.

:class:`CkptStoreCallback` moves every ``checkpoint-N/`` folder the Trainer writes into the
store as checkpoint ``checkpoint-N`` (step N) and applies retention there;
:func:`restore_checkpoint` writes such a folder back, byte for byte, for
``trainer.train(resume_from_checkpoint=...)``. See docs/integrations-transformers.md.

How a folder is stored (one ckptstore checkpoint, every value a tensor but the index):

- every file's bytes are kept exactly; the tensor data inside ``*.safetensors`` files and
  inside ``torch.save`` archives (``optimizer.pt``, ``pytorch_model.bin``, …) are cut out
  of the file and stored as tensors of their own dtype, so they compress by dtype and an
  unchanged tensor deduplicates against the previous checkpoint;
- what is left of each file (headers, pickles, JSON, ``training_args.bin``, tokenizer
  files) is stored as one uint8 tensor: raw bytes, never unpickled;
- ``INDEX_KEY`` holds a JSON index: each file's path, size, mode, sha256 and the offsets
  of its cut-out pieces. A restore puts the pieces back and checks size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import struct
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        "ckptstore.integrations.transformers needs Hugging Face transformers: "
        "pip install 'ckptstore[transformers]'"
    ) from exc

import torch
import torch.distributed as dist

from ckptstore.api import load_full, save
from ckptstore.dcp.writer import SaveInfo
from ckptstore.errors import CheckpointNotFoundError, GcBusyError, StoreNotFoundError
from ckptstore.knobs import Settings
from ckptstore.store.facade import Store
from ckptstore.store.gc import GcReport

__all__ = ["INDEX_KEY", "CkptStoreCallback", "latest_step", "restore_checkpoint"]

log = logging.getLogger(__name__)

INDEX_KEY = "ckptstore.transformers"
"""State key of the JSON index that says how the folder's files are put back together."""
FORMAT = 1
"""Version of that index; a restore refuses a newer one."""
MIN_PIECE_BYTES = 1024
"""Tensor data smaller than this stays in its file's remaining bytes (not worth an entry)."""

_FOLDER = re.compile(r"checkpoint-(\d+)")
_TORCH_RECORD = re.compile(r"[^/]+/data/\d+")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}  # any other dtype (BOOL, F8_*, U16…) is stored as its bytes: restore is by bytes anyway


# -- packing a folder into a state dict --------------------------------------------------
@dataclass
class _Packed:
    state: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    maps: list[mmap.mmap] = field(default_factory=list)

    def close(self) -> None:
        """Drop the tensors, then unmap the files they viewed (the folder can then go)."""
        self.state.clear()
        for mm in self.maps:
            try:
                mm.close()
            except BufferError:  # a view still alive somewhere: the GC unmaps it later
                pass
        self.maps.clear()


def _view(buf: Any, dtype: torch.dtype, offset: int, nbytes: int) -> torch.Tensor:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    t = torch.frombuffer(buf, dtype=dtype, count=nbytes // itemsize, offset=offset)
    return t.clone() if offset % itemsize else t  # keep element access aligned


def _safetensors_pieces(buf: Any, size: int) -> list[tuple[int, int, str, torch.dtype, list]]:
    """(offset, nbytes, tensor name, dtype, shape) of each tensor's data in a safetensors
    file; [] when the file is not one (it is then stored as plain bytes)."""
    if size < 8:
        return []
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > size - 8:
        return []
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except ValueError:
        return []
    if not isinstance(header, dict):
        return []
    start = 8 + n
    pieces = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            shape = [int(d) for d in meta["shape"]]
            dtype_name = str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            return []
        if not 0 <= begin <= end <= size - start:
            return []
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        numel = 1
        for d in shape:
            numel *= d
        if dtype is None or numel * torch.empty(0, dtype=dtype).element_size() != end - begin:
            dtype, shape = torch.uint8, [end - begin]
        pieces.append((start + begin, end - begin, name, dtype, shape))
    return pieces


def _storage_dtypes(path: Path) -> dict[str, tuple[int, torch.dtype]]:
    """Record key → (nbytes, dtype) of a ``torch.save`` archive's storages, so their bytes
    can be stored with their dtype. Keys are given in the order pickling meets storages,
    which is the order a walk of the loaded object meets them. Loaded with
    ``weights_only=True`` and ``mmap=True`` (no code runs, no data is read); {} when that
    fails, and the storages are then stored as bytes."""
    try:
        obj = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - numpy RNG states, custom classes: store bytes
        return {}
    found: dict[int, tuple[int, torch.dtype]] = {}

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            found.setdefault(getattr(st, "_cdata", st.data_ptr()), (st.nbytes(), o.dtype))
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return {str(i): v for i, v in enumerate(found.values())}


def _torch_pieces(path: Path, buf: Any) -> list[tuple[int, int, str, torch.dtype, list]]:
    """(offset, nbytes, record name, dtype, shape) of the storage records of a
    ``torch.save`` zip archive ([] when it is not one). The records are stored
    uncompressed, so their bytes are a plain range of the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError):
        return []
    records = [
        i
        for i in infos
        if _TORCH_RECORD.fullmatch(i.filename)
        and i.compress_type == zipfile.ZIP_STORED
        and i.file_size == i.compress_size
        and i.file_size >= MIN_PIECE_BYTES
    ]
    if not records or not any(i.filename.endswith("/data.pkl") for i in infos):
        return []
    dtypes = _storage_dtypes(path)
    pieces = []
    for info in records:
        head = bytes(buf[info.header_offset : info.header_offset + 30])
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            return []
        name_len, extra_len = struct.unpack_from("<HH", head, 26)
        offset = info.header_offset + 30 + name_len + extra_len
        nbytes, dtype = dtypes.get(info.filename.rsplit("/", 1)[1], (-1, torch.uint8))
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if nbytes != info.file_size or nbytes % itemsize:
            dtype, itemsize = torch.uint8, 1  # the walk did not match this record
        pieces.append((offset, info.file_size, info.filename, dtype, [info.file_size // itemsize]))
    return pieces


def _pieces(path: Path, buf: Any, size: int) -> list[tuple[int, int, str, torch.dtype, list]]:
    if path.suffix == ".safetensors":
        found = _safetensors_pieces(buf, size)
    elif zipfile.is_zipfile(path):
        found = _torch_pieces(path, buf)
    else:
        return []
    found = sorted((p for p in found if p[1] >= MIN_PIECE_BYTES), key=lambda p: p[0])
    end = 0
    for offset, nbytes, *_ in found:
        if offset < end or offset + nbytes > size:
            return []  # overlapping or out of the file: not what we understood, keep bytes
        end = offset + nbytes
    return found


def _pack_folder(folder: Path) -> _Packed:
    """The state dict (and the index entry) that stores ``folder`` exactly."""
    packed = _Packed()
    dirs, rels = [], []
    for root, subdirs, names in os.walk(folder):
        subdirs.sort()
        rel_root = Path(root).relative_to(folder)
        if rel_root != Path("."):
            dirs.append(rel_root.as_posix())
        rels += [(rel_root / fname).as_posix() for fname in sorted(names)]
    if INDEX_KEY in rels:
        raise ValueError(f"{folder}: a file named {INDEX_KEY!r} clashes with ckptstore's index")
    for rel in rels:
        _pack_file(packed, folder, rel, set(rels))
    index = {"format": FORMAT, "folder": folder.name, "dirs": dirs, "files": packed.files}
    packed.state[INDEX_KEY] = json.dumps(index)
    return packed


def _pack_file(packed: _Packed, folder: Path, rel: str, rels: set[str]) -> None:
    """Adds the file's remaining bytes under ``rel`` and its pieces under ``rel:name``."""
    path = folder / rel
    st = path.stat()
    size = st.st_size
    entry: dict[str, Any] = {"path": rel, "size": size, "mode": st.st_mode & 0o777, "pieces": []}
    packed.files.append(entry)
    if size == 0:
        entry["sha256"] = hashlib.sha256(b"").hexdigest()
        packed.state[rel] = torch.empty(0, dtype=torch.uint8)
        return
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for frombuffer
    packed.maps.append(buf)
    entry["sha256"] = hashlib.sha256(buf).hexdigest()
    rest: list[tuple[int, int]] = []  # ranges of the file outside the pieces
    pos = 0
    for offset, nbytes, name, dtype, shape in _pieces(path, buf, size):
        key = f"{rel}:{name}"
        if key in rels:  # a file has that name: the piece stays in the remaining bytes
            continue
        packed.state[key] = _view(buf, dtype, offset, nbytes).view(shape)
        entry["pieces"].append([offset, nbytes, key])
        rest.append((pos, offset))
        pos = offset + nbytes
    rest.append((pos, size))
    if len(rest) == 1:  # nothing cut out: the file's bytes as they are
        packed.state[rel] = _view(buf, torch.uint8, 0, size)
        return
    left = bytearray().join(buf[a:b] for a, b in rest)
    packed.state[rel] = (
        torch.frombuffer(left, dtype=torch.uint8) if left else torch.empty(0, dtype=torch.uint8)
    )


# -- writing a folder back -----------------------------------------------------------------
def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _safe_rel(rel: str, where: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts):
        raise ValueError(f"{where}: refusing the path {rel!r}, which leaves the folder")
    return rel


def _write_folder(
    state: Mapping[str, Any], index: Mapping[str, Any], dest: Path, where: str
) -> None:
    for d in index.get("dirs", []):
        (dest / _safe_rel(d, where)).mkdir(parents=True, exist_ok=True)
    for entry in index["files"]:
        rel = _safe_rel(entry["path"], where)
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        size, digest = _write_file(path, state, entry, where)
        if size != entry["size"] or digest != entry["sha256"]:
            raise ValueError(
                f"{where}: {rel} came back as {size} bytes with sha256 {digest}, not the "
                f"{entry['size']} bytes with sha256 {entry['sha256']} that were stored"
            )
        os.chmod(path, entry["mode"])


def _write_file(
    path: Path, state: Mapping[str, Any], entry: Mapping[str, Any], where: str
) -> tuple[int, str]:
    """Interleave the file's remaining bytes with its pieces at their offsets; returns the
    size and sha256 of what was written."""
    rest = _bytes(state[entry["path"]])
    digest = hashlib.sha256()
    used = written = 0
    with open(path, "wb") as f:
        for offset, nbytes, key in [*entry["pieces"], [None, None, None]]:
            gap = len(rest) - used if offset is None else offset - written
            if gap < 0 or used + gap > len(rest):
                raise ValueError(f"{where}: the index of {entry['path']} does not fit its bytes")
            parts = [rest[used : used + gap]]
            used += gap
            if key is not None:
                data = _bytes(state[key])
                if len(data) != nbytes:
                    raise ValueError(
                        f"{where}: {key} has {len(data)} bytes, the index says {nbytes}"
                    )
                parts.append(data)
            for part in parts:
                f.write(part)
                digest.update(part)
                written += len(part)
    return written, digest.hexdigest()


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

    ``overwrite=True`` (default) replaces a checkpoint of the same step, as the Trainer
    overwrites a folder of the same name (a resumed run saving a step again).
    ``settings``/``delta``/``storage_options`` are ckptstore's, as for ``ckptstore.save``;
    ``gc_grace`` is the grace of the retention gc (default: the ``CKPTSTORE_GC_GRACE``
    knob). ``last_save``/``last_gc`` hold the last :class:`SaveInfo` and :class:`GcReport`.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: bool = True,
        keep_local: bool = False,
        overwrite: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        settings: Settings | None = None,
        delta: bool | Mapping[str, bool | None] | None = None,
        gc_grace: str | float | None = None,
    ) -> None:
        for label, v in (("keep_last", keep_last), ("keep_every", keep_every)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        self.url = os.fspath(url)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.keep_best = keep_best
        self.keep_local = keep_local
        self.overwrite = overwrite
        self.storage_options = storage_options
        self.settings = settings
        self.delta = delta
        self.gc_grace = gc_grace
        self.last_save: SaveInfo | None = None
        self.last_gc: GcReport | None = None
        self._best_on_disk: Path | None = None  # a stored folder left for load_best_model

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
        retention). From this process alone, whether or not torch.distributed is on."""
        folder = Path(folder)
        packed = _pack_folder(folder)
        try:
            info = save(
                packed.state,
                self.url,
                step=step,
                name=folder.name,
                storage_options=self.storage_options,
                no_dist=True,  # process zero alone; the other ranks do not call
                overwrite=self.overwrite,
                settings=self.settings,
                delta=self.delta,
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
) -> Path:
    """Write checkpoint ``step`` (or ``name``; default the latest) of the store at ``url``
    back as ``out_dir/checkpoint-N/``, every file byte for byte as the Trainer wrote it
    (sizes and sha256 checked), and return that path for ``resume_from_checkpoint=``.

    The folder appears only when complete (written beside it, then renamed). An existing
    one raises FileExistsError unless ``overwrite``. ``with_best``: when the checkpoint's
    ``trainer_state.json`` names a best checkpoint under ``out_dir`` that is in the store,
    restore that one too, so ``load_best_model_at_end`` keeps tracking it. A missing store
    or step raises StoreNotFoundError / CheckpointNotFoundError naming the store."""
    url = os.fspath(url)
    store = Store(url, storage_options)
    ckpt = _resolve(store, url, step, name)
    path = _restore_one(url, store, ckpt, Path(out_dir), overwrite, storage_options, threads)
    if with_best:
        _restore_best(url, store, path, overwrite, storage_options, threads)
    return path


def _restore_one(
    url: str,
    store: Store,
    ckpt: str,
    out_dir: Path,
    overwrite: bool,
    storage_options: Mapping[str, Any] | None,
    threads: int | None,
) -> Path:
    where = f"checkpoint {ckpt} of store {url}"
    if INDEX_KEY not in store.inspect(ckpt).objects:
        raise ValueError(
            f"{where} was not written by CkptStoreCallback (no {INDEX_KEY!r} entry); "
            "read it with ckptstore.load_full or ckptstore export"
        )
    state = load_full(url, name=ckpt, storage_options=storage_options, threads=threads)
    index = json.loads(state[INDEX_KEY])
    if not isinstance(index, dict) or int(index.get("format", 0)) > FORMAT:
        raise ValueError(f"{where}: index format {index.get('format')!r} is newer than {FORMAT}")
    folder = _safe_rel(index["folder"], where)
    target = out_dir / folder
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{folder}.restore-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_folder(state, index, tmp, where)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _restore_best(
    url: str,
    store: Store,
    path: Path,
    overwrite: bool,
    storage_options: Mapping[str, Any] | None,
    threads: int | None,
) -> None:
    try:
        best = json.loads((path / "trainer_state.json").read_text()).get("best_model_checkpoint")
    except (OSError, ValueError):
        return
    if not best or Path(best).name == path.name or not _FOLDER.fullmatch(Path(best).name):
        return
    if not _same_path(Path(best).parent, path.parent):
        log.warning(
            "restore_checkpoint: the best checkpoint is recorded as %s; restore into %s "
            "for load_best_model_at_end to find it (not restored)",
            best,
            Path(best).parent,
        )
        return
    if Path(best).exists() and not overwrite:
        return  # already there
    names = {c.name for c in store.list()}
    if Path(best).name not in names:
        log.warning("restore_checkpoint: the best checkpoint %s is not in %s", best, url)
        return
    _restore_one(url, store, Path(best).name, path.parent, True, storage_options, threads)
