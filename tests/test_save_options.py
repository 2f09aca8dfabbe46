"""One SaveOptions value for every save entry point: keywords and the value mix, unknown
names are refused, and each entry point honours what it is given."""

from __future__ import annotations

import traceback

import pytest
import torch

import ckptstore
from ckptstore import SaveOptions
from ckptstore.errors import UnsupportedValueError


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(256, 64, generator=g), "b": torch.zeros(64)}


def test_keyword_wins_over_options_value() -> None:
    base = SaveOptions(quantize="int8", keep_last=2)
    built = SaveOptions.build(base, quantize=None)
    assert built.quantize is None and built.keep_last == 2
    assert base.quantize == "int8"  # frozen: the caller's value is untouched


@pytest.mark.parametrize(
    "call",
    [
        lambda url: ckptstore.save(_state(), url, step=1, quantise="int8"),
        lambda url: ckptstore.async_save(_state(), url, step=1, quantise="int8"),
        lambda url: ckptstore.Writer(url, step=1, quantise="int8"),
    ],
    ids=["save", "async_save", "Writer"],
)
def test_unknown_option_is_a_type_error_naming_the_fields(tmp_path, call) -> None:
    with pytest.raises(TypeError, match="'quantise'.*quantize"):
        call(str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"keep_last": 0}, ValueError),
        ({"keep_last": True}, ValueError),
        ({"overwrite": "yes"}, TypeError),
        ({"chunk_bytes": "4M"}, TypeError),
        ({"storage_options": ["key"]}, TypeError),
        ({"parent": 3}, TypeError),
    ],
)
def test_invalid_values_are_refused_at_construction(fields, error) -> None:
    with pytest.raises(error):
        SaveOptions(**fields)


def test_options_value_reaches_the_save(tmp_path) -> None:
    url = str(tmp_path / "s")
    opts = SaveOptions(quantize="bf16", chunk_bytes=16 * 1024, settings=ckptstore.Settings())
    info = ckptstore.save(_state(), url, step=1, options=opts)
    report = ckptstore.Store(url).inspect(step=1)
    codecs = {t.fqn: t.codec for t in report.tensors}
    assert "bf16" in codecs["w"]  # quantize came from the value
    assert info.chunks == 4  # 64 KiB of fp32 cut in 16 KiB chunks (b goes inline)
    # a keyword beside the value wins: overwrite given only as a keyword
    again = ckptstore.save(_state(), url, step=1, options=opts, overwrite=True)
    assert again.name == info.name


def test_writer_refuses_keep_last_with_the_alternative(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Store\(url\)\.gc\(keep_last=N\)"):
        ckptstore.Writer(str(tmp_path / "s"), step=1, keep_last=3)


def test_async_save_applies_keep_last(tmp_path) -> None:
    url = str(tmp_path / "s")
    settings = ckptstore.Settings(gc_grace=0)
    for step in range(3):
        fut = ckptstore.async_save(
            _state(), url, step=step, options=SaveOptions(keep_last=1, settings=settings)
        )
        info = fut.result()
        assert info.retention is not None
        info.retention.result()
    assert [c.step for c in ckptstore.Store(url).list()] == [2]


def test_passing_a_module_instead_of_its_state_dict_is_one_clear_error(tmp_path) -> None:
    model = torch.nn.Linear(4, 4)
    for call in (
        lambda: ckptstore.save(model, str(tmp_path / "s"), step=1),
        lambda: ckptstore.load(model, str(tmp_path / "s")),
    ):
        with pytest.raises(UnsupportedValueError, match=r"Linear\.state_dict\(\)") as info:
            call()
        text = "".join(traceback.format_exception(info.value))
        assert text.count("state_dict()") == 1  # shown once, not again by a wrapper
    assert not (tmp_path / "s").exists()


def test_single_process_save_error_is_raised_once_without_dcp_wrapper(tmp_path) -> None:
    url = str(tmp_path / "s")
    ckptstore.save(_state(), url, step=1)
    with pytest.raises(ckptstore.CheckpointExistsError) as info:
        ckptstore.save(_state(), url, step=1)
    text = "".join(traceback.format_exception(info.value))
    assert "CheckpointException" not in text
    assert "RANK" not in text
