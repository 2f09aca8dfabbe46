"""Drop-in for DCP users: values DCP users keep in state dicts load without
allow_pickle (and loading still runs no code from the store); templates of another dtype
get the values cast as dcp.load does."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import enum
import io
import os
import pathlib
import random
import sys
import types
import typing

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import ckptstore
from ckptstore import errors
from ckptstore.dcp import safe_load


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclasses.dataclass
class TrainState:
    step: int = 0
    losses: list = dataclasses.field(default_factory=list)
    color: Color = Color.RED
    best: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Frozen:
    x: int = 1


class Point(typing.NamedTuple):
    x: int
    y: float


@dataclasses.dataclass
class WithPostInit:  # __post_init__ is code loading would run: not plain
    x: int = 1

    def __post_init__(self) -> None:
        self.x += 1


class Opaque:
    def __init__(self) -> None:
        self.v = 1


class Payload:
    """Its pickle calls os.system: the classic malicious checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@dataclasses.dataclass
class SneakySetstate:
    x: int = 1

    def __setstate__(self, state):  # would run on load
        raise AssertionError("ran __setstate__ from a checkpoint")


def _bytes_io(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _values() -> dict[str, object]:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    return {
        "bytes_io": _bytes_io([0.5, 0.25]),
        "np_array": np.arange(12, dtype=np.float32).reshape(3, 4),
        "np_int_array": np.arange(5, dtype=np.int64),
        "np_scalar": np.float64(2.5),
        "np_int": np.int32(7),
        "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state(),
        "np_generator": np.random.default_rng(5),
        "dataclass": TrainState(step=3, losses=[1.0, 0.5], color=Color.BLUE, best=0.5),
        "frozen_slots": Frozen(4),
        "namedtuple": Point(1, 2.0),
        "enum": Color.BLUE,
        "namespace": argparse.Namespace(lr=0.1, name="run", layers=[1, 2]),
        "simple_namespace": types.SimpleNamespace(a=1),
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "delta": datetime.timedelta(seconds=5),
        "path": pathlib.PurePosixPath("/data/run"),
        "frozenset": frozenset({1, 2}),
    }


def _same(a, b) -> bool:
    if isinstance(a, io.BytesIO):
        return isinstance(b, io.BytesIO) and a.getvalue() == b.getvalue()
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, np.random.Generator):
        return isinstance(b, np.random.Generator) and a.random() == b.random()
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, tuple) and not hasattr(a, "_fields"):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def test_training_values_load_without_allow_pickle(tmp_path):
    url = str(tmp_path / "s")
    values = _values()
    ckptstore.save({"w": torch.ones(3), "extra": values}, url, step=1)
    full = ckptstore.load_full(url)
    for key, value in _values().items():
        assert _same(value, full["extra"][key]), key
    # in place, through DCP's planner (which torch.loads what the Reader hands it)
    template = {"w": torch.zeros(3), "extra": {k: None for k in values}}
    template["extra"]["torch_rng"] = torch.zeros_like(values["torch_rng"])  # a tensor
    ckptstore.load(template, url)
    for key, value in _values().items():
        assert _same(value, template["extra"][key]), key
    assert torch.equal(template["w"], torch.ones(3))


def test_dict_subclasses_load_as_themselves():
    """(In a state dict DCP flattens mappings into their leaves; as a whole value they
    keep their type.)"""
    for value in (collections.OrderedDict(b=1, a=2), collections.Counter("aab")):
        got = safe_load.load_object(_bytes_io(value).getvalue(), "x", False)
        assert type(got) is type(value) and got == value


def test_rng_states_restore_the_streams(tmp_path):
    url = str(tmp_path / "s")
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckptstore.save({"rng": states}, url, step=1)
    loaded = ckptstore.load_full(url)["rng"]
    torch.set_rng_state(loaded["torch"])
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_dcp_end_to_end_bytes_io_idiom(tmp_path):
    """DCP's own e2e train-state test keeps losses as a BytesIO of torch.save bytes."""
    url = str(tmp_path / "s")
    losses = [0.9, 0.7, 0.4]
    sd = {"model": {"w": torch.randn(8, 4)}, "losses": _bytes_io(losses)}
    dcp.save(sd, storage_writer=ckptstore.Writer(url, step=5))
    out = {"model": {"w": torch.zeros(8, 4)}, "losses": io.BytesIO()}
    dcp.load(out, storage_reader=ckptstore.Reader(url, step=5))
    assert torch.equal(out["model"]["w"], sd["model"]["w"])
    out["losses"].seek(0)
    assert torch.load(out["losses"], weights_only=True) == losses


def test_class_not_on_the_list_is_refused(tmp_path):
    url = str(tmp_path / "s")
    ckptstore.save({"w": torch.ones(2), "o": Opaque(), "p": WithPostInit()}, url, step=1)
    with pytest.raises(errors.UnsafeObjectError, match=r"Opaque.*allow_globals"):
        ckptstore.load_full(url)
    with pytest.raises(errors.UnsafeObjectError, match="Opaque"):
        ckptstore.load({"w": torch.zeros(2), "o": None, "p": None}, url)
    full = ckptstore.load_full(url, allow_pickle=True)  # the explicit opt-out still works
    assert full["o"].v == 1 and full["p"].x == 2


def test_hooks_make_a_dataclass_not_plain():
    assert safe_load.plain_class(TrainState) and safe_load.plain_class(Point)
    assert safe_load.plain_class(Frozen) and safe_load.plain_class(Color)
    assert not safe_load.plain_class(WithPostInit)
    assert not safe_load.plain_class(SneakySetstate)
    assert not safe_load.plain_class(Opaque)
    raw = _bytes_io(SneakySetstate()).getvalue()
    with pytest.raises(errors.UnsafeObjectError, match="SneakySetstate"):
        safe_load.load_object(raw, "x", False)


def test_malicious_reduce_never_runs(tmp_path):
    url = str(tmp_path / "s")
    marker = tmp_path / "pwned"
    ckptstore.save({"w": torch.ones(2), "evil": Payload(str(marker))}, url, step=1)
    assert not marker.exists()
    with pytest.raises(errors.UnsafeObjectError, match="system"):
        ckptstore.load_full(url)
    with pytest.raises(errors.UnsafeObjectError):
        ckptstore.load({"w": torch.zeros(2), "evil": None}, url)
    with pytest.raises(CheckpointException, match="UnsafeObjectError"):
        dcp.load({"w": torch.zeros(2), "evil": None}, storage_reader=ckptstore.Reader(url))
    assert not marker.exists()
    # allow-listing an unrelated class does not let the payload through
    with ckptstore.allow_globals(Opaque), pytest.raises(errors.UnsafeObjectError):
        ckptstore.load_full(url)
    assert not marker.exists()


def test_allow_globals_registry(tmp_path):
    url = str(tmp_path / "s")
    ckptstore.save({"o": Opaque()}, url, step=1)
    with ckptstore.allow_globals(Opaque):
        assert ckptstore.load_full(url)["o"].v == 1
    with pytest.raises(errors.UnsafeObjectError):  # only inside the block
        ckptstore.load_full(url)
    reg = ckptstore.allow_globals(Opaque)  # for good
    try:
        assert ckptstore.load_full(url)["o"].v == 1
        assert f"{__name__}.Opaque" in safe_load.allowed_globals()
    finally:
        reg.__exit__(None, None, None)
    # torch's own allow-list counts too, and is left as it was
    with torch.serialization.safe_globals([Opaque]):
        assert ckptstore.load_full(url)["o"].v == 1
        assert Opaque in torch.serialization.get_safe_globals()
    with pytest.raises(TypeError):
        ckptstore.allow_globals(3)


def test_plain_dataclass_of_a_module_not_imported_is_refused(tmp_path):
    """Loading never imports a module because a stored value names it (import runs code):
    only modules already imported, or names on the built-in list, are looked at."""
    mod = types.ModuleType("ckpt_test_unimported")
    sys.modules["ckpt_test_unimported"] = mod
    exec(  # noqa: S102 - a module made here, then forgotten
        "import dataclasses\n@dataclasses.dataclass\nclass S:\n    x: int = 1\n", mod.__dict__
    )
    try:
        raw = _bytes_io(mod.S(5)).getvalue()
        assert safe_load.load_object(raw, "x", False).x == 5
    finally:
        del sys.modules["ckpt_test_unimported"]
    with pytest.raises(errors.UnsafeObjectError, match="ckpt_test_unimported.S"):
        safe_load.load_object(raw, "x", False)


def test_lightning_attribute_dict(tmp_path, monkeypatch):
    """Lightning's AttributeDict (hyper_parameters), defined as in lightning 2.6: a dict
    subclass with attribute access. A stand-in module: lightning is not a dependency."""
    src = (
        "class AttributeDict(dict):\n"
        "    def __getattr__(self, key):\n"
        "        try:\n"
        "            return self[key]\n"
        "        except KeyError as e:\n"
        "            raise AttributeError(key) from e\n"
        "    def __setattr__(self, key, val):\n"
        "        self[key] = val\n"
    )
    names = ["lightning", "lightning.fabric", "lightning.fabric.utilities"]
    for n in names:
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    mod = types.ModuleType("lightning.fabric.utilities.data")
    exec(src, mod.__dict__)  # noqa: S102
    mod.AttributeDict.__module__ = mod.__name__
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    sys.modules["lightning.fabric.utilities"].data = mod
    hp = mod.AttributeDict(lr=0.1, ns=argparse.Namespace(a=1), name="run")
    url = str(tmp_path / "s")
    # a Mapping: DCP flattens it into its leaves, which load without allow_pickle; the
    # template's AttributeDict is filled in place
    ckptstore.save({"hyper_parameters": hp, "epoch": 3, "w": torch.ones(2)}, url, step=1)
    template = {"hyper_parameters": mod.AttributeDict(lr=0.0, ns=None, name=""), "epoch": 0}
    template["w"] = torch.zeros(2)
    ckptstore.load(template, url)
    got = template["hyper_parameters"]
    assert type(got) is mod.AttributeDict and got.lr == 0.1 and got.ns.a == 1
    assert got.name == "run" and template["epoch"] == 3
    # as a whole value torch's restricted unpickler cannot fill a dict subclass: refused
    # with the reason, never unpickled
    with pytest.raises(errors.UnsafeObjectError, match="AttributeDict"):
        safe_load.load_object(_bytes_io([hp]).getvalue(), "x", False)


def test_transformers_trainer_state(tmp_path):
    tc = pytest.importorskip("transformers.trainer_callback")
    from transformers.trainer_utils import IntervalStrategy

    state = tc.TrainerState(global_step=7, log_history=[{"loss": 1.5, "step": 7}])
    url = str(tmp_path / "s")
    ckptstore.save(
        {"trainer_state": state, "strategy": IntervalStrategy.STEPS, "w": torch.ones(2)},
        url,
        step=7,
    )
    full = ckptstore.load_full(url)
    assert full["trainer_state"] == state and full["strategy"] is IntervalStrategy.STEPS


# -- dtype: cast as DCP does (torch's test_dtype_mismatch_casting) -------------------------
def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).to(dtype)


@pytest.mark.parametrize("through", ["ckptstore", "dcp"])
def test_dtype_mismatch_casting(tmp_path, through):
    url = str(tmp_path / "s")
    fp32 = _model(torch.float32)
    ckptstore.save({"model": fp32.state_dict()}, url, step=1)
    bf16 = _model(torch.bfloat16)
    for p in bf16.parameters():
        torch.nn.init.zeros_(p)
    sd = {"model": bf16.state_dict()}
    if through == "dcp":
        dcp.load(sd, storage_reader=ckptstore.Reader(url, step=1))
    else:
        ckptstore.load(sd, url, step=1)
    for k, v in fp32.state_dict().items():
        assert sd["model"][k].dtype == torch.bfloat16
        assert torch.equal(sd["model"][k], v.to(torch.bfloat16)), k
    # and back: the bf16 checkpoint into an fp32 model
    ckptstore.save(sd, url, step=2)
    back = {"model": _model(torch.float32).state_dict()}
    ckptstore.load(back, url, step=2)
    for k, v in sd["model"].items():
        assert back["model"][k].dtype == torch.float32
        assert torch.equal(back["model"][k], v.to(torch.float32)), k


def test_dtype_cast_with_resharding_rows_and_quantized(tmp_path):
    url = str(tmp_path / "s")
    w = torch.randn(300, 40)
    ckptstore.save({"w": w, "q": w.clone()}, url, step=1, chunk_bytes=4096, quantize={"q": "bf16"})
    out = {"w": torch.zeros(300, 40, dtype=torch.float16), "q": torch.zeros(300, 40)}
    ckptstore.load(out, url)
    assert torch.equal(out["w"], w.to(torch.float16))
    assert torch.allclose(out["q"], w, rtol=1e-2, atol=1e-2)
    f64 = {"w": torch.zeros(300, 40, dtype=torch.float64), "q": torch.zeros(300, 40)}
    ckptstore.load(f64, url)
    assert torch.equal(f64["w"], w.double())


def test_strict_dtype_keeps_the_old_refusal(tmp_path):
    url = str(tmp_path / "s")
    ckptstore.save({"w": torch.ones(4, 4)}, url, step=1)
    bf = {"w": torch.zeros(4, 4, dtype=torch.bfloat16)}
    with pytest.raises(errors.MismatchError, match="dtype mismatch for 'w'"):
        ckptstore.load(bf, url, strict_dtype=True)
    assert torch.equal(bf["w"], torch.zeros(4, 4, dtype=torch.bfloat16))  # untouched
    with pytest.raises(errors.MismatchError, match="shape mismatch"):  # shapes still must match
        ckptstore.load({"w": torch.zeros(4, 5, dtype=torch.bfloat16)}, url)
