"""Which tensors get which codec chain: the quantization policy of a save.

``quantize`` is None (everything lossless), one quantizer name for every eligible tensor,
or a mapping of fqn glob patterns to quantizer names (first match wins; None keeps a
tensor lossless), e.g. ``{"optim.*.exp_avg*": "bf16", "model.*.weight": "int8", "*": None}``.
Only floating tensors of at least ``QUANTIZE_MIN_BYTES`` (whole tensor, not shard — every
rank must choose alike) are eligible; integer and bool tensors, step counters and small
tensors (norms, biases) always stay lossless.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from ckptstore.codecs.pipeline import DTYPES, Pipeline, default_pipeline, quantized_pipeline
from ckptstore.knobs import DEFAULTS

QuantizeSpec = str | Mapping[str, str | None] | None

_CAN_QUANTIZE = {
    "fp16": ("float32", "float64"),
    "bf16": ("float32", "float64"),
    "int8": ("float32", "float64", "bfloat16", "float16"),
}


class QuantizePolicy:
    def __init__(
        self, spec: QuantizeSpec = None, *, min_bytes: int | None = None, zstd_level: int = 1
    ) -> None:
        if spec is None or isinstance(spec, str):
            rules = [] if spec is None else [("*", spec)]
        elif isinstance(spec, Mapping):
            rules = list(spec.items())
        else:
            raise TypeError(
                f"quantize must be None, a name or a mapping, not {type(spec).__name__}"
            )
        for pattern, name in rules:
            if not isinstance(pattern, str):
                raise TypeError(f"quantize pattern {pattern!r} is not a string")
            if name is not None:
                quantized_pipeline(name, "float32")  # raises ValueError for unknown names
        self.rules: list[tuple[str, str | None]] = rules
        self.min_bytes = DEFAULTS.quantize_min_bytes if min_bytes is None else int(min_bytes)
        self.zstd_level = zstd_level

    @property
    def active(self) -> bool:
        return any(name is not None for _, name in self.rules)

    def choose(self, fqn: str) -> str | None:
        """The quantizer the rules give ``fqn`` (before eligibility), or None."""
        for pattern, name in self.rules:
            if fnmatch.fnmatchcase(fqn, pattern):
                return name
        return None

    def pipeline_for(self, fqn: str, dtype: str, tensor_bytes: int) -> Pipeline:
        """The chain for a shard of tensor ``fqn`` whose whole tensor has ``tensor_bytes``."""
        name = self.choose(fqn)
        level = self.zstd_level
        if name is None or tensor_bytes < self.min_bytes or dtype not in DTYPES:
            return default_pipeline(dtype, zstd_level=level)
        if dtype not in _CAN_QUANTIZE[name.partition(":")[0]]:
            return default_pipeline(dtype, zstd_level=level)  # ints, bools, or already narrow
        return quantized_pipeline(name, dtype, zstd_level=level)


DeltaSpec = bool | Mapping[str, bool | None] | None


class DeltaPolicy:
    """Which tensors a save stores as deltas against the parent (docs/format.md, "Delta
    chunks"): ``delta`` is None/False (none, the default), True (every tensor) or a mapping
    of fqn glob patterns to bools (first match wins; no match: no delta). Only lossless
    chunks are ever stored as deltas: a quantized tensor is stored as it is."""

    def __init__(self, spec: DeltaSpec = None) -> None:
        if spec is None or isinstance(spec, bool):
            rules: list[tuple[str, bool]] = [("*", True)] if spec else []
        elif isinstance(spec, Mapping):
            rules = []
            for pattern, on in spec.items():
                if not isinstance(pattern, str):
                    raise TypeError(f"delta pattern {pattern!r} is not a string")
                if on is not None and not isinstance(on, bool):
                    raise TypeError(f"delta[{pattern!r}] must be a bool or None, not {on!r}")
                rules.append((pattern, bool(on)))
        else:
            raise TypeError(f"delta must be a bool or a mapping, not {type(spec).__name__}")
        self.rules = rules

    @property
    def active(self) -> bool:
        return any(on for _, on in self.rules)

    def wants(self, fqn: str, pipeline: Pipeline) -> bool:
        """Whether a shard of ``fqn`` encoded by ``pipeline`` may be stored as a delta."""
        if not pipeline.lossless:
            return False
        for pattern, on in self.rules:
            if fnmatch.fnmatchcase(fqn, pattern):
                return on
        return False
