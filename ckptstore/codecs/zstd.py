"""zstd over equal segments of the input, each its own frame (or stored raw if zstd does not
shrink it).

After byte grouping, segment i is byte plane i: a frame per plane gives each plane its own
Huffman tables, and incompressible mantissa planes are copied instead of framed. In
``entropy`` mode zstd is tuned to stop hunting matches and act as a fast entropy coder of
literals — on float weights that reaches the order-0 bound at 1–1.5 GB/s a core
(docs/benchmarks.md).

Encoded layout (little-endian)::

    u8  segment count n
    n × (u8 kind: 0 raw, 1 zstd frame; u64 stored length)
    n payloads, in order
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import zstandard

from ckptstore.codecs.base import Buffer, Codec, byte_view
from ckptstore.codecs.registry import register
from ckptstore.errors import CodecError

_RAW, _ZSTD = 0, 1
_ENTRY = struct.Struct("<BQ")
_ENTROPY_PARAMS = {
    "min_match": 7,
    "strategy": 1,
    "search_log": 1,
    "hash_log": 6,
    "window_log": 17,
    "target_length": 0,
}
_local = threading.local()
_INTO_MIN = 64 * 1024
"""Frames at least this large decode into the caller's buffer (:meth:`Zstd.decode_segments`)."""


def _compressor(level: int, entropy: bool) -> zstandard.ZstdCompressor:
    """zstandard contexts are not thread-safe: one per thread and setting."""
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    key = (level, entropy)
    comp = cache.get(key)
    if comp is None:
        if entropy:
            params = zstandard.ZstdCompressionParameters(**_ENTROPY_PARAMS)
            comp = zstandard.ZstdCompressor(compression_params=params)
        else:
            comp = zstandard.ZstdCompressor(level=level)
        cache[key] = comp
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


@register
class Zstd(Codec):
    codec_id = "zstd"
    SEGMENT_ENTRY = _ENTRY.size
    """Header bytes a container spends per segment."""

    def __init__(self, level: int = 1, segments: int = 1, entropy: bool = False) -> None:
        if not 1 <= segments <= 255:
            raise ValueError(f"zstd segments must be 1..255, got {segments}")
        self.level = int(level)
        self.segments = int(segments)
        self.entropy = bool(entropy)

    def get_config(self) -> dict[str, Any]:
        return {
            "id": self.codec_id,
            "level": self.level,
            "segments": self.segments,
            "entropy": self.entropy,
        }

    def short(self) -> str:
        return "zstd-entropy" if self.entropy else f"zstd{self.level}"

    def encode(self, data: Buffer) -> Buffer:
        return b"".join(self.encode_parts(data))

    def encode_parts(self, data: Buffer) -> list[Buffer]:
        """:meth:`encode`'s container as the pieces that, joined, make it (header, then the
        stored segments; raw ones are views of ``data``): a caller that frames the result
        joins once instead of twice."""
        view = byte_view(data)
        n = self.segments if len(view) % self.segments == 0 else 1
        seg = len(view) // n
        pieces = [view[i * seg : (i + 1) * seg] for i in range(n)]
        return self.container_parts([self.encode_segment(p) for p in pieces])

    def encode_segments(self, pieces: list[Buffer]) -> bytes:
        """The container of ``pieces`` as segments of any lengths (at most 255), each its own
        frame or raw copy: what :meth:`encode` writes for equal ones, and what
        :meth:`decode_segments` reads back piece for piece."""
        return self.join_segments([self.encode_segment(p) for p in pieces])

    def encode_segment(self, piece: Buffer) -> tuple[int, Buffer]:
        """One segment of a container: (kind, stored bytes), a zstd frame when that is
        smaller than ``piece``, else ``piece`` itself (its stored size is ``len`` of the
        second item: what a caller choosing between encodings compares)."""
        view = byte_view(piece)
        framed = _compressor(self.level, self.entropy).compress(view) if len(view) else b""
        if 0 < len(framed) < len(view):
            return _ZSTD, framed
        return _RAW, view

    @staticmethod
    def container_parts(segments: list[tuple[int, Buffer]]) -> list[Buffer]:
        """The container of segments made by :meth:`encode_segment` as pieces to join:
        its header, then each segment's stored bytes."""
        if len(segments) > 255:
            raise ValueError(f"zstd container of {len(segments)} segments (at most 255)")
        header = bytearray([len(segments)])
        for kind, stored in segments:
            header += _ENTRY.pack(kind, byte_view(stored).nbytes)
        return [bytes(header), *(stored for _, stored in segments)]

    @staticmethod
    def join_segments(segments: list[tuple[int, Buffer]], prefix: bytes = b"") -> bytes:
        """The container of segments made by :meth:`encode_segment`, in order (after
        ``prefix``, which saves the caller a copy)."""
        return b"".join([prefix, *Zstd.container_parts(segments)])

    def max_encoded_size(self, raw_size: int) -> int:
        # header + per segment the larger of a raw copy and a zstd frame (compressBound)
        return 1 + 255 * _ENTRY.size + raw_size + (raw_size >> 7) + 255 * 64

    def decode(self, data: Buffer) -> Buffer:
        return self._decode(data, None)

    def decode_bounded(self, data: Buffer, max_size: int) -> Buffer:
        """Decode into at most ``max_size`` bytes: every frame's declared content size is
        checked against what is left before it is decompressed, so a frame that would
        inflate past the chunk's raw size (a zstd bomb) is refused without allocating."""
        return self._decode(data, max_size)

    def _decode(self, data: Buffer, max_size: int | None) -> Buffer:
        out = self.decode_segments(data, max_size)
        return out[0] if len(out) == 1 else b"".join(out)

    def decode_segments(
        self, data: Buffer, max_size: int | None = None, into: memoryview | None = None
    ) -> list[Buffer]:
        """The decoded segments of ``data`` in order, not joined (a reader that scatters
        byte planes into place needs no joined copy); raw segments are views of ``data``.
        ``max_size`` bounds their total as :meth:`decode_bounded` does.

        ``into`` (a writable byte buffer of at least the decoded total): large frames are
        decompressed into it, at their segment's offset, and returned as views of it — no
        fresh allocation per frame (half the cost of decompressing an exponent plane)."""
        view = byte_view(data)
        offset = 0
        left = max_size
        try:
            n = view[0]
            pos = 1 + n * _ENTRY.size
            out: list[Buffer] = []
            for i in range(n):
                kind, length = _ENTRY.unpack_from(view, 1 + i * _ENTRY.size)
                piece = view[pos : pos + length]
                if len(piece) != length:
                    raise ValueError("segment runs past the end of the data")
                pos += length
                if kind == _ZSTD:
                    size = zstandard.frame_content_size(piece)
                    if size < 0:
                        raise ValueError(f"segment {i}: zstd frame without a content size")
                    if left is not None and size > left:
                        raise ValueError(
                            f"segment {i}: zstd frame declares {size} bytes, more than the "
                            f"{left} left of the expected {max_size} (a zstd bomb?)"
                        )
                    if into is not None and size >= _INTO_MIN and offset + size <= len(into):
                        piece = _decompress_into(piece, into[offset : offset + size], i)
                    else:
                        piece = _decompressor().decompress(piece, allow_extra_data=False)
                    if len(piece) != size:  # zstandard checks this; a guard all the same
                        raise ValueError(f"segment {i}: frame gave {len(piece)} of {size} bytes")
                elif kind != _RAW:
                    raise ValueError(f"unknown segment kind {kind}")
                offset += len(piece)
                if left is not None:
                    left -= len(piece)
                    if left < 0:
                        raise ValueError(f"segments hold more than the expected {max_size} bytes")
                out.append(piece)
            if pos != len(view):
                raise ValueError(f"{len(view) - pos} trailing bytes")
        except (IndexError, struct.error, ValueError, zstandard.ZstdError) as exc:
            raise CodecError(f"zstd payload cannot be decoded: {exc}") from exc
        return out


def _decompress_into(piece: memoryview, dst: memoryview, i: int) -> memoryview:
    """Decompress the single frame ``piece`` into ``dst`` (exactly its declared content
    size), refusing what ``decompress(allow_extra_data=False)`` refuses: bytes after the
    frame, and content of any other size."""
    if _frame_length(piece) != len(piece):
        raise ValueError(f"segment {i}: bytes after its zstd frame")
    reader = _decompressor().stream_reader(piece, read_across_frames=False)
    got = 0
    while got < len(dst):
        n = reader.readinto(dst[got:])
        if not n:
            break
        got += n
    if got != len(dst) or reader.read(1):
        raise ValueError(f"segment {i}: frame content is not its declared {len(dst)} bytes")
    return dst


def _frame_length(piece: memoryview) -> int:
    """Bytes of the zstd frame at the start of ``piece``, from its header and block headers
    (what ZSTD_findFrameCompressedSize computes)."""
    pos = zstandard.frame_header_size(piece)
    checksum = zstandard.get_frame_parameters(piece).has_checksum
    while True:
        if pos + 3 > len(piece):
            raise ValueError("truncated zstd frame")
        head = piece[pos] | piece[pos + 1] << 8 | piece[pos + 2] << 16
        kind, size = (head >> 1) & 3, head >> 3
        if kind == 3:
            raise ValueError("zstd block of the reserved type")
        pos += 3 + (1 if kind == 1 else size)
        if head & 1:
            return pos + (4 if checksum else 0)
