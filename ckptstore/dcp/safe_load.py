"""Loading stored non-tensor values without running code from the store.

Values other than tensors are stored as the bytes ``torch.save`` made of them (a pickle).
They are loaded with torch's restricted unpickler (``torch.load(weights_only=True)``), which
only rebuilds plain containers, numbers, strings, tensors and the *globals* (classes and
functions named in the pickle) that are allow-listed. This module decides which globals a
value may name, beyond torch's own list:

1. **Built in** (:data:`KNOWN`): what training states hold — ``io.BytesIO`` (DCP's idiom for
   raw bytes), numpy arrays, scalars and RNG states (``np.random.get_state()``,
   ``np.random.Generator``), ``argparse.Namespace``, ``OrderedDict``/``Counter``, ``datetime``,
   ``pathlib``, ``uuid``, ``decimal``, ``fractions``, ``types.SimpleNamespace``, and the objects
   the Hugging Face Trainer puts in checkpoints (``TrainerState``, ``TrainingArguments``
   and their enums). (Lightning's checkpoint dict holds plain values, tensors and
   ``AttributeDict``/``argparse.Namespace`` hyper-parameters; DCP flattens mappings.)
   A module of this list is imported when a value needs it.
2. **Plain classes already imported** (:func:`plain_class`): dataclasses, NamedTuples and
   enums from modules this process has imported already (never imported because a stored
   value names them), whose loading can run no code of theirs: no custom ``__new__``,
   ``__init__``, ``__post_init__``, ``__setstate__``, ``__reduce__``, ``__getattr__``,
   ``_missing_`` … (dataclass- and namedtuple-generated methods are fine).
3. **Registered by the user**: :func:`allow_globals` (for good, or for a ``with`` block), and
   whatever ``torch.serialization.add_safe_globals``/``safe_globals`` allow.

Anything else is an :class:`~ckptstore.errors.UnsafeObjectError` naming the globals it
needs — never unpickled — unless the caller passed ``allow_pickle=True``.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import importlib
import io
import pickle
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ckptstore.errors import CorruptChunkError, UnsafeObjectError

_NUMPY = [
    f"{core}.multiarray.{n}"
    for core in ("numpy._core", "numpy.core")
    for n in ("_reconstruct", "scalar")
] + [
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.random._pickle.__randomstate_ctor",
    "numpy.random._pickle.__bit_generator_ctor",
    "numpy.random._pickle.__generator_ctor",
    "numpy.random.bit_generator.SeedSequence",
    "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
    "numpy.random.mtrand.RandomState",
    "numpy.random._generator.Generator",
    "numpy.random._mt19937.MT19937",
    "numpy.random._pcg64.PCG64",
    "numpy.random._pcg64.PCG64DXSM",
    "numpy.random._philox.Philox",
    "numpy.random._sfc64.SFC64",
]
_STDLIB = [
    "_io.BytesIO",
    "io.BytesIO",
    "argparse.Namespace",
    "types.SimpleNamespace",
    "collections.OrderedDict",
    "collections.Counter",
    "datetime.datetime",
    "datetime.date",
    "datetime.time",
    "datetime.timedelta",
    "datetime.timezone",
    "decimal.Decimal",
    "fractions.Fraction",
    "pathlib.Path",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
    "uuid.UUID",
    "uuid.SafeUUID",
    # constructors of plain values (defaultdict's factory, sets, ranges …)
    *(
        f"builtins.{n}"
        for n in (
            "list dict set frozenset tuple int float complex str bytes bytearray bool slice range"
        ).split()
    ),
]
# Lightning's AttributeDict is a dict subclass: DCP flattens it into its leaves in a state
# dict, and torch's restricted unpickler cannot fill a dict subclass as a whole value
# ("Can only SETITEMS for dict"), so it is not listed.
_TRANSFORMERS = [
    "transformers.trainer_callback.TrainerState",
    "transformers.trainer_callback.TrainerControl",
    "transformers.training_args.TrainingArguments",
    "transformers.training_args.OptimizerNames",
    "transformers.training_args.ParallelMode",
    "transformers.trainer_utils.IntervalStrategy",
    "transformers.trainer_utils.SaveStrategy",
    "transformers.trainer_utils.HubStrategy",
    "transformers.trainer_utils.SchedulerType",
    "transformers.trainer_utils.FSDPOption",
    "transformers.trainer_utils.EvaluationStrategy",
    "transformers.trainer_pt_utils.AcceleratorConfig",
    "transformers.debug_utils.DebugOption",
]
KNOWN: frozenset[str] = frozenset(_NUMPY + _STDLIB + _TRANSFORMERS)
"""Qualified names (as pickles name them) allowed without registration. Their modules are
imported on demand: they are known modules whose import is safe."""

_registered: dict[str, Any] = {}  # qualified name -> object, from allow_globals
_registry_lock = threading.Lock()
_load_lock = threading.Lock()  # torch's allow-list is process state: one load at a time


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


class allow_globals:  # noqa: N801 - used like a function: ``ckptstore.allow_globals(Cls)``
    """Allow stored values to name ``objs`` (classes, or ``(obj, "module.name")`` pairs for
    an object pickled under another name) when they are loaded without ``allow_pickle``.

    ``ckptstore.allow_globals(MyState)`` allows them from now on; ``with
    ckptstore.allow_globals(MyState): ...`` only inside the block. Allowing a class means
    trusting it: loading may call it (``__new__``/``__init__``) and its ``__setstate__`` with
    data from the store. Prefer plain dataclasses, which need no registration once imported.
    """

    def __init__(self, *objs: Any) -> None:
        entries: dict[str, Any] = {}
        for obj in objs:
            if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], str):
                entries[obj[1]] = obj[0]
            elif callable(obj):
                entries[_qualname(obj)] = obj
            else:
                raise TypeError(f"allow_globals takes classes or functions, not {obj!r}")
        with _registry_lock:
            self._added = {k: v for k, v in entries.items() if _registered.get(k) is not v}
            _registered.update(self._added)

    def __enter__(self) -> allow_globals:
        return self

    def __exit__(self, *exc: object) -> None:
        with _registry_lock:
            for k, v in self._added.items():
                if _registered.get(k) is v:
                    del _registered[k]


def allowed_globals() -> dict[str, Any]:
    """The globals registered with :func:`allow_globals` now (name -> object)."""
    with _registry_lock:
        return dict(_registered)


def _lookup(name: str, *, import_module: bool) -> Any:
    """The object pickles call ``name`` ("module.qual.name"); None if not found. Imports a
    module only with ``import_module``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        modname = ".".join(parts[:i])
        module = sys.modules.get(modname)
        if module is None and import_module:
            try:
                module = importlib.import_module(modname)
            except Exception:  # noqa: BLE001 - not this split (or not installed)
                module = None
        if module is None:
            continue
        obj: Any = module
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    return None


def _definer(cls: type, attr: str) -> type | None:
    for c in cls.__mro__:
        if attr in c.__dict__:
            return c
    return None


_NT = collections.namedtuple("_NT", "a")


def _generated(fn: Any) -> bool:
    """A method that dataclasses/namedtuple generated (compiled from a string, or
    namedtuple's own ``__getnewargs__``)."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    return code is not None and (
        code.co_filename == "<string>" or code is _NT.__getnewargs__.__code__
    )


_LOAD_HOOKS = (
    "__new__",
    "__init__",
    "__post_init__",
    "__setstate__",
    "__reduce__",
    "__reduce_ex__",
    "__getattr__",
    "__getattribute__",
    "__setattr__",
    "__setitem__",
    "__set_name__",
    "__getnewargs__",
    "__getnewargs_ex__",
    "_missing_",
)
_BASES = {object, tuple, enum.Enum, enum.IntEnum, enum.Flag, enum.IntFlag, int, str, float}


def plain_class(obj: Any) -> bool:
    """Whether loading an instance of ``obj`` (a dataclass, NamedTuple or enum) can run no
    code of its own: every hook the unpickler may call is inherited from ``object``,
    ``tuple``, ``enum`` or generated by dataclasses/namedtuple."""
    if not isinstance(obj, type):
        return False
    is_enum = issubclass(obj, enum.Enum)
    is_tuple = issubclass(obj, tuple) and hasattr(obj, "_fields")
    if not (is_enum or is_tuple or dataclasses.is_dataclass(obj)):
        return False
    for attr in _LOAD_HOOKS:
        owner = _definer(obj, attr)
        if owner is None or owner in _BASES or owner.__module__ == "enum":
            continue
        fn = owner.__dict__[attr]
        if attr == "__setstate__" and fn is getattr(dataclasses, "_dataclass_setstate", None):
            continue  # slots=True dataclasses
        if attr in ("__new__", "__init__", "__setattr__", "__getnewargs__") and _generated(fn):
            continue
        if is_enum and attr in ("__new__", "__init__", "__reduce_ex__", "__setattr__"):
            continue  # enum machinery: calling the class looks a member up
        return False
    return True


def _resolve(name: str, registered: dict[str, Any]) -> Any:
    """The object allowed under ``name``, or None when ``name`` is not allowed."""
    if name in registered:
        return registered[name]
    if name in KNOWN:
        return _lookup(name, import_module=True)
    obj = _lookup(name, import_module=False)  # only what this process imported already
    if obj is not None and plain_class(obj) and _qualname(obj) == name:
        return obj
    return None


def _companions(name: str) -> list[tuple[Any, str]]:
    """Types the unpickler builds without naming them: numpy's dtype classes (a
    ``numpy.dtype`` call returns an instance of one, whose state is then set)."""
    if name != "numpy.dtype":
        return []
    dtypes = _lookup("numpy.dtypes", import_module=True)
    out = []
    for attr in dir(dtypes):
        cls = getattr(dtypes, attr)
        if isinstance(cls, type) and attr.endswith("DType") and attr not in _NO_DTYPES:
            out.append((cls, f"numpy.dtypes.{attr}"))
    return out


_NO_DTYPES = {"ObjectDType", "VoidDType"}  # object fields would need arbitrary objects


def needed_globals(raw: bytes) -> list[str]:
    """Globals a ``torch.save`` stream names beyond what torch allows now."""
    return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw)))


def load_object(raw: bytes, where: str, allow_pickle: bool) -> Any:
    """Deserialize a stored non-tensor value without running code from the store.

    ``torch.load(weights_only=True)`` with torch's allow-list plus this module's (see the
    module docstring). A value naming any other global is an
    :class:`~ckptstore.errors.UnsafeObjectError`, unless ``allow_pickle`` (full pickle: only
    for stores one trusts). Bytes that are not a ``torch.save`` stream are a
    :class:`~ckptstore.errors.CorruptChunkError`."""
    try:
        return _restricted(raw, [])
    except pickle.UnpicklingError as exc:
        first = exc
    except Exception as exc:  # checksum-valid bytes that are not a torch.save stream
        raise CorruptChunkError(f"{where} cannot be deserialized: {reason(exc)}") from exc
    try:
        names = needed_globals(raw)
    except Exception:  # noqa: BLE001 - not a zip torch.save stream (a legacy/raw pickle)
        names = []
    registered = allowed_globals()
    allowed: list[tuple[Any, str]] = []
    refused: list[str] = []
    for name in names:
        obj = _resolve(name, registered)
        if obj is None:
            refused.append(name)
        else:
            allowed.append((obj, name))
            allowed += _companions(name)
    err: BaseException = first
    if not refused and allowed:
        try:
            return _restricted(raw, allowed)
        except pickle.UnpicklingError as exc:  # an allowed class used in a refused way
            err = exc
        except Exception as exc:  # noqa: BLE001 - an allowed constructor rejected its data
            raise CorruptChunkError(
                f"{where} cannot be deserialized: {type(exc).__name__}: {reason(exc)}"
            ) from exc
    if not allow_pickle:
        what = (
            f"it names {', '.join(refused)}, which is not on the allow-list"
            if refused
            else f"torch's restricted unpickler refuses it: {reason(err)}"
        )
        raise UnsafeObjectError(
            f"{where} needs full pickle to load ({what}); if you trust that code, allow it with "
            "ckptstore.allow_globals(<class>) (or torch.serialization.add_safe_globals), "
            "or pass allow_pickle=True only if you trust this store"
        ) from err
    try:
        return torch.load(io.BytesIO(raw), weights_only=False, map_location="cpu")
    except Exception as exc:  # not a torch.save stream, or an object that fails to rebuild
        raise CorruptChunkError(
            f"{where} cannot be deserialized (allow_pickle=True): {type(exc).__name__}: "
            f"{reason(exc)}"
        ) from exc


def _restricted(raw: bytes, extra: Iterable[tuple[Any, str]]) -> Any:
    extra = list(extra)
    if not extra:
        return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    with _load_lock:
        # add only what is not allowed already: leaving safe_globals removes what it added
        present = set(torch.serialization.get_safe_globals())
        add = [e for e in extra if e not in present]
        with torch.serialization.safe_globals(add):
            return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")


def reason(exc: BaseException) -> str:
    """The line of torch's (multi-line, advice-laden) load error that says what was wrong."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
    return lines[0][:300] if lines else type(exc).__name__


Registrable = Callable[..., Any] | tuple[Callable[..., Any], str]
