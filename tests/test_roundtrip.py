"""Exact roundtrips through save/load/load_full and through dcp with Writer/Reader."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptstore
from tests.helpers import assert_same, model_and_optimizer, template_like

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    size = torch.tensor([], dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return raw.bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_bit_exact(store_url, dtype):
    # big enough to be chunked (several chunks), plus a small inline one and a 0-d one
    state = {
        "big": _tensor(dtype, (300, 1111), 1),
        "small": _tensor(dtype, (7, 3), 2),
        "scalar": _tensor(dtype, (), 3),
        "empty": _tensor(dtype, (0, 5), 4),
    }
    ckptstore.save(state, store_url, step=1, chunk_bytes=64 * 1024)
    template = template_like(state)
    ckptstore.load(template, store_url)
    assert_same(state, template)
    assert_same(state, ckptstore.load_full(store_url, step=1))


def test_training_state_roundtrip(store_url):
    model, opt = model_and_optimizer()
    state = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "extra": {"epoch": 3, "lr": 1e-3, "tag": "run-7", "history": [1, 2.5, "x"], "none": None},
    }
    info = ckptstore.save(state, store_url, step=100)
    assert info.name == "step-000000000100" and info.step == 100
    assert info.logical_bytes == sum(
        t.numel() * t.element_size()
        for t in [
            *model.state_dict().values(),
            *(v for s in opt.state_dict()["state"].values() for v in s.values()),
        ]
    )
    assert 0 < info.stored_bytes < info.logical_bytes
    assert info.new_bytes == info.stored_bytes
    model2, opt2 = model_and_optimizer(seed=1)
    target = {
        "model": model2.state_dict(),
        "optim": opt2.state_dict(),
        "extra": {"epoch": 0, "lr": 0.0, "tag": "", "history": [0, 0.0, ""], "none": None},
    }
    ckptstore.load(target, store_url)
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(state["extra"], target["extra"])
    opt2.load_state_dict(target["optim"])
    assert_same(opt.state_dict(), opt2.state_dict())

    full = ckptstore.load_full(store_url)
    assert_same(state["model"], full["model"])
    assert_same(state["extra"], full["extra"])
    assert_same(opt.state_dict()["state"], full["optim"]["state"])


def test_non_contiguous_views_and_tied_weights(store_url):
    base = torch.arange(60_000, dtype=torch.float32).reshape(300, 200)
    emb = torch.randn(5000, 64)
    state = {
        "transposed": base.t(),
        "strided": base[::3, 1::2],
        "embed": emb,
        "head": emb,  # tied: the same tensor under two names
    }
    info = ckptstore.save(state, store_url, name="views")
    template = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}
    ckptstore.load(template, store_url, name="views")
    for k in state:
        assert torch.equal(template[k], state[k]), k
    # the tied copy is written once: of "embed" and "head", one wrote, the other shared
    report = ckptstore.Store(store_url).inspect("views")
    tied = {t.fqn: t for t in report.tensors if t.fqn in ("embed", "head")}
    assert tied["embed"].chunks > 0 and tied["embed"].stored_bytes == tied["head"].stored_bytes
    assert sorted(t.shared_bytes for t in tied.values()) == [0, tied["head"].stored_bytes]
    assert info.new_bytes == info.stored_bytes - tied["head"].stored_bytes


def test_dcp_writer_reader(store_url):
    model, _ = model_and_optimizer()
    sd = model.state_dict()
    dcp.save(sd, storage_writer=ckptstore.Writer(store_url, step=3))
    target = template_like(sd)
    dcp.load(target, storage_reader=ckptstore.Reader(store_url, step=3))
    assert_same(sd, target)
    target2 = template_like(sd)
    dcp.load(target2, storage_reader=ckptstore.Reader(store_url))  # latest
    assert_same(sd, target2)


def test_dcp_checkpoint_id_names_the_checkpoint(store_url):
    sd = {"w": torch.randn(10, 10)}
    writer = ckptstore.Writer(store_url, name="unused")
    dcp.save(sd, checkpoint_id="from-dcp", storage_writer=writer)
    assert [c.name for c in ckptstore.Store(store_url).list()] == ["from-dcp"]
    out = {"w": torch.zeros(10, 10)}
    dcp.load(out, checkpoint_id="from-dcp", storage_reader=ckptstore.Reader(store_url))
    assert torch.equal(out["w"], sd["w"])


def test_latest_and_by_name(store_url):
    for step in (5, 10, 15):
        ckptstore.save({"x": torch.full((4,), float(step))}, store_url, step=step)
    ckptstore.save({"x": torch.full((4,), -1.0)}, store_url, name="best")
    store = ckptstore.Store(store_url)
    listed = store.list()
    assert [c.name for c in listed][:3] == [f"step-{s:012d}" for s in (5, 10, 15)]
    assert [c.step for c in listed] == [5, 10, 15, None]
    assert all(c.created > 0 and c.logical_bytes == 16 for c in listed)
    assert store.latest() == "best"
    out = {"x": torch.zeros(4)}
    ckptstore.load(out, store_url, step=10)
    assert out["x"].tolist() == [10.0] * 4
    ckptstore.load(out, store_url, name="best")
    assert out["x"].tolist() == [-1.0] * 4
    ckptstore.load(out, store_url)
    assert out["x"].tolist() == [-1.0] * 4


def test_storage_options_reach_fsspec(tmp_path):
    url = f"file://{tmp_path}/s"
    ckptstore.save({"a": torch.ones(3)}, url, step=1, storage_options={"auto_mkdir": True})
    assert ckptstore.load_full(url, storage_options={"auto_mkdir": True})["a"].tolist() == [1, 1, 1]


def test_load_returns_what_was_read(store_url):
    state = {"w": torch.randn(2048, 512)}
    info = ckptstore.save(state, store_url, step=1, chunk_bytes=1 << 20)
    out = {"w": torch.zeros(2048, 512)}
    li = ckptstore.load(out, store_url)
    assert li.name == "step-000000000001"
    assert li.objects_read == 4  # 4 MiB tensor in 1 MiB chunks
    assert li.bytes_read == info.stored_bytes - info.manifest_bytes


def test_get_state_dict_style_model_and_optimizer(store_url):
    """The state dict shape DCP users have: get_state_dict → save → load → set_state_dict."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = model_and_optimizer()
    msd, osd = get_state_dict(model, opt)
    ckptstore.save({"model": msd, "optim": osd}, store_url, step=1)
    model2, opt2 = model_and_optimizer(seed=5)
    msd2, osd2 = get_state_dict(model2, opt2)
    target = {"model": msd2, "optim": osd2}
    ckptstore.load(target, store_url)
    set_state_dict(model2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"])
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict(), opt2.state_dict())
    assert_same(osd, ckptstore.load_full(store_url)["optim"])


def test_repeated_chunk_content_fills_every_row_range(store_url):
    """Chunks with equal content (zero moments, frozen rows) sit at several row ranges of
    one tensor: each range must be filled, though the object is fetched once."""
    z = torch.zeros(4096, 1024)
    z[3000:3100] = 2.0  # one chunk differs
    ckptstore.save({"z": z, "o": torch.zeros(64, 1024)}, store_url, step=0, chunk_bytes=1 << 20)
    out = {"z": torch.ones(4096, 1024), "o": torch.ones(64, 1024)}
    info = ckptstore.load(out, store_url, step=0)
    assert torch.equal(out["z"], z) and torch.equal(out["o"], torch.zeros(64, 1024))
    # 16 chunks of 256 rows in z: the zero chunk once, the two touched by rows 3000-3100,
    # and o's one chunk (zero too, but a different length so a different key)
    assert info.objects_read == 4
