"""Codec ids → classes. An id, once shipped, always means the same encoding."""

from __future__ import annotations

from typing import Any

from ckptstore.codecs.base import Codec
from ckptstore.errors import UnknownCodecError

_REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` decodable by its ``codec_id``."""
    existing = _REGISTRY.get(cls.codec_id)
    if existing is not None and existing is not cls:
        raise ValueError(f"codec id {cls.codec_id!r} already registered to {existing}")
    _REGISTRY[cls.codec_id] = cls
    return cls


def get_codec(config: dict[str, Any]) -> Codec:
    """Rebuild a codec from its stored config."""
    codec_id = config.get("id") if isinstance(config, dict) else None
    cls = _REGISTRY.get(codec_id) if isinstance(codec_id, str) else None
    if cls is None:
        known = ", ".join(sorted(_REGISTRY))
        shown = f"{codec_id!r:.80}" if isinstance(config, dict) else "(config is not a map)"
        raise UnknownCodecError(f"unknown codec id {shown} (this reader knows: {known})")
    try:
        return cls.from_config(config)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnknownCodecError(
            f"bad config for codec {codec_id!r}: {config!r:.200}: {exc}"
        ) from exc


def known_ids() -> list[str]:
    return sorted(_REGISTRY)
