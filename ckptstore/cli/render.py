"""Moved to :mod:`ckptstore.render` (shared by the CLI, bench and demo); kept for imports."""

from ckptstore.render import console, emit_json, err_console, human_bytes, ratio, when

__all__ = ["console", "emit_json", "err_console", "human_bytes", "ratio", "when"]
