"""The header of a ``.safetensors`` file, written and read: the one place that knows its
layout. ``ckptstore export`` writes it (:func:`encode_header`), the Hugging Face folder
archive reads it to find each tensor's bytes in a file (:func:`decode_header`).

A safetensors file is an 8-byte little-endian length N, N bytes of a UTF-8 JSON object, then
the tensors' bytes. The object maps each tensor name to ``{"dtype": code, "shape": [...],
"data_offsets": [begin, end]}`` (offsets from the end of the header), plus an optional
``"__metadata__"`` object of strings.

Why not the ``safetensors`` package here (it still reads whole files for ``ckptstore
import``): its writer takes every tensor at once, so an export would hold the whole model in
memory, while :func:`encode_header` lets the caller stream one tensor at a time after it; and
its reader does not tell where a tensor's bytes lie in the file, which the archive needs to
cut them out of a file it maps.

:func:`decode_header` trusts nothing in the bytes: the length must fit the file (and
:data:`MAX_HEADER_BYTES`), the JSON must be one object without repeated keys, every dtype a
safetensors code, every shape a list of non-negative ints whose size matches its offsets,
every range inside the file and no two ranges overlapping. Anything else raises
:class:`~ckptstore.errors.CodecError` naming the file. Torch-free.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptstore.codecs.pipeline import DTYPES
from ckptstore.errors import CodecError

__all__ = [
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "SafetensorsHeader",
    "TensorEntry",
    "decode_header",
    "encode_header",
    "read_header",
    "safetensors_code",
]

MAX_HEADER_BYTES = 100 * 2**20
"""The largest header read (the ``safetensors`` package's own limit)."""
METADATA_KEY = "__metadata__"

# safetensors code → bits per element: the codes of the one dtype table (codecs.DTYPES), and
# the codes of dtypes ckptstore does not store, which a file may still hold
_BITS: dict[str, int] = {
    **{d.safetensors: 8 * d.itemsize for d in DTYPES.values() if d.safetensors},
    **{"F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4},
}
_NAMES: dict[str, str] = {d.safetensors: n for n, d in DTYPES.items() if d.safetensors}


def safetensors_code(dtype: str) -> str | None:
    """The safetensors code of ckptstore dtype name ``dtype`` ("bfloat16" → "BF16"); None
    where safetensors has none."""
    d = DTYPES.get(dtype)
    return d.safetensors if d else None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a header, its byte range given as offsets in the whole file."""

    name: str
    code: str
    """Its safetensors dtype code ("F32", "BOOL", …)."""
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def dtype(self) -> str | None:
        """Its ckptstore dtype name ("float32", …); None for a code ckptstore does not
        store (F4, F8_E8M0, …)."""
        return _NAMES.get(self.code)


@dataclass(frozen=True)
class SafetensorsHeader:
    data_start: int
    """Offset in the file of the first byte after the header."""
    tensors: tuple[TensorEntry, ...]
    """In the order of their bytes in the file."""
    metadata: dict[str, str] = field(default_factory=dict)


def encode_header(
    tensors: Iterable[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, int]:
    """The bytes that start a safetensors file of ``tensors`` — ``(name, ckptstore dtype
    name, shape)``, whose bytes the caller writes after these, back to back in this order —
    and the number of those data bytes. The data starts 8-byte aligned (the JSON is padded
    with spaces). ValueError for a dtype safetensors has no code for, a repeated name, the
    name ``__metadata__``, or metadata that is not strings."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata holds strings only")
        header[METADATA_KEY] = dict(metadata)
    offset = 0
    for name, dtype, shape in tensors:
        code = safetensors_code(dtype)
        if code is None:
            raise ValueError(f"safetensors has no dtype for {dtype!r} (tensor {name!r})")
        if name == METADATA_KEY or name in header:
            raise ValueError(f"tensor name {name!r} cannot be written to a safetensors file")
        size = DTYPES[dtype].itemsize
        for dim in shape:
            size *= dim
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)
    return struct.pack("<Q", len(head)) + head, offset


class _RepeatedKey(ValueError):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _RepeatedKey(f"the key {k!r} appears twice in one object")
        out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode_header(buf: Any, size: int, where: str) -> SafetensorsHeader:
    """The header of a safetensors file of ``size`` bytes whose start is in ``buf`` (bytes,
    a memoryview or an mmap holding at least the length and the header; the data is not
    read). ``where`` names the file in errors. Raises CodecError for anything that is not a
    well-formed header of a file of that size (see the module's docstring)."""

    def bad(what: str) -> CodecError:
        return CodecError(f"{where}: not a valid safetensors file: {what}")

    if size < 8 or len(buf) < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > size - 8:
        raise bad(f"header length {n} goes beyond the file's {size} bytes")
    if n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} exceeds {MAX_HEADER_BYTES} bytes")
    if len(buf) < 8 + n:
        raise bad(f"header of {n} bytes, only {len(buf) - 8} given")
    try:
        obj = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"), object_pairs_hook=_no_repeats)
    except _RepeatedKey as exc:
        raise bad(str(exc)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"header is not UTF-8 JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict):
        raise bad(f"header is a JSON {type(obj).__name__}, not an object")
    start = 8 + n
    metadata = obj.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(f"{METADATA_KEY} is not an object of strings")
    entries = []
    for name, meta in obj.items():
        if not isinstance(meta, dict):
            raise bad(f"tensor {name!r}: not a JSON object")
        code, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if code not in _BITS:
            raise bad(f"tensor {name!r}: unknown dtype {code!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise bad(f"tensor {name!r}: data_offsets {offsets!r} are not two ints")
        begin, end = offsets
        if not 0 <= begin <= end <= size - start:
            raise bad(
                f"tensor {name!r}: data_offsets {offsets} outside the data's {size - start} bytes"
            )
        bits = _BITS[code]
        for d in shape:
            bits *= d
        if bits != 8 * (end - begin):
            raise bad(
                f"tensor {name!r}: {code} of shape {shape} is not the {end - begin} bytes of "
                f"its data_offsets"
            )
        entries.append(TensorEntry(name, code, tuple(shape), start + begin, start + end))
    entries.sort(key=lambda e: (e.begin, e.end))
    for prev, e in zip(entries, entries[1:], strict=False):
        if e.begin < prev.end:
            raise bad(f"the bytes of tensors {prev.name!r} and {e.name!r} overlap")
    return SafetensorsHeader(start, tuple(entries), metadata)


def read_header(path: str, fh: Any = None) -> SafetensorsHeader:
    """The header of the safetensors file at ``path`` (or of the open binary file ``fh``,
    ``path`` then only names it), reading the header alone, never the tensors' bytes."""
    if fh is None:
        with open(path, "rb") as f:
            return read_header(path, f)
    fh.seek(0, 2)
    size = fh.tell()
    fh.seek(0)
    head = fh.read(8)
    if len(head) == 8:
        (n,) = struct.unpack("<Q", head)
        if n <= min(size - 8, MAX_HEADER_BYTES):
            head += fh.read(n)
    return decode_header(head, size, str(path))
