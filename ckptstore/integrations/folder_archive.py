"""A checkpoint folder kept as one ckptstore checkpoint, every value a tensor but the index,
and written back byte for byte: the format under the Hugging Face ``Trainer`` callback
(:mod:`ckptstore.integrations.transformers`), which needs nothing of ``transformers`` itself.

- every file's bytes are kept exactly; the tensor data inside ``*.safetensors`` files and
  inside ``torch.save`` archives (``optimizer.pt``, ``pytorch_model.bin``, …) are cut out
  of the file and stored as tensors of their own dtype, so they compress by dtype and an
  unchanged tensor deduplicates against the previous checkpoint;
- what is left of each file (headers, pickles, JSON, ``training_args.bin``, tokenizer
  files) is stored as one uint8 tensor: raw bytes, never unpickled;
- ``INDEX_KEY`` holds a JSON index: each file's path, size, mode, sha256 and the offsets
  of its cut-out pieces. A restore puts the pieces back and checks size and sha256.

:func:`pack_folder` reads a folder into a state dict for ``ckptstore.save``;
:func:`read_index` checks the index of a state dict ``ckptstore.load_full`` returned, and
:func:`write_folder` writes its files into a folder. The folder is named ``checkpoint-N``
(:data:`FOLDER_NAME`) and restored only under that name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import stat
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptstore.codecs.safetensors_header import decode_header
from ckptstore.errors import CodecError
from ckptstore.tensors import torch_dtype

__all__ = [
    "FOLDER_NAME",
    "FORMAT",
    "INDEX_KEY",
    "MIN_PIECE_BYTES",
    "PackedFolder",
    "check_index",
    "pack_folder",
    "read_index",
    "write_folder",
]

log = logging.getLogger(__name__)

INDEX_KEY = "ckptstore.transformers"
"""State key of the JSON index that says how the folder's files are put back together."""
FORMAT = 1
"""Version of that index; a restore refuses a newer one."""
MIN_PIECE_BYTES = 1024
"""Tensor data smaller than this stays in its file's remaining bytes (not worth an entry)."""

FOLDER_NAME = re.compile(r"checkpoint-(\d+)", re.ASCII)
_TORCH_RECORD = re.compile(r"[^/]+/data/\d+")
# the dtypes a piece of a safetensors file is stored as; any other (BOOL, F8_*, U16…) is
# stored as its bytes: restore is by bytes anyway
_PIECE_DTYPES = {
    n: torch_dtype(n)
    for n in "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8".split()
}


# -- packing a folder into a state dict --------------------------------------------------
@dataclass
class PackedFolder:
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


def _safetensors_pieces(
    path: Path, buf: Any, size: int
) -> list[tuple[int, int, str, torch.dtype, list]]:
    """(offset, nbytes, tensor name, dtype, shape) of each tensor's data in a safetensors
    file; [] when the file is not a valid one (it is then stored as plain bytes)."""
    try:
        header = decode_header(buf, size, str(path))
    except CodecError as exc:
        log.debug("%s is stored as plain bytes: %s", path, exc)
        return []
    pieces = []
    for e in header.tensors:
        dtype, shape = _PIECE_DTYPES.get(e.dtype or ""), list(e.shape)
        if dtype is None:
            dtype, shape = torch.uint8, [e.nbytes]
        pieces.append((e.begin, e.nbytes, e.name, dtype, shape))
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
        found = _safetensors_pieces(path, buf, size)
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


def pack_folder(folder: Path) -> PackedFolder:
    """The state dict (and the index entry) that stores ``folder`` exactly."""
    if not FOLDER_NAME.fullmatch(folder.name):
        raise ValueError(
            f"{folder}: only a folder named checkpoint-N is stored (restore_checkpoint "
            "writes a checkpoint back under its own name, which must be checkpoint-N)"
        )
    dirs, rels = _walk(folder)
    if INDEX_KEY in rels:
        raise ValueError(f"{folder}: a file named {INDEX_KEY!r} clashes with ckptstore's index")
    packed = PackedFolder()
    try:
        for rel in rels:
            _pack_file(packed, folder, rel, set(rels))
    except BaseException:
        packed.close()
        raise
    index = {"format": FORMAT, "folder": folder.name, "dirs": dirs, "files": packed.files}
    packed.state[INDEX_KEY] = json.dumps(index)
    return packed


def _pack_file(packed: PackedFolder, folder: Path, rel: str, rels: set[str]) -> None:
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


def check_index(index: Any, ckpt: str, state: Mapping[str, Any], where: str) -> None:
    """Refuse, before anything is written, an index that is not one :func:`pack_folder`
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
    if folder != ckpt or not FOLDER_NAME.fullmatch(ckpt):
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


def read_index(state: Mapping[str, Any], ckpt: str, where: str) -> dict[str, Any]:
    """The index of ``state`` (checkpoint ``ckpt`` as ``load_full`` returned it), checked
    by :func:`check_index`; ValueError naming ``where`` for one that is not."""
    raw = state.get(INDEX_KEY)
    try:
        index = json.loads(raw) if isinstance(raw, (str, bytes)) else None
    except ValueError:
        index = None
    check_index(index, ckpt, state, where)
    return index


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


def write_folder(
    state: Mapping[str, Any], index: Mapping[str, Any], dest: Path, where: str
) -> None:
    """Write the files of a checked index (:func:`check_index`) into ``dest``."""
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
