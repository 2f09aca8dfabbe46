"""``export`` (a checkpoint to one .safetensors or torch.save file) and ``import`` (a
.safetensors / .pt / .bin file into a store). torch is imported inside the commands only.

Export writes .safetensors itself, one tensor at a time (the format is a JSON header and the
raw tensors back to back), so memory holds one full tensor, not the whole model; the
``safetensors`` package reads the files (import, tests).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import click

from ckptstore.cli.common import (
    _options,
    handle_errors,
    json_option,
    name_option,
    open_store,
    step_option,
    storage_option,
)
from ckptstore.render import console, emit_json, err_console, human_bytes

# manifest dtype name → safetensors dtype code
SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}
CASTS = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp64": "float64",
    "float64": "float64",
}
_ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "complex64": 8,
    "complex128": 16,
    "complex32": 4,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
}
_FLOATS = {"float64", "float32", "float16", "bfloat16"}


def _target_dtype(stored: str, cast: str | None) -> str:
    return CASTS[cast] if cast is not None and stored in _FLOATS else stored


def _format_of(out: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    ext = os.path.splitext(out)[1].lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext in (".pt", ".pth", ".bin"):
        return "pt"
    raise click.BadParameter(
        f"cannot tell the format of {out!r} from its suffix: use .safetensors, .pt, .pth or "
        ".bin, or --format",
        param_hint="OUT",
    )


def _tensors(repo: Any, name: str, fqns: list[str]) -> Iterator[tuple[str, Any]]:
    """Whole CPU tensors of checkpoint ``name`` (dequantized where stored lossy), one at a
    time, in ``fqns`` order."""
    from ckptstore.store.session import LoadSession
    from ckptstore.tensors import iter_full_tensors

    return iter_full_tensors(LoadSession(repo, name=name), fqns)


def _torch() -> Any:
    import torch

    return torch


def export_checkpoint(
    repo: Any,
    name: str,
    out: str,
    *,
    fmt: str,
    cast: str | None = None,
    prefix: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write checkpoint ``name`` to ``out``; returns a summary (tensors, bytes, skipped)."""
    from ckptstore.tensors import torch_dtype

    if cast is not None and cast not in CASTS:
        raise ValueError(f"--dtype {cast!r}: use one of {sorted(CASTS)}")
    m = repo.manifest(name)
    fqns = [f for f in m.tensors if prefix is None or f.startswith(prefix)]
    if not fqns:
        raise ValueError(
            f"checkpoint {name!r} has no tensor" + (f" under {prefix!r}" if prefix else "")
        )
    out_name = {f: f[len(prefix) :] if prefix else f for f in fqns}
    if "" in out_name.values():
        raise ValueError(f"--prefix {prefix!r} leaves a tensor with an empty name")
    target = {f: _target_dtype(m.tensors[f].dtype, cast) for f in fqns}
    nbytes = 0
    tmp = f"{out}.tmp-{os.getpid()}"
    if fmt == "safetensors":
        bad = sorted({d for d in target.values() if d not in SAFETENSORS_DTYPES})
        if bad:
            raise ValueError(f"safetensors has no dtype for {bad}; use --dtype or a .pt file")
        header: dict[str, Any] = {
            "__metadata__": {
                "format": "pt",
                "ckptstore.checkpoint": name,
                "ckptstore.step": "" if m.step is None else str(m.step),
            }
        }
        offset = 0
        for f in fqns:
            size = _ITEMSIZE[target[f]]
            for dim in m.tensors[f].shape:
                size *= dim
            header[out_name[f]] = {
                "dtype": SAFETENSORS_DTYPES[target[f]],
                "shape": list(m.tensors[f].shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-(8 + len(head)) % 8)  # the data starts 8-byte aligned
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for i, (f, tensor) in enumerate(_tensors(repo, name, fqns)):
                tensor = tensor.to(torch_dtype(target[f])).contiguous()
                if tensor.numel():
                    fh.write(tensor.reshape(-1).view(_torch().uint8).numpy().tobytes())
                nbytes += tensor.numel() * tensor.element_size()
                if progress:
                    progress(i + 1, len(fqns))
    else:
        torch = _torch()
        state = {}
        for i, (f, tensor) in enumerate(_tensors(repo, name, fqns)):
            state[out_name[f]] = tensor.to(torch_dtype(target[f]))
            nbytes += tensor.numel() * state[out_name[f]].element_size()
            if progress:
                progress(i + 1, len(fqns))
        torch.save(state, tmp)
    os.replace(tmp, out)
    return {
        "checkpoint": name,
        "out": out,
        "format": fmt,
        "tensors": len(fqns),
        "tensor_bytes": nbytes,
        "file_bytes": os.path.getsize(out),
        "skipped_tensors": len(m.tensors) - len(fqns),
        "skipped_objects": len(m.objects),
    }


@click.command("export")
@click.argument("url")
@click.argument("out", type=click.Path(dir_okay=False))
@step_option
@name_option
@click.option(
    "--dtype",
    "cast",
    type=click.Choice(sorted(CASTS)),
    default=None,
    help="Cast floating-point tensors (others stay as they are).",
)
@click.option(
    "--prefix",
    default=None,
    help="Export only tensors whose name starts with this, without it (e.g. 'model.').",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "pt"]),
    default=None,
    help="Default: from OUT's suffix (.safetensors; .pt/.pth/.bin = torch.save).",
)
@storage_option
@json_option
@handle_errors
def export_cmd(
    url: str,
    out: str,
    step: int | None,
    name: str | None,
    cast: str | None,
    prefix: str | None,
    fmt: str | None,
    storage_options: tuple[str, ...],
    as_json: bool,
) -> None:
    """Write one checkpoint (the latest by default) to OUT as whole tensors: .safetensors
    (Hugging Face convention) or a torch.save file. Quantized tensors are dequantized;
    non-tensor values are left out."""
    from rich.progress import Progress

    fmt = _format_of(out, fmt)
    store = open_store(url, storage_options)
    repo, target = store.repo, store.resolve(step=step, name=name)
    with Progress(console=err_console, transient=True, disable=as_json) as progress:
        task = progress.add_task(f"exporting {target}", total=None)
        summary = export_checkpoint(
            repo,
            target,
            out,
            fmt=fmt,
            cast=cast,
            prefix=prefix,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if as_json:
        emit_json(summary)
        return
    console.print(
        f"wrote {out}: {summary['tensors']} tensor(s), "
        f"{human_bytes(summary['tensor_bytes'])} from {target}"
        + (
            f"; left out {summary['skipped_objects']} non-tensor value(s)"
            if summary["skipped_objects"]
            else ""
        )
    )


def _weights(obj: Any) -> tuple[Any, int]:
    """The tensors of a loaded .pt/.bin object, nesting kept; counts the values left out."""
    torch = _torch()
    if isinstance(obj, torch.Tensor):
        return obj, 0
    if isinstance(obj, dict):
        out, dropped = {}, 0
        for k, v in obj.items():
            w, n = _weights(v)
            dropped += n
            if w is None:
                dropped += 1
            elif not (isinstance(w, dict) and not w):
                out[k] = w
        return out, dropped
    return None, 0


def read_weights(path: str) -> tuple[dict[str, Any], int]:
    """The tensors of a .safetensors / .pt / .pth / .bin file, and how many non-tensor
    values were left out. .pt/.bin are read with ``torch.load(weights_only=True)``: a file
    cannot make this run code."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(path)), 0
    if ext in (".pt", ".pth", ".bin"):
        torch = _torch()
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError and friends: not weights only
            from ckptstore.errors import UnsafeObjectError

            raise UnsafeObjectError(
                f"{path} is not a weights-only torch file (torch.load(weights_only=True) "
                f"refused it): {str(exc).splitlines()[0]}"
            ) from exc
        if isinstance(obj, torch.Tensor):
            raise ValueError(f"{path} holds one tensor, not a state dict")
        weights, dropped = _weights(obj)
        if not isinstance(weights, dict) or not weights:
            raise ValueError(f"{path} holds no tensors")
        return weights, dropped
    raise click.BadParameter(
        f"cannot tell the format of {path!r}: use .safetensors, .pt, .pth or .bin",
        param_hint="FILE",
    )


def _quantize_spec(text: str | None) -> Any:
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--quantize") from None
        if not isinstance(spec, dict):
            raise click.BadParameter("expected a JSON object", param_hint="--quantize")
        return spec
    return text


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.argument("url")
@step_option
@name_option
@click.option(
    "--quantize",
    default=None,
    metavar="SPEC",
    help='Store lossy: a codec name ("int8", "bf16", "fp16") for every eligible tensor, or '
    'a JSON object of fqn globs to names, e.g. \'{"*.weight": "int8"}\'.',
)
@click.option("--prefix", default=None, help="Prepend this to every tensor name (e.g. 'model.').")
@storage_option
@json_option
@handle_errors
def import_cmd(
    file: str,
    url: str,
    step: int | None,
    name: str | None,
    quantize: str | None,
    prefix: str | None,
    storage_options: tuple[str, ...],
    as_json: bool,
) -> None:
    """Save the tensors of FILE (.safetensors, .pt, .pth, .bin; weights only) as a new
    checkpoint of the store at URL (created if needed)."""
    import ckptstore

    if step is None and name is None:
        raise click.UsageError("give --step N or --name NAME for the new checkpoint")
    spec = _quantize_spec(quantize)
    kwargs: dict[str, Any] = {}
    if spec is not None:
        import inspect

        if "quantize" not in inspect.signature(ckptstore.save).parameters:
            raise click.UsageError("this ckptstore cannot quantize (no quantize= in save)")
        kwargs["quantize"] = spec
    with err_console.status(f"reading {file}…") if not as_json else nullcontext():
        weights, dropped = read_weights(file)
    if prefix:
        weights = {f"{prefix}{k}": v for k, v in weights.items()}
    with err_console.status(f"saving to {url}…") if not as_json else nullcontext():
        info = ckptstore.save(
            weights,
            url,
            step=step,
            name=name,
            storage_options=_options(storage_options),
            **kwargs,
        )
    summary = {
        "file": file,
        "name": info.name,
        "step": info.step,
        "logical_bytes": info.logical_bytes,
        "stored_bytes": info.stored_bytes,
        "new_bytes": info.new_bytes,
        "seconds": info.seconds,
        "skipped_objects": dropped,
        "quantize": spec,
    }
    if as_json:
        emit_json(summary)
        return
    console.print(
        f"imported {file} as {info.name}: {human_bytes(info.logical_bytes)} → "
        f"{human_bytes(info.stored_bytes)} stored, {human_bytes(info.new_bytes)} written "
        f"in {info.seconds:.2f}s" + (f"; left out {dropped} non-tensor value(s)" if dropped else "")
    )


COMMANDS = (export_cmd, import_cmd)
