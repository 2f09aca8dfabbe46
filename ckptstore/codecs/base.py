"""The codec contract. A codec turns bytes into bytes and back; it is rebuilt from its
config, and the config (with its stable id) is stored with the data it encoded."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from ckptstore.errors import CodecError

Buffer = bytes | bytearray | memoryview


def byte_view(data: Buffer) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer (numpy arrays included)."""
    view = memoryview(data)
    if view.nbytes == 0:
        return memoryview(b"")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class Codec(abc.ABC):
    """One reversible (or, for quantizers, approximately reversible) step on a byte buffer."""

    codec_id: ClassVar[str]
    """Stable identifier stored in manifests. Never reused for a different encoding."""
    lossless: ClassVar[bool] = True

    @abc.abstractmethod
    def encode(self, data: Buffer) -> Buffer:
        """Encode ``data``; the result may be a view and must not be mutated by callers."""

    @abc.abstractmethod
    def decode(self, data: Buffer) -> Buffer:
        """Invert :meth:`encode`."""

    def decode_bounded(self, data: Buffer, max_size: int) -> Buffer:
        """:meth:`decode`, refusing (``CodecError``) an output of more than
        ``max_size`` bytes. The built-in codecs refuse before allocating it (a zstd frame
        that declares more is a bomb); this default decodes first and checks after."""
        out = self.decode(data)
        size = memoryview(out).nbytes
        if size > max_size:
            raise CodecError(
                f"{self.codec_id} decoded to {size} bytes, more than the {max_size} expected"
            )
        return out

    def max_encoded_size(self, raw_size: int) -> int | None:
        """The most bytes :meth:`encode` can turn ``raw_size`` bytes into — so the most a
        valid input of :meth:`decode` can hold when its output is ``raw_size`` bytes. None
        when the codec cannot say (then the stage before it decodes without a bound)."""
        return None

    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON/msgpack-able config including ``"id"``; enough to rebuild the codec."""

    def short(self) -> str:
        """A compact human label for tables (``inspect``)."""
        return self.codec_id

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        cfg = {k: v for k, v in config.items() if k != "id"}
        return cls(**cfg)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.get_config().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "id")
        return f"{type(self).__name__}({args})"
