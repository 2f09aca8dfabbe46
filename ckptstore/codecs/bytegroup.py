"""Byte grouping: put byte 0 of every element together, then byte 1, and so on.

The sign/exponent byte of a float is low-entropy while mantissa bytes are close to random;
grouped, zstd sees each on its own. With ``rotate`` each element is first rotated left by one
bit, so the sign moves to the lowest bit and the top byte holds the whole exponent (bf16,
fp32) — the grouping then isolates the exponent exactly (see the ZipNN paper; figures in
docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ckptstore.codecs.base import Buffer, Codec, byte_view
from ckptstore.codecs.registry import register
from ckptstore.errors import CodecError

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


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
        n = arr.size // self.width
        planes = arr.reshape(self.width, n)
        out = np.empty((n, self.width), dtype=np.uint8)
        for i in range(self.width):  # one strided copy per plane: ~5x numpy's transpose
            out[:, i] = planes[i]
        if self.rotate:  # rotate right by one bit, in place
            u = out.view(_UINT[self.width]).reshape(-1)
            high = u << (self.width * 8 - 1)
            u >>= 1
            u |= high
        return byte_view(out)
