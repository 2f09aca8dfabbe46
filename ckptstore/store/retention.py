"""The retention policy: which checkpoints a gc keeps, and why; and the gc grace period.

:class:`Retention` decides, for the checkpoints in commit order, which ones a gc keeps and
for which reasons. :func:`grace_of` is the grace period a gc runs with: given as seconds or
as a "2h"-style text (``Store.gc(grace="1h")``, the plug-ins' ``gc_grace``, the CLI's
``--grace``; :func:`parse_duration` reads it), else the settings'. No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import CheckpointNotFoundError
from ckptstore.store import layout
from ckptstore.store.manifest import Manifest
from ckptstore.store.repository import Repository

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|min|s|m|h|d|w)")


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"0s"``, ``"90"``, ``"30m"``, ``"2h"``, ``"1h30m"``, ``"7d"``, ``"1w"``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"duration must not be negative, got {text!r}")
        return float(text)
    s = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ValueError(
            f"invalid duration {text!r}: use e.g. 0s, 90s, 30m, 2h, 1h30m, 7d (or seconds)"
        )
    return total


def grace_of(repo: Repository, override: str | float | None = None) -> float:
    """The gc grace period: ``override`` (seconds or "2h"-style), else the settings'."""
    return parse_duration(override) if override is not None else float(repo.settings.gc_grace)


# -- retention -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Retention:
    """Which checkpoints a gc keeps. With no rule given, every checkpoint is kept (gc then
    only collects garbage). With any rule, a checkpoint is kept if some rule keeps it, and
    the latest checkpoint is always kept."""

    keep_last: int | None = None
    """The last N checkpoints in commit order."""
    keep_every: int | None = None
    """Checkpoints whose step is a multiple of K."""
    keep: tuple[str, ...] = ()
    """Checkpoints by name (a bare number means that step)."""

    def __post_init__(self) -> None:
        for label, v in (("keep_last", self.keep_last), ("keep_every", self.keep_every)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        object.__setattr__(self, "keep", tuple(str(k) for k in self.keep))

    @property
    def active(self) -> bool:
        return self.keep_last is not None or self.keep_every is not None or bool(self.keep)

    def reasons(
        self,
        manifests: Sequence[Manifest],
        *,
        strict: bool = True,
        unreadable: Iterable[str] = (),
    ) -> dict[str, list[str]]:
        """Name → why it is kept ([] = dropped), for ``manifests`` oldest first.

        A ``keep`` entry that matches no checkpoint raises
        :class:`~ckptstore.errors.CheckpointNotFoundError` when ``strict`` (planning), and
        keeps nothing otherwise (re-checking a plan: see :func:`~ckptstore.store.gc_run.execute`).
        Checkpoints whose manifest cannot be read (``unreadable``) are not in the result — gc
        never drops them — but a ``keep`` entry naming one is no error."""
        unreadable = set(unreadable)
        unreadable_steps = {layout.step_of_name(n) for n in unreadable} - {None}
        out: dict[str, list[str]] = {m.name: [] for m in manifests}
        if not self.active:
            return {name: ["all"] for name in out}
        if manifests:
            out[manifests[-1].name].append("latest")
        if self.keep_last is not None:
            for m in manifests[-self.keep_last :]:
                out[m.name].append(f"last {self.keep_last}")
        if self.keep_every is not None:
            for m in manifests:
                if m.step is not None and m.step % self.keep_every == 0:
                    out[m.name].append(f"every {self.keep_every}")
        for wanted in self.keep:
            hits = [m.name for m in manifests if m.name == wanted]
            if not hits and wanted.isdigit():
                step = int(wanted)
                hits = [m.name for m in manifests if m.step == step]
            matches_unreadable = wanted in unreadable or (
                wanted.isdigit() and int(wanted) in unreadable_steps
            )
            if not hits and strict and not matches_unreadable:
                raise CheckpointNotFoundError(
                    f"--keep {wanted!r}: no checkpoint by that name or step (nothing deleted)"
                )
            for name in hits:
                out[name].append("keep")
        return {name: list(dict.fromkeys(r)) for name, r in out.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"keep_last": self.keep_last, "keep_every": self.keep_every, "keep": list(self.keep)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Retention:
        return cls(
            keep_last=d.get("keep_last"),
            keep_every=d.get("keep_every"),
            keep=tuple(d.get("keep", ())),
        )
