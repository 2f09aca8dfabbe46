"""Byte grouping: put byte 0 of every element together, then byte 1, and so on.

The sign/exponent byte of a float is low-entropy while mantissa bytes are close to random;
grouped, zstd sees each on its own. With ``rotate`` each element is first rotated left by one
bit, so the sign moves to the lowest bit and the top byte holds the whole exponent (bf16,
fp32) — the grouping then isolates the exponent exactly (see the ZipNN paper; figures in
docs/benchmarks.md).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ckptstore.codecs.base import Buffer, Codec, byte_view
from ckptstore.codecs.registry import register
from ckptstore.errors import CodecError

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_local = threading.local()
_DECODE_BLOCK = 256 * 1024
"""Elements interleaved per block (fewer, larger numpy calls beat smaller blocks here;
measured on 4 MiB chunks of MiniLM weights)."""
_ENCODE_BLOCK = 256 * 1024
"""Elements grouped per block: the rotated block and one shifted copy stay in cache while
each plane is cut from them."""


def scratch(nbytes: int, name: str = "buf") -> np.ndarray:
    """This thread's reused scratch buffer ``name`` of at least ``nbytes`` (a fresh large
    allocation costs page faults at ~1 GB/s; see ../shared/FACTS.md)."""
    buf = getattr(_local, name, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        setattr(_local, name, buf)
    return buf[:nbytes]


def group_into(arr: np.ndarray, width: int, rotate: bool, out: np.ndarray) -> None:
    """The byte planes of ``arr`` (uint8, a multiple of ``width`` bytes), each element
    first rotated left by one bit if ``rotate``, written to ``out`` (a C-contiguous uint8
    array of ``arr``'s size): what :meth:`ByteGroup.encode` returns, without its allocation.

    For widths 2, 4 and 8 this works block by block on whole words: the rotation in place in
    a cached block, then each plane cut by a shift and a narrowing cast (SIMD loops in
    numpy, ~3x the strided byte copy of a transpose). Other widths transpose."""
    n = arr.size // width
    planes = out.reshape(width, n)
    kind = _UINT.get(width)
    if kind is None:
        np.copyto(planes, arr.reshape(n, width).T)
        return
    words = arr.view(kind) if arr.ctypes.data % width == 0 else arr.copy().view(kind)
    step = min(n, _ENCODE_BLOCK)
    rot = scratch(step * width, "rot").view(kind)
    tmp = scratch(step * width, "tmp").view(kind)
    one, top = kind(1), kind(width * 8 - 1)
    for j in range(0, n, step):
        k = min(n, j + step)
        x, m = words[j:k], k - j
        if rotate:
            a, b = rot[:m], tmp[:m]
            np.left_shift(x, one, out=a)
            np.right_shift(x, top, out=b)
            np.bitwise_or(a, b, out=a)
            x = a
        np.copyto(planes[0, j:k], x, casting="unsafe")
        for i in range(1, width):
            b = tmp[:m]
            np.right_shift(x, kind(8 * i), out=b)
            np.copyto(planes[i, j:k], b, casting="unsafe")


@register
class ByteGroup(Codec):
    codec_id = "bytegroup"

    def __init__(self, width: int, rotate: bool = False) -> None:
        if width < 1 or width > 16:
            raise ValueError(f"bytegroup width must be 1..16, got {width}")
        if rotate and width not in _UINT:
            raise ValueError(f"bytegroup rotate needs width 2, 4 or 8, got {width}")
        self.width = int(width)
        self.rotate = bool(rotate)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "width": self.width, "rotate": self.rotate}

    def short(self) -> str:
        return f"group{self.width}{'+rot' if self.rotate else ''}"

    def _check(self, arr: np.ndarray) -> None:
        if arr.size % self.width:
            raise ValueError(f"buffer of {arr.size} bytes is not a multiple of width {self.width}")

    def encode(self, data: Buffer) -> Buffer:
        arr = np.frombuffer(data, dtype=np.uint8)
        self._check(arr)
        if self.width == 1 or arr.size == 0:
            return data
        out = np.empty(arr.size, dtype=np.uint8)
        group_into(arr, self.width, self.rotate, out)
        return byte_view(out)

    def max_encoded_size(self, raw_size: int) -> int:
        return raw_size

    def decode_bounded(self, data: Buffer, max_size: int) -> Buffer:
        size = memoryview(data).nbytes
        if size > max_size:
            raise CodecError(f"bytegroup input of {size} bytes exceeds {max_size}")
        return self.decode(data)

    def decode(self, data: Buffer) -> Buffer:
        arr = np.frombuffer(data, dtype=np.uint8)
        self._check(arr)
        if self.width == 1 or arr.size == 0:
            return data
        out = np.empty(arr.size, dtype=np.uint8)
        self.decode_into([arr], out)
        return byte_view(out)

    def decode_into(self, parts: Sequence[Buffer], out: np.ndarray) -> None:
        """Decode the grouped bytes ``parts`` (in order; one buffer per plane is what zstd's
        segments give, and needs no joined copy) straight into ``out``, a writable
        C-contiguous uint8 array of exactly their total size."""
        arrs = [np.frombuffer(p, dtype=np.uint8) for p in parts]
        total = sum(a.size for a in arrs)
        if total != out.size:
            raise CodecError(f"bytegroup input of {total} bytes for an output of {out.size}")
        if total % self.width:
            raise CodecError(f"buffer of {total} bytes is not a multiple of width {self.width}")
        if self.width == 1 or total == 0:
            pos = 0
            for a in arrs:
                out[pos : pos + a.size] = a
                pos += a.size
            return
        n = total // self.width
        if len(arrs) == self.width and all(a.size == n for a in arrs):
            planes: Sequence[np.ndarray] = arrs
        else:
            flat = arrs[0] if len(arrs) == 1 else np.concatenate(arrs)
            planes = flat.reshape(self.width, n)
        ungroup_into(planes, self.width, self.rotate, out)


def ungroup_into(planes: Sequence[np.ndarray], width: int, rotate: bool, out: np.ndarray) -> None:
    """Interleave ``width`` equal uint8 ``planes`` back into the elements they came from,
    rotating each right by one bit if ``rotate``, into ``out`` (C-contiguous uint8 of their
    total size): the inverse of :func:`group_into`.

    Block by block, so each block is still in cache when the next plane and the rotation
    reach it. Widths 2 and 4 build whole words with widening casts, shifts and ors (SIMD
    loops in numpy, ~1.5-2x the strided byte copies that other widths use)."""
    n = out.size // width
    kind = _UINT.get(width)
    words = None if kind is None else out.view(kind)
    grid = out.reshape(n, width)
    step = min(n, _DECODE_BLOCK)
    if words is not None and kind is not None:
        acc = scratch(step * width, "acc").view(kind)
    for j in range(0, n, step):
        k = min(n, j + step)
        if width == 2 and words is not None and kind is not None:
            part, h = words[j:k], acc[: k - j]
            np.copyto(part, planes[0][j:k], casting="unsafe")
            np.copyto(h, planes[1][j:k], casting="unsafe")
            np.left_shift(h, kind(8), out=h)
            np.bitwise_or(part, h, out=part)
        elif width == 4 and words is not None:
            _words4(planes, j, k, words[j:k])
        else:
            for i in range(width):  # one strided copy per plane: ~5x a transpose
                grid[j:k, i] = planes[i][j:k]
        if rotate and words is not None and kind is not None:
            part, h = words[j:k], acc[: k - j]  # rotate right by one bit, in place
            np.left_shift(part, kind(width * 8 - 1), out=h)
            np.right_shift(part, kind(1), out=part)
            np.bitwise_or(part, h, out=part)


def _words4(planes: Sequence[np.ndarray], j: int, k: int, part: np.ndarray) -> None:
    """Elements [j, k) of four planes as little-endian uint32 words into ``part``: two
    uint16 halves (plane 2i | plane 2i+1 << 8), then high << 16 | low."""
    m = k - j
    lo = scratch(2 * m, "lo").view(np.uint16)
    hi = scratch(2 * m, "hi").view(np.uint16)
    tmp = scratch(4 * m, "tmp32").view(np.uint32)
    eight = np.uint16(8)
    np.copyto(lo, planes[2][j:k], casting="unsafe")
    np.copyto(hi, planes[3][j:k], casting="unsafe")
    np.left_shift(hi, eight, out=hi)
    np.bitwise_or(lo, hi, out=lo)
    np.copyto(part, lo, casting="unsafe")
    np.left_shift(part, np.uint32(16), out=part)
    np.copyto(lo, planes[0][j:k], casting="unsafe")
    np.copyto(hi, planes[1][j:k], casting="unsafe")
    np.left_shift(hi, eight, out=hi)
    np.bitwise_or(lo, hi, out=lo)
    np.copyto(tmp, lo, casting="unsafe")
    np.bitwise_or(part, tmp, out=part)
