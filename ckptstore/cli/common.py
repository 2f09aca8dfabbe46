"""What every ``ckptstore`` verb shares: exit codes, error handling, common options.

Exit codes (docs/cli.md): 0 ok; 1 damage found (verify), or a check failed (demo); 2 bad
usage; 3 store or checkpoint not found; 4 corrupt data, unreadable manifest or unknown
format/codec; 5 any other error (storage, locks, mismatch); 141 stdout closed early (``|
head``: nothing printed on stderr, like a tool killed by SIGPIPE). Errors print one line on
stderr.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from ckptstore import errors

EXIT_DAMAGED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_OTHER = 1, 2, 3, 4, 5
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what the shell reports for `yes | head`


def _exit_code(exc: errors.CkptStoreError) -> int:
    if isinstance(exc, (errors.StoreNotFoundError, errors.CheckpointNotFoundError)):
        return EXIT_NOT_FOUND
    if isinstance(
        exc,
        (
            errors.CorruptChunkError,
            errors.ChunkNotFoundError,
            errors.ManifestError,
            errors.FormatVersionError,
            errors.UnknownCodecError,
            errors.StoreConfigError,
            errors.CodecError,
        ),
    ):
        return EXIT_CORRUPT
    if isinstance(exc, (errors.UnknownSchemeError, errors.InvalidURLError)):
        return EXIT_USAGE
    return EXIT_OTHER


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ckptstore errors into a one-line message and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return fn(*args, **kwargs)
            finally:
                sys.stdout.flush()  # a reader that went away shows here, not at exit
        except BrokenPipeError:  # `ckptstore ls --json | head`: the reader has what it wanted
            _silence_stdout()
            sys.exit(EXIT_BROKEN_PIPE)
        except errors.CkptStoreError as exc:
            click.echo(f"ckptstore: error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(_exit_code(exc))
        except ValueError as exc:  # bad arguments (names, steps, knob values)
            click.echo(f"ckptstore: error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except (OSError, RuntimeError, TypeError, KeyError) as exc:
            if os.environ.get("CKPTSTORE_DEBUG"):
                raise
            click.echo(
                f"ckptstore: error: {type(exc).__name__}: {exc} "
                "(set CKPTSTORE_DEBUG=1 for a traceback)",
                err=True,
            )
            sys.exit(EXIT_OTHER)

    return wrapper


def _reraise_broken_pipe() -> None:
    raise BrokenPipeError  # (rich would exit 1 itself; handle_errors exits 141 quietly)


def _route_rich_broken_pipe() -> None:
    """Tables go through rich's console, which on a closed stdout exits 1 by itself; hand
    the BrokenPipeError to :func:`handle_errors` instead, so every output exits alike."""
    from ckptstore.render import console

    console.on_broken_pipe = _reraise_broken_pipe  # type: ignore[method-assign]


_route_rich_broken_pipe()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush of what is still buffered
    does not fail again ("Exception ignored ... BrokenPipeError") on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real fd (e.g. click's test runner)
        pass


def _options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``-o key=value`` storage options; values that parse as JSON are typed."""
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint="-o")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    ctx = click.get_current_context(silent=True)
    endpoint = ctx.meta.get(_ENDPOINT_KEY) if ctx is not None else None
    if endpoint:
        out["endpoint_url"] = endpoint
    return out


_ENDPOINT_KEY = "ckptstore.endpoint_url"


def _remember_endpoint(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[_ENDPOINT_KEY] = value


def _check_pairs(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    """``-o`` is a storage option in every command: a value without ``=`` is refused while
    the command line is parsed, before anything is read or written."""
    for pair in value:
        if "=" not in pair:
            hint = (  # `report URL -o page.html`, from when -o was report's output file
                "; the page to write is given as --output PATH"
                if ctx.command.name == "report"
                else ""
            )
            raise click.BadParameter(
                f"expected KEY=VALUE (a storage option), got {pair!r}{hint}", ctx, param
            )
    return value


_storage_option = click.option(
    "-o",
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_check_pairs,
    help="fsspec storage option, repeatable (e.g. -o anon=true, -o profile=prod).",
)

_endpoint_option = click.option(
    "--endpoint-url",
    metavar="URL",
    expose_value=False,
    callback=_remember_endpoint,
    help="S3-compatible endpoint (MinIO, SeaweedFS, ...), the same as -o endpoint_url=URL. "
    "Default: $AWS_ENDPOINT_URL, else AWS.",
)


def storage_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-o KEY=VALUE`` (repeatable) and ``--endpoint-url URL``."""
    return _endpoint_option(_storage_option(fn))


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
step_option = click.option("--step", type=int, default=None, help="Checkpoint by step.")
name_option = click.option("--name", default=None, help="Checkpoint by name.")


def open_store(url: str, storage_options: tuple[str, ...]):
    """The :class:`ckptstore.Store` a command works on (torch-free)."""
    from ckptstore.store import Store

    return Store(url, _options(storage_options))
