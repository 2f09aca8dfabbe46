"""Codecs: framework-free byte transforms (byte grouping, zstd, later quantizers)."""

from ckptstore.codecs.base import Buffer, Codec
from ckptstore.codecs.bytegroup import ByteGroup
from ckptstore.codecs.pipeline import DTYPES, Pipeline, default_pipeline
from ckptstore.codecs.registry import get_codec, known_ids, register
from ckptstore.codecs.zstd import Zstd

__all__ = [
    "DTYPES",
    "Buffer",
    "ByteGroup",
    "Codec",
    "Pipeline",
    "Zstd",
    "default_pipeline",
    "get_codec",
    "known_ids",
    "register",
]
