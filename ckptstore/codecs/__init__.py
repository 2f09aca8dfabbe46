"""Codecs: framework-free byte transforms (byte grouping, zstd, later quantizers)."""

from ckptstore.codecs.base import Buffer, Codec
from ckptstore.codecs.bytegroup import ByteGroup
from ckptstore.codecs.pipeline import (
    DTYPES,
    QUANTIZERS,
    Pipeline,
    default_pipeline,
    quantized_pipeline,
)
from ckptstore.codecs.policy import QuantizePolicy, QuantizeSpec
from ckptstore.codecs.quantize import Cast, Int8Block, LossyCodec, QuantStats
from ckptstore.codecs.registry import get_codec, known_ids, register
from ckptstore.codecs.zstd import Zstd

__all__ = [
    "DTYPES",
    "QUANTIZERS",
    "QuantizePolicy",
    "QuantizeSpec",
    "Cast",
    "Int8Block",
    "LossyCodec",
    "QuantStats",
    "quantized_pipeline",
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
