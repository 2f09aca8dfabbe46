"""Checkpoints to and from single weight files: :func:`export_checkpoint` writes one checkpoint
as whole tensors to a .safetensors or torch.save file, :func:`import_weights` saves the
tensors of such a file as a new checkpoint. ``ckptstore export`` / ``ckptstore import`` call
these.

Export writes .safetensors itself, one tensor at a time (the format is a JSON header, from
``ckptstore.codecs.safetensors_header``, and the raw tensors back to back), so memory holds
one whole tensor, not the whole model; the
``safetensors`` package reads the files (import, tests). The file appears at its path only
when it is complete: it is written under a temporary name beside it and renamed; an export
that fails or is interrupted removes what it wrote.

Importing this module does not import torch (the CLI reads its tables); the functions do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ckptstore.backend import Backend
from ckptstore.codecs.pipeline import DTYPES
from ckptstore.codecs.safetensors_header import encode_header, read_header
from ckptstore.store.catalog import CheckpointSummary
from ckptstore.store.facade import Store
from ckptstore.store.options import SaveOptions

# what ``dtype=`` accepts → the element type it casts floating-point tensors to
CASTS: dict[str, str] = {
    "fp64": "float64",
    "fp32": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    **{n: n for n in ("float64", "float32", "float16", "bfloat16")},
}
FORMATS = ("safetensors", "pt")
_SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt"}


@dataclass
class ExportInfo:
    """What one export wrote."""

    checkpoint: str
    out: str
    format: str
    tensors: int
    tensor_bytes: int
    """Bytes of the tensors written (after ``dtype``)."""
    file_bytes: int
    skipped_tensors: int
    """Tensors outside ``prefix``."""
    skipped_objects: int
    """Non-tensor values of the checkpoint (never exported)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImportInfo(CheckpointSummary):
    """What one import saved: the new checkpoint's figures (:class:`CheckpointSummary`)
    and the file they came from."""

    file: str = ""
    skipped_objects: int = 0
    """Non-tensor values of the file that were left out."""
    quantize: Any = None
    delta: bool = False


def format_of(path: str, fmt: str | None = None) -> str:
    """``fmt``, or the format ``path``'s suffix names: "safetensors" (.safetensors) or "pt"
    (.pt, .pth, .bin); ValueError if it names none."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _SUFFIXES:
        raise ValueError(
            f"cannot tell the format of {path!r} from its suffix: use .safetensors, .pt, .pth "
            "or .bin, or give the format"
        )
    return _SUFFIXES[ext]


def cast_target(stored: str, dtype: str | None) -> str:
    """The element type a tensor stored as ``stored`` is exported as: ``dtype`` (a key of
    :data:`CASTS`) for floats of 2 bytes or more, else unchanged."""
    if dtype is None:
        return stored
    if dtype not in CASTS:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(sorted(CASTS))}")
    info = DTYPES.get(stored)
    castable = info is not None and info.kind == "float" and info.itemsize >= 2
    return CASTS[dtype] if castable else stored


def check_out_path(out: str) -> None:
    """ValueError, naming ``out``, unless a file can be written at ``out``: its folder must
    exist and be a folder, and ``out`` must not be a folder."""
    if os.path.isdir(out):
        raise ValueError(f"cannot write {out}: it is a folder")
    folder = os.path.dirname(out)
    probe = folder  # the nearest part of the path that exists: a file there is the mistake
    while probe and not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if probe and os.path.exists(probe) and not os.path.isdir(probe):
        raise ValueError(f"cannot write {out}: {probe} is a file, not a folder")
    if folder and not os.path.isdir(folder):
        raise ValueError(f"cannot write {out}: folder {folder} does not exist")


def _open_store(
    store_or_url: Store | str | Backend, storage_options: Mapping[str, Any] | None
) -> Store:
    if isinstance(store_or_url, Store):
        if storage_options:
            raise ValueError("storage_options go with a URL, not with a Store")
        return store_or_url
    return Store(store_or_url, storage_options)


def export_checkpoint(
    store_or_url: Store | str | Backend,
    out: str | os.PathLike[str],
    *,
    step: int | None = None,
    name: str | None = None,
    fmt: str | None = None,
    dtype: str | None = None,
    prefix: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ExportInfo:
    """Write one checkpoint (the latest by default) to the file ``out`` as whole tensors.

    ``fmt``: "safetensors" or "pt" (torch.save of ``{name: tensor}``); default from ``out``'s
    suffix. ``dtype``: cast floating-point tensors (a key of :data:`CASTS`, e.g. "bf16").
    ``prefix``: only tensors whose name starts with it, written without it. ``progress``:
    called with (tensors done, tensors in all) after each tensor. Quantized tensors are
    dequantized; non-tensor values are left out (and counted).

    ``out`` appears only complete; if the export fails or is interrupted (an exception, a
    KeyboardInterrupt), nothing is left behind and an older file at ``out`` is untouched.
    Errors name ``out``, never the temporary file.
    """
    out = os.fspath(out)
    fmt = format_of(out, fmt)
    if dtype is not None and dtype not in CASTS:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(sorted(CASTS))}")
    check_out_path(out)
    store = _open_store(store_or_url, storage_options)
    target = store.resolve(step=step, name=name)
    m = store.repo.manifest(target)
    fqns = [f for f in m.tensors if prefix is None or f.startswith(prefix)]
    if not fqns:
        raise ValueError(
            f"checkpoint {target!r} has no tensor" + (f" under {prefix!r}" if prefix else "")
        )
    out_name = {f: f[len(prefix) :] if prefix else f for f in fqns}
    if "" in out_name.values():
        raise ValueError(f"prefix {prefix!r} leaves a tensor with an empty name")
    dtypes = {f: cast_target(m.tensors[f].dtype, dtype) for f in fqns}
    if fmt == "safetensors":
        bad = sorted({d for d in dtypes.values() if d not in DTYPES or not DTYPES[d].safetensors})
        if bad:
            raise ValueError(f"safetensors has no dtype for {bad}; use a dtype cast or a .pt file")

    from ckptstore.store.session import LoadSession

    session = LoadSession(store.repo, name=target)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            if fmt == "safetensors":
                nbytes = _write_safetensors(fh, session, fqns, out_name, dtypes, progress)
            else:
                nbytes = _write_pt(fh, session, fqns, out_name, dtypes, progress)
        os.replace(tmp, out)
    except BaseException as exc:  # KeyboardInterrupt too: never leave the temp file
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, Exception):
            renamed = _naming(exc, tmp, out)
            if renamed is not exc:
                raise renamed from exc
        raise
    return ExportInfo(
        checkpoint=target,
        out=out,
        format=fmt,
        tensors=len(fqns),
        tensor_bytes=nbytes,
        file_bytes=os.path.getsize(out),
        skipped_tensors=len(m.tensors) - len(fqns),
        skipped_objects=len(m.objects),
    )


def _naming(exc: Exception, tmp: str, out: str) -> Exception:
    """``exc`` with the user's path ``out`` where it names the temporary file ``tmp``."""
    try:
        if isinstance(exc, OSError) and exc.errno is not None:
            if exc.filename in (tmp, None):
                return type(exc)(exc.errno, exc.strerror, out)
            return exc
        if tmp in str(exc):
            return type(exc)(str(exc).replace(tmp, out))
    except Exception:  # an exception type that cannot be rebuilt: keep it as it is
        pass
    return exc


def _write_safetensors(
    fh: Any,
    session: Any,
    fqns: list[str],
    out_name: dict[str, str],
    dtypes: dict[str, str],
    progress: Callable[[int, int], None] | None,
) -> int:
    import torch

    from ckptstore.tensors import iter_full_tensors, torch_dtype

    m = session.manifest
    head, _ = encode_header(
        [(out_name[f], dtypes[f], m.tensors[f].shape) for f in fqns],
        {
            "format": "pt",
            "ckptstore.checkpoint": m.name,
            "ckptstore.step": "" if m.step is None else str(m.step),
        },
    )
    fh.write(head)
    nbytes = 0
    for i, (f, tensor) in enumerate(iter_full_tensors(session, fqns)):
        tensor = tensor.to(torch_dtype(dtypes[f])).contiguous()
        if tensor.numel():
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        nbytes += tensor.numel() * tensor.element_size()
        if progress:
            progress(i + 1, len(fqns))
    return nbytes


def _write_pt(
    fh: Any,
    session: Any,
    fqns: list[str],
    out_name: dict[str, str],
    dtypes: dict[str, str],
    progress: Callable[[int, int], None] | None,
) -> int:
    import torch

    from ckptstore.tensors import iter_full_tensors, torch_dtype

    state = {}
    nbytes = 0
    for i, (f, tensor) in enumerate(iter_full_tensors(session, fqns)):
        state[out_name[f]] = t = tensor.to(torch_dtype(dtypes[f]))
        nbytes += t.numel() * t.element_size()
        if progress:
            progress(i + 1, len(fqns))
    torch.save(state, fh)
    return nbytes


# -- import -------------------------------------------------------------------------------------
def _weights(obj: Any) -> tuple[Any, int]:
    """The tensors of a loaded .pt/.bin object, nesting kept; counts the values left out."""
    import torch

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


def read_weights(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """The tensors of a .safetensors / .pt / .pth / .bin file, and how many non-tensor
    values were left out. .pt/.bin are read with ``torch.load(weights_only=True)``: a file
    cannot make this run code (one that needs full pickle raises UnsafeObjectError)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _SUFFIXES:
        raise ValueError(f"cannot tell the format of {path!r}: use .safetensors, .pt, .pth or .bin")
    if _SUFFIXES[ext] == "safetensors":
        from safetensors.torch import load_file

        read_header(path)  # a hostile header: a CodecError naming the file, before the library
        return dict(load_file(path)), 0
    import torch

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


def import_weights(
    path: str | os.PathLike[str],
    url: str | Backend,
    *,
    step: int | None = None,
    name: str | None = None,
    prefix: str | None = None,
    options: SaveOptions | None = None,
    **option_fields: Any,
) -> ImportInfo:
    """Save the tensors of the file ``path`` (.safetensors, .pt, .pth, .bin; weights only)
    as a new checkpoint of the store at ``url`` (created if there is none), through
    :func:`ckptstore.save`; give ``step`` or ``name``.

    ``options`` (or its fields as keywords: ``quantize``, ``delta``, ``parent``, …): as in
    ``save``. ``prefix``: prepended to every tensor name.
    Nested dicts of a .pt file keep their nesting; non-tensor values are left out (counted).
    """
    from ckptstore.api import save

    if step is None and name is None:
        raise ValueError("give a step or a name for the new checkpoint")
    opts = SaveOptions.build(options, caller="import_weights", **option_fields)
    path = os.fspath(path)
    weights, dropped = read_weights(path)
    if prefix:
        weights = {f"{prefix}{k}": v for k, v in weights.items()}
    info = save(weights, url, step=step, name=name, options=opts)
    return ImportInfo.from_summary(
        info,
        file=path,
        skipped_objects=dropped,
        quantize=opts.quantize,
        delta=bool(opts.delta),
    )


__all__ = [
    "CASTS",
    "ExportInfo",
    "ImportInfo",
    "export_checkpoint",
    "format_of",
    "import_weights",
    "read_weights",
]
