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
import stat
import struct
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
from ckptstore.codecs.pipeline import DTYPES
from ckptstore.dcp.bridge import torch_dtype
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

_FOLDER = re.compile(r"checkpoint-(\d+)", re.ASCII)
_TORCH_RECORD = re.compile(r"[^/]+/data/\d+")
_PIECE_DTYPES = "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8".split()
# safetensors code → torch dtype, from the one dtype table; any other dtype (BOOL, F8_*, U16…)
# is stored as its bytes: restore is by bytes anyway
_SAFETENSORS_DTYPES = {DTYPES[n].safetensors: torch_dtype(n) for n in _PIECE_DTYPES}


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


def _not_storable(path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path} is {what}: a checkpoint folder is stored only when it holds nothing but "
        "regular files and folders (nothing was stored, nothing deleted)"
    )


def _walk(folder: Path) -> tuple[list[str], list[str]]:
    """The sub-folders and the files of ``folder``, as sorted relative paths. Raises
    before anything is read: ValueError for a symbolic link (os.walk would skip a linked
    folder and follow a linked file, and the folder is deleted once stored) or anything
    else that is not a regular file or a folder (a FIFO would block the read); OSError for
    a folder that cannot be listed (os.walk would skip it)."""

    def fail(exc: OSError) -> None:
        raise exc

    if folder.is_symlink():
        raise _not_storable(folder, "a symbolic link")
    dirs, rels = [], []
    for root, subdirs, names in os.walk(folder, onerror=fail):
        subdirs.sort()
        rel_root = Path(root).relative_to(folder)
        if rel_root != Path("."):
            dirs.append(rel_root.as_posix())
        for entry in (*subdirs, *names):
            mode = os.lstat(Path(root, entry)).st_mode
            if stat.S_ISLNK(mode):
                raise _not_storable(Path(root, entry), "a symbolic link")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise _not_storable(Path(root, entry), "not a regular file")
        rels += [(rel_root / fname).as_posix() for fname in sorted(names)]
    return dirs, rels


def _pack_folder(folder: Path) -> _Packed:
    """The state dict (and the index entry) that stores ``folder`` exactly."""
    if not _FOLDER.fullmatch(folder.name):
        raise ValueError(
            f"{folder}: only a folder named checkpoint-N is stored (restore_checkpoint "
            "writes a checkpoint back under its own name, which must be checkpoint-N)"
        )
    dirs, rels = _walk(folder)
    if INDEX_KEY in rels:
        raise ValueError(f"{folder}: a file named {INDEX_KEY!r} clashes with ckptstore's index")
    packed = _Packed()
    try:
        for rel in rels:
            _pack_file(packed, folder, rel, set(rels))
    except BaseException:
        packed.close()
        raise
    index = {"format": FORMAT, "folder": folder.name, "dirs": dirs, "files": packed.files}
    packed.state[INDEX_KEY] = json.dumps(index)
    return packed


def _pack_file(packed: _Packed, folder: Path, rel: str, rels: set[str]) -> None:
    """Adds the file's remaining bytes under ``rel`` and its pieces under ``rel:name``."""
    path = folder / rel
    # no link followed, no wait on a FIFO put there since the walk; a regular file or refused
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _not_storable(path, "not a regular file")
        size = st.st_size
        entry: dict[str, Any] = {
            "path": rel,
            "size": size,
            "mode": st.st_mode & 0o777,
            "pieces": [],
        }
        packed.files.append(entry)
        if size == 0:
            entry["sha256"] = hashlib.sha256(b"").hexdigest()
            packed.state[rel] = torch.empty(0, dtype=torch.uint8)
            return
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


def _safe_rel(rel: Any, where: str) -> str:
    """``rel`` when it is a plain path inside the folder: a str of names joined by "/",
    none of them empty, "." or "..", and no NUL (so no absolute path either)."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or "\0" in rel or any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"{where}: refusing the path {rel!r} of the index: not a plain relative path "
            "inside the folder (nothing was written)"
        )
    return rel


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_index(index: Any, ckpt: str, state: Mapping[str, Any], where: str) -> None:
    """Refuse, before anything is written, an index that is not one ``store_folder``
    could have written for checkpoint ``ckpt``: its folder must be ``ckpt`` itself (a
    single ``checkpoint-N`` name), every path plain and relative, every field typed."""
    if not isinstance(index, dict):
        raise ValueError(f"{where}: the index is not a JSON object")
    fmt = index.get("format")
    if not _is_int(fmt) or fmt < 1:
        raise ValueError(f"{where}: index format {fmt!r} is not a format version")
    if fmt > FORMAT:
        raise ValueError(f"{where}: index format {fmt!r} is newer than {FORMAT}")
    folder = index.get("folder")
    if folder != ckpt or not _FOLDER.fullmatch(ckpt):
        raise ValueError(
            f"{where}: the index names the folder {folder!r}; a checkpoint is restored only "
            f"as a folder of its own name, checkpoint-N (nothing was written)"
        )
    dirs, files = index.get("dirs", []), index.get("files")
    if not isinstance(dirs, list) or not isinstance(files, list):
        raise ValueError(f"{where}: the index's dirs and files are not lists")
    for d in dirs:
        _safe_rel(d, where)
    for entry in files:
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: an entry of the index's files is not a JSON object")
        rel = _safe_rel(entry.get("path"), where)
        size, pieces = entry.get("size"), entry.get("pieces")
        if not (
            _is_int(size)
            and size >= 0
            and _is_int(entry.get("mode"))
            and isinstance(entry.get("sha256"), str)
            and isinstance(pieces, list)
            and isinstance(state.get(rel), torch.Tensor)
        ):
            raise ValueError(f"{where}: the index entry of {rel!r} is malformed")
        for piece in pieces:
            if not (
                isinstance(piece, list)
                and len(piece) == 3
                and all(_is_int(v) and v >= 0 for v in piece[:2])
                and isinstance(piece[2], str)
                and isinstance(state.get(piece[2]), torch.Tensor)
            ):
                raise ValueError(f"{where}: the index of {rel!r} has a malformed piece {piece!r}")


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where it cannot be."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _write_folder(
    state: Mapping[str, Any], index: Mapping[str, Any], dest: Path, where: str
) -> None:
    """Write the files of a checked index (:func:`_check_index`) into ``dest``."""
    umask = _umask()
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
        # permission bits only (never setuid, setgid, sticky), less the umask's, as tar
        # extracts for a user who is not root: the modes the Trainer wrote come back as
        # they were (it wrote them under a umask), a stored 0o777 comes back 0o755
        os.chmod(path, entry["mode"] & 0o777 & ~umask)


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
        retention). From this process alone, whether or not torch.distributed is on.

        The folder must be named ``checkpoint-N`` and hold only regular files and folders:
        a symbolic link, a FIFO, a socket or a device raises ValueError naming it before
        anything is stored (and ``on_save`` then leaves the folder where it is)."""
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
    one raises FileExistsError unless ``overwrite``; nothing else under ``out_dir`` is ever
    removed. ``with_best``: when the checkpoint's ``trainer_state.json`` names a best
    checkpoint under ``out_dir`` that is in the store, restore that one too (an existing
    folder of that name is kept unless ``overwrite``), so ``load_best_model_at_end`` keeps
    tracking it. A missing store or step raises StoreNotFoundError /
    CheckpointNotFoundError naming the store.

    The index is checked before anything is written: a checkpoint is written back only as
    ``out_dir/<its name>`` (``checkpoint-N``, which its index must name), every file path
    in it must be relative and plain (no ``..``, no empty part, no NUL), else ValueError.
    File modes come back as permission bits only, less the umask's (no setuid/setgid)."""
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
    if not _FOLDER.fullmatch(ckpt):
        raise ValueError(f"{where}: only a checkpoint named checkpoint-N is restored")
    target = out_dir / ckpt  # the checkpoint's own name: never a name from the store's data
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    state = load_full(url, name=ckpt, storage_options=storage_options, threads=threads)
    raw = state.get(INDEX_KEY)
    try:
        index = json.loads(raw) if isinstance(raw, (str, bytes)) else None
    except ValueError:
        index = None
    _check_index(index, ckpt, state, where)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir / f".{ckpt}.restore-{tag}"
    try:
        tmp.mkdir()
        _write_folder(state, index, tmp, where)
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
) -> None:
    try:
        recorded = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return
    best = recorded.get("best_model_checkpoint") if isinstance(recorded, dict) else None
    if not isinstance(best, str) or "\0" in best:
        return
    name = Path(best).name
    if name == path.name or not _FOLDER.fullmatch(name):
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
    _restore_one(url, store, name, path.parent, overwrite, storage_options, threads)
