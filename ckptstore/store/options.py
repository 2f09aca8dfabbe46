"""``SaveOptions``: every option a save takes, in one value.

``ckptstore.save``, ``async_save``, ``Writer``, ``import_weights`` and the trainer plug-ins
all accept ``options=SaveOptions(...)`` and the same fields as keyword arguments (a keyword
wins over the value's field). An option is added here once, with its docstring; every
entry point then takes it, and docs/api.md's "SaveOptions" table is checked against these
fields by a test. Torch-free: the CLI and the store layer build one without importing torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptstore.codecs.policy import DeltaSpec, QuantizeSpec
from ckptstore.knobs import Settings


@dataclass(frozen=True)
class SaveOptions:
    """How a checkpoint is saved (not which one: ``step``/``name`` are the call's own)."""

    storage_options: Mapping[str, Any] | None = None
    """Passed to fsspec when the store is opened (credentials, endpoint, …)."""
    settings: Settings | None = None
    """Settings to start from instead of the ``CKPTSTORE_*`` variables."""
    chunk_bytes: int | None = None
    """Overrides ``settings.chunk_bytes``: the size tensors are cut into."""
    inline_bytes: int | None = None
    """Overrides ``settings.inline_bytes``: tensors up to this size go into the manifest."""
    threads: int | None = None
    """Overrides ``settings.threads``: encode/upload threads of this process."""
    quantize: QuantizeSpec = None
    """A quantizer name, or fqn glob patterns → names; None keeps everything lossless."""
    delta: DeltaSpec = None
    """True, or fqn glob patterns → bools: changed chunks may be stored as deltas."""
    parent: str | None = None
    """The checkpoint to deduplicate (and take deltas) against; default the last one."""
    overwrite: bool = False
    """Replace a checkpoint of the same name crash-safely instead of refusing."""
    keep_last: int | None = None
    """After the commit, rank 0 runs ``gc --keep-last N`` on a background thread."""

    def __post_init__(self) -> None:
        _check_type("storage_options", self.storage_options, Mapping)
        _check_type("settings", self.settings, Settings)
        for label in ("chunk_bytes", "inline_bytes", "threads"):
            value = getattr(self, label)
            _check_type(label, value, int)
        _check_type("parent", self.parent, str)
        if not isinstance(self.overwrite, bool):
            raise TypeError(f"overwrite must be True or False, not {self.overwrite!r}")
        if self.keep_last is not None and (
            not isinstance(self.keep_last, int)
            or isinstance(self.keep_last, bool)
            or self.keep_last < 1
        ):
            raise ValueError(f"keep_last must be a positive int, got {self.keep_last!r}")

    @classmethod
    def build(
        cls, options: SaveOptions | None = None, *, caller: str = "save", **fields: Any
    ) -> SaveOptions:
        """``options`` (or the defaults) with the keyword ``fields`` set; a name that is not
        a field is the TypeError Python gives for an unknown keyword, naming the fields."""
        if options is not None and not isinstance(options, SaveOptions):
            raise TypeError(
                f"{caller}() options must be a ckptstore.SaveOptions, not {type(options).__name__}"
            )
        names = cls.names()
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise TypeError(
                f"{caller}() got an unexpected keyword argument {unknown[0]!r} "
                f"(save options: {', '.join(names)})"
            )
        base = options if options is not None else cls()
        return dataclasses.replace(base, **fields) if fields else base

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names of the save options, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def resolved_settings(self) -> Settings:
        """The settings of this save: ``settings`` (or the ``CKPTSTORE_*`` variables), then
        the ``chunk_bytes``/``inline_bytes``/``threads`` overrides."""
        return Settings.resolve(
            self.settings,
            chunk_bytes=self.chunk_bytes,
            inline_bytes=self.inline_bytes,
            threads=self.threads,
        )

    def replace(self, **fields: Any) -> SaveOptions:
        """A copy with ``fields`` set (validated as at construction)."""
        return dataclasses.replace(self, **fields)


def _check_type(label: str, value: Any, kind: type) -> None:
    if value is None:
        return
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{label} must be a {kind.__name__} or None, not {value!r}")
