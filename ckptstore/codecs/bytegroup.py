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
_PAIRS = True
_BLOCK = 256 * 1024
"""Bytes decoded per block (fits a core's L2 cache with the planes it reads)."""


def _scratch(nbytes: int) -> np.ndarray:
    """This thread's reused scratch buffer of at least ``nbytes`` (a fresh large allocation
    costs page faults at ~1 GB/s; see ../shared/FACTS.md)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _local.buf = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


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
        if self.rotate:
            u = arr.view(_UINT[self.width])
            bits = self.width * 8
            arr = ((u << 1) | (u >> (bits - 1))).view(np.uint8)
        planes = np.ascontiguousarray(arr.reshape(-1, self.width).T)
        return byte_view(planes)

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
        grid = out.reshape(n, self.width)
        kind = _UINT.get(self.width) if self.rotate else None
        step = max(1, _BLOCK // self.width)
        if n <= step:  # one block (small tensors: the common case by count)
            for i in range(self.width):
                grid[:, i] = planes[i]
            if kind is not None:
                u = out.view(kind)
                high = u << kind(self.width * 8 - 1)
                u >>= kind(1)
                u |= high
            return
        # block by block, so each block is still in cache when the next plane and the
        # rotation reach it (~1.2x one pass per plane over a whole chunk in cold memory)
        words = None if kind is None else out.view(kind)
        high = None if kind is None else _scratch(step * self.width).view(kind)
        pairs = self.width == 2 and words is not None and high is not None and _PAIRS
        for j in range(0, n, step):
            k = min(n, j + step)
            if pairs and words is not None and high is not None:
                # two planes: widening casts, a shift and an or (SIMD loops) beat two
                # strided byte copies (~2x in cache)
                part, h = words[j:k], high[: k - j]
                np.copyto(part, planes[0][j:k], casting="unsafe")
                np.copyto(h, planes[1][j:k], casting="unsafe")
                np.left_shift(h, kind(8), out=h)
                np.bitwise_or(part, h, out=part)
            else:
                for i in range(self.width):  # one strided copy per plane: ~5x a transpose
                    grid[j:k, i] = planes[i][j:k]
            if kind is not None and words is not None and high is not None:
                part, h = words[j:k], high[: k - j]  # rotate right by one bit, in place
                np.left_shift(part, kind(self.width * 8 - 1), out=h)
                np.right_shift(part, kind(1), out=part)
                np.bitwise_or(part, h, out=part)
