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
    mirror: str | Mirror | None = None
    """A second, durable store (URL or :class:`Mirror`) that each checkpoint is copied to
    in the background after its commit here (docs/tiers.md)."""

    def __post_init__(self) -> None:
        if isinstance(self.mirror, str):
            object.__setattr__(self, "mirror", Mirror(self.mirror))
        _check_type("mirror", self.mirror, Mirror)
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


WHEN_BEHIND = ("wait", "skip")
ON_ERROR = ("log", "raise")


@dataclass(frozen=True)
class Mirror:
    """The durable tier of a two-tier job (docs/tiers.md): where committed checkpoints are
    copied in the background, and how.

    ``save(sd, "/nvme/run", step=n, mirror="s3://bucket/run")`` is ``Mirror("s3://…")``
    with every default. The same value names the second tier of a load (``load(sd,
    "/nvme/run", mirror=…)``): read from the primary where a chunk is there, else from here.
    """

    url: str
    """The mirror store's URL (any fsspec URL; usually a bucket)."""
    storage_options: Mapping[str, Any] | None = None
    """Passed to fsspec for the mirror (its credentials, endpoint, …); None: the primary's
    ``storage_options`` when the two URLs share a protocol, else none."""
    keep_last: int | None = None
    """After each mirror commit, ``gc --keep-last N`` on the mirror (its own retention:
    the primary's ``keep_last`` applies to the primary only)."""
    max_pending: int = 2
    """Checkpoints of this process waiting for (or in) upload at most; one more save then
    waits or skips (``when_behind``). Memory stays bounded: a pending checkpoint holds its
    chunk keys, never its bytes."""
    when_behind: str = "wait"
    """``"wait"``: a save finding ``max_pending`` uploads queued waits for one to finish;
    ``"skip"``: it is not mirrored (logged, and its ``SaveInfo.mirrored`` says so)."""
    on_error: str = "log"
    """A failed upload is logged and set on its future; ``"raise"`` also raises it
    (``MirrorError``) from this process's next save, after that save's commit."""
    ranks_wait: float = 3600.0
    """Seconds the coordinator waits for every rank's chunks before giving the mirror
    commit up (a rank that died); ranks wait as long for the commit."""
    read_through: bool = True
    """Loads: chunks read from the mirror are written to the primary (a read-through
    cache), so the next load of them is local."""
    stream: bool = False
    """Upload each chunk as soon as it is written, while the save still runs: durable
    sooner, but the upload shares the CPUs and the disk with the save. False: chunks go
    up once this rank has written all of its share."""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise TypeError(f"mirror url must be a non-empty str, not {self.url!r}")
        _check_type("mirror storage_options", self.storage_options, Mapping)
        if self.keep_last is not None and (
            not isinstance(self.keep_last, int)
            or isinstance(self.keep_last, bool)
            or self.keep_last < 1
        ):
            raise ValueError(f"mirror keep_last must be a positive int, got {self.keep_last!r}")
        if (
            not isinstance(self.max_pending, int)
            or isinstance(self.max_pending, bool)
            or self.max_pending < 1
        ):
            raise ValueError(f"mirror max_pending must be a positive int, got {self.max_pending!r}")
        if self.when_behind not in WHEN_BEHIND:
            raise ValueError(
                f"mirror when_behind must be one of {WHEN_BEHIND}, not {self.when_behind!r}"
            )
        if self.on_error not in ON_ERROR:
            raise ValueError(f"mirror on_error must be one of {ON_ERROR}, not {self.on_error!r}")
        if not isinstance(self.ranks_wait, (int, float)) or self.ranks_wait <= 0:
            raise ValueError(f"mirror ranks_wait must be positive seconds, got {self.ranks_wait!r}")
        if not isinstance(self.read_through, bool):
            raise TypeError(f"mirror read_through must be True or False, not {self.read_through!r}")
        if not isinstance(self.stream, bool):
            raise TypeError(f"mirror stream must be True or False, not {self.stream!r}")

    @classmethod
    def of(cls, value: str | Mirror | None) -> Mirror | None:
        """``value`` as a Mirror (a URL string becomes one with every default)."""
        if value is None or isinstance(value, Mirror):
            return value
        if isinstance(value, str):
            return cls(value)
        raise TypeError(f"mirror must be a URL or a ckptstore.Mirror, not {value!r}")

    def options_for(
        self, primary_url: str, primary_options: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """The fsspec options to open the mirror with (see ``storage_options``)."""
        if self.storage_options is not None:
            return dict(self.storage_options)
        if primary_options and _protocol(primary_url) == _protocol(self.url):
            return dict(primary_options)
        return {}


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _check_type(label: str, value: Any, kind: type) -> None:
    if value is None:
        return
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{label} must be a {kind.__name__} or None, not {value!r}")
