"""Manifest decoding is total: checksum-valid bytes give a fully validated manifest or a
ManifestError naming the manifest and the field (docs/format.md, "Validation")."""

from __future__ import annotations

import copy
import itertools
import math
import sys
from collections import Counter

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptstore.codecs.pipeline import default_pipeline
from ckptstore.errors import (
    CkptStoreError,
    FormatVersionError,
    ManifestCodecError,
    ManifestError,
    UnknownCodecError,
)
from ckptstore.store.manifest import (
    Blob,
    ChunkRef,
    Manifest,
    SchemaError,
    Shard,
    TensorEntry,
    _check_tiling,
)
from tests.test_fuzz import reframe, sample_store

WHERE = "checkpoints/bad.msgpack"
F32 = default_pipeline("float32").config


@pytest.fixture
def d() -> dict:
    """The sample manifest as format-1 maps (one per shard): fields to break one by one.
    Format 2 (shard tables) is checked the same way in test_shard_table.py."""
    return msgpack.unpackb(sample_store().manifest.encode(format=1)[12:], raw=False)


def _decode(d: dict) -> Manifest:
    return Manifest.decode(reframe(msgpack.packb(d, use_bin_type=True)), WHERE)


def _refused(d: dict, match: str, cls: type[Exception] = ManifestError) -> str:
    with pytest.raises(cls, match=match) as info:
        _decode(d)
    assert isinstance(info.value, ManifestError)
    assert WHERE in str(info.value)
    return str(info.value)


def _codec_index(d: dict, chain: list) -> int:
    if chain not in d["codecs"]:
        d["codecs"].append(chain)
    return d["codecs"].index(chain)


def test_sample_decodes(d):
    m = _decode(d)
    assert set(m.tensors) >= {"model.w", "model.grid", "model.empty"}
    assert Manifest.decode(m.encode(), WHERE) == m


# -- malformed manifests are refused with the field and value named ---------------------


def test_tensors_not_a_map(d):
    d["tensors"] = 5
    _refused(d, r"tensors: expected a map, got int 5")


def test_objects_not_a_map(d):
    d["objects"] = 5
    _refused(d, r"objects: expected a map, got int 5")


def test_planner_data_a_list(d):
    d["planner_data"] = [["model", "w"]]
    _refused(d, r"planner_data: expected a map, got list")


def test_codec_id_a_list(d):
    d["codecs"][0][0]["id"] = ["bytegroup"]
    msg = _refused(d, r"\.codec: unknown codec id \['bytegroup'\]", ManifestCodecError)
    assert "tensors['model.w'].shards[0]" in msg


def test_unknown_codec_names_tensor_and_manifest(d):
    d["codecs"][0][0]["id"] = "brotli-9000"
    with pytest.raises(UnknownCodecError, match="brotli-9000") as info:
        _decode(d)
    assert isinstance(info.value, ManifestError)  # unreadable: scan/ls skip it
    assert "tensors['model.w'].shards[0].codec" in str(info.value) and WHERE in str(info.value)


def test_overlapping_shard_boxes(d):
    shards = d["tensors"]["model.w"]["shards"]
    shards[1]["offsets"] = [16, 0]  # rows 16..48 overlap rows 0..32; rows 48..64 uncovered
    _refused(d, r"tensors\['model.w'\]\.shards: box \[16, 0\]\+\[32, 16\] .*overlaps")


def test_overlapping_boxes_in_a_grid(d):
    shards = d["tensors"]["model.grid"]["shards"]
    shards[3]["offsets"] = [1, 3]  # over the box at [0, 3]
    _refused(d, r"tensors\['model.grid'\]\.shards: .* overlaps")


def test_uncovered_rows(d):
    shards = d["tensors"]["model.w"]["shards"]
    del shards[1]
    _refused(d, r"tensors\['model.w'\]\.shards: the boxes cover 512 of 1024 elements")


def test_tensor_without_shards(d):
    d["tensors"]["model.w"]["shards"] = []
    _refused(d, r"tensors\['model.w'\]\.shards: none, for a tensor of 1024 elements")


def test_empty_tensor_needs_no_shards(d):
    d["tensors"]["model.empty"]["shards"] = []
    assert _decode(d).tensors["model.empty"].shards == []


def test_changed_codec_index(d):
    shard = d["tensors"]["model.w"]["shards"][0]
    shard["codec"] = _codec_index(d, default_pipeline("int64").config)
    _refused(d, r"shards\[0\]\.codec: bytegroup width 8 does not fit float32")


def test_codec_index_of_a_quantizer_for_another_dtype(d):
    q = d["tensors"]["model.q"]["shards"][0]["codec"]
    d["tensors"]["model.h"]["shards"][0]["codec"] = q  # int8 of float32 on a bfloat16 tensor
    _refused(
        d, r"tensors\['model.h'\]\.shards\[0\]\.codec: int8/64 quantizes float32, not bfloat16"
    )


def test_codec_index_outside_the_table(d):
    d["tensors"]["model.b"]["shards"][0]["codec"] = len(d["codecs"])
    _refused(d, r"tensors\['model.b'\]\.shards\[0\]\.codec: index \d+ is outside the codec table")


def test_lossy_codec_on_an_object(d):
    d["objects"]["optim.lr"]["codec"] = d["tensors"]["model.q"]["shards"][0]["codec"]
    _refused(d, r"objects\['optim.lr'\]\.codec: int8/64 cannot encode an object value")


# -- types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["codecs"].__setitem__(0, {"id": "zstd"}), r"codecs\[0\]: expected an array"),
        (lambda d: d["codecs"][1].__setitem__(0, [1, 2]), r"codecs\[1\]\[0\]: expected a map"),
        (lambda d: d["codecs"][0][1].update(level=1.0), r"is not canonical"),
        (lambda d: d["codecs"][0][1].pop("entropy"), r"is not canonical"),
        (lambda d: d["codecs"][0][1].update(extra=1), r"bad config for codec 'zstd'"),
        (lambda d: d["codecs"][0][1].update(level=float("inf")), r"bad config for codec 'zstd'"),
        (lambda d: d["tensors"].__setitem__("x", 5), r"tensors\['x'\]: expected a map"),
        (
            lambda d: d["tensors"]["model.w"]["shards"][0].pop("sizes"),
            r"tensors\['model.w'\]\.shards\[0\]: missing required field 'sizes'",
        ),
        (
            lambda d: d["tensors"]["model.w"]["shards"][0].update(nbytes=True),
            r"shards\[0\]\.nbytes: expected an int, got bool",
        ),
        (
            lambda d: d["tensors"]["model.w"]["shards"][0].update(offsets=[0, -1]),
            r"shards\[0\]\.offsets\[1\]: -1 is outside",
        ),
        (
            lambda d: d["tensors"]["model.w"].update(shape=[64, 2**64 - 1]),
            r"tensors\['model.w'\]\.shape\[1\]: \d+ is outside",
        ),
        (
            lambda d: d["tensors"]["model.w"].update(requires_grad=1),
            r"requires_grad: expected a bool",
        ),
        (lambda d: d["tensors"]["model.w"].update(dtype="float128"), r"unknown dtype 'float128'"),
        (
            lambda d: d["tensors"]["model.w"]["shards"][0]["chunks"][0].__setitem__(4, 1),
            r"chunks\[0\]\[4\]: expected a bool",
        ),
        (
            lambda d: d["tensors"]["model.w"]["shards"][0]["chunks"][0].extend([[], 0]),
            r"chunks\[0\]: expected 5 or 6 elements, got 7",
        ),
        (
            lambda d: d["tensors"]["model.w"]["shards"][0]["chunks"][0].append(0),
            r"chunks\[0\]\[5\]: expected an array",
        ),
        (
            lambda d: d["tensors"]["model.w"]["shards"][0]["chunks"][0].append([b"x"]),
            r"chunks\[0\]\[5\]\[0\]: bad base key",
        ),
        (
            lambda d: d["tensors"]["model.w"]["shards"][0]["chunks"][1].__setitem__(1, 9),
            r"chunks\[1\]: rows \[9, 16\) do not continue the chunk rows at 8",
        ),
        (
            lambda d: d["tensors"]["model.w"]["shards"][0].update(inline=[1]),
            r"shards\[0\]\.inline: expected bin",
        ),
        (lambda d: d["objects"].__setitem__("x", []), r"objects\['x'\]: expected a map"),
        (
            lambda d: d["objects"]["optim.lr"].update(rows=1),
            r"objects\['optim.lr'\]\.rows: 1 rows, expected \d+ \(one per byte\)",
        ),
        (lambda d: d.update(step=True), r"step: expected an int, got bool"),
        (lambda d: d.update(step=-5), r"step: -5 is outside"),
        (lambda d: d.update(created="yesterday"), r"created: expected a number"),
        (lambda d: d.update(created=float("nan")), r"created: nan is not finite"),
        (lambda d: d.update(name="../x"), r"name: invalid checkpoint name"),
        (lambda d: d.update(writer=3), r"writer: expected a str"),
        (lambda d: d.update(user=[]), r"user: expected a map"),
        (lambda d: d.update(int_keys={}), r"int_keys: expected an array"),
        (lambda d: d.update(format=True), r"format: expected an int, got bool"),
        (lambda d: d.pop("tensors"), r"missing required field 'tensors'"),
    ],
)
def test_wrong_types_are_refused(d, mutate, match):
    mutate(d)
    _refused(d, match)


def test_unknown_format_version(d):
    d["format"] = 3
    with pytest.raises(FormatVersionError, match="format version 3"):
        _decode(d)


# -- planner_data and int_keys ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "match"),
    [
        (["extra", 10**9], r"planner_data\['extra.1'\]\[1\]: list index 1000000000 is outside"),
        (["extra", -1], r"planner_data\['extra.1'\]\[1\]: list index -1 is outside"),
        (["extra", True], r"planner_data\['extra.1'\]\[1\]: expected a str or int, got bool"),
        ([], r"planner_data\['extra.1'\]: empty path"),
        ([0], r"planner_data\['extra.1'\]\[0\]: 0 is a list index where another path"),
        (["extra", "k"], r"planner_data\['extra.1'\]\[1\]: 'k' is a dict key where another path"),
        (["extra", 0], r"planner_data\['extra.1'\]: path \['extra', 0\] is taken by another"),
        (["model", "w", "x"], r"path \['model', 'w', 'x'\] runs through another value"),
        ("extra", r"planner_data\['extra.1'\]: expected an array, got str"),
    ],
)
def test_bad_planner_paths(d, path, match):
    d["planner_data"]["extra.1"] = path
    _refused(d, match)


def test_planner_path_prefix_of_another(d):
    d["planner_data"]["model.w"] = ["model"]  # 'model' holds w and has children b, c, …
    _refused(d, r"planner_data\[.*\]: path \[.*\] (runs through|is taken by) another value")


def test_int_keys_must_name_int_keys(d):
    d["int_keys"] = [["optim", "state", "zero"]]
    _refused(d, r"int_keys\[0\]: 'zero' is not an int dict key")
    d["int_keys"] = [[]]
    _refused(d, r"int_keys\[0\]: empty path")
    d["int_keys"] = [["optim", ["state"]]]
    _refused(d, r"int_keys\[0\]\[1\]: expected a str or int, got list")


def test_int_key_and_str_key_may_share_a_dict(d):
    d["planner_data"]["extra.1"] = ["optim", "state", "00"]  # str '00' beside int 0
    d["planner_data"]["extra.0"] = ["optim", "state", 0, "x"]
    _refused(d, r"planner_data\['extra.0'\]\[2\]: 0 is a list index where another path")
    d["planner_data"]["extra.0"] = ["optim", "state", "1", "x"]  # a str key: fine
    _decode(d)


# -- sizes --------------------------------------------------------------------------------


def test_huge_shape_whose_shards_do_not_add_up(d):
    d["tensors"]["model.w"]["shape"] = [2**40, 16]
    _refused(d, r"tensors\['model.w'\]\.shards: the boxes cover 1024 of 17592186044416")


def test_huge_shape_beyond_any_tensor(d):
    t = d["tensors"]["model.w"]
    t["shape"] = [2**62, 16]
    _refused(d, r"tensors\['model.w'\]\.shape: .* more than any tensor can hold")


def test_huge_chunk_claim_from_a_small_object(d):
    """One 300-byte chunk object cannot hold 4 TiB: the claim is refused before a read."""
    t = d["tensors"]["model.w"]
    rows = 2**36
    t["shape"] = [rows, 16]
    shard = t["shards"][0]
    t["shards"] = [shard]
    shard["sizes"] = [rows, 16]
    shard["nbytes"] = rows * 64
    shard["rows"] = rows
    shard["chunks"] = [[shard["chunks"][0][0], 0, rows, 300, True]]
    _refused(d, r"chunks\[0\]: 4398046511104 raw bytes cannot come from a chunk object of 300")


def test_nbytes_must_match_the_box(d):
    d["tensors"]["model.b"]["shards"][0]["nbytes"] = 60
    _refused(d, r"tensors\['model.b'\]\.shards\[0\]\.nbytes: holds 60 bytes, expected 64")


def test_rows_anything_when_nbytes_is_zero(d):
    for rows in (0, 1, 5):
        d["tensors"]["model.empty"]["shards"][0]["rows"] = rows
        _decode(d)


def test_unknown_keys_are_ignored(d):
    d["future"] = {"x": 1}
    d["tensors"]["model.w"]["future"] = 1
    d["tensors"]["model.w"]["shards"][0]["future"] = [1]
    _decode(d)


# -- tiling at scale ----------------------------------------------------------------------


def _tiled(shape: list[int], boxes: list[tuple[list[int], list[int]]]) -> Manifest:
    shards = []
    for off, size in boxes:
        n = size[0] * size[1]
        blob = Blob(F32, n * 4, size[0], chunks=[ChunkRef(bytes(16), 0, size[0], 64, True)])
        shards.append(Shard(off, size, blob))
    return Manifest("big", 1, 0.0, {"w": TensorEntry("float32", shape, shards)}, {})


def _tiling_lines(shape: list[int], boxes: list) -> int:
    """Lines of ``_check_tiling`` (and the lambdas and comprehensions it runs) executed while
    a manifest of ``boxes`` is decoded: a measure of its work that no busy machine changes."""
    from ckptstore.store import manifest as manifest_mod

    data = _tiled(shape, boxes).encode()
    code = manifest_mod._check_tiling.__code__
    count = 0

    def local(frame, event, arg):
        nonlocal count
        count += event == "line"
        return local

    def tracer(frame, event, arg):
        if frame.f_code is code or (frame.f_back is not None and frame.f_back.f_code is code):
            return local
        return None

    sys.settrace(tracer)
    try:
        Manifest.decode(data, "big")
    finally:
        sys.settrace(None)
    return count


def _boxes(layout: str, n: int) -> tuple[list[int], list]:
    if layout == "rows":
        return [2 * n, 8], [([2 * i, 0], [2, 8]) for i in range(n)]
    if layout == "columns":
        return [8, 2 * n], [([0, 2 * i], [8, 2]) for i in range(n)]
    side = int(n**0.5)
    return [2 * side, 2 * side], [
        ([2 * i, 2 * j], [2, 2]) for i in range(side) for j in range(side)
    ]


@pytest.mark.parametrize("layout", ["rows", "columns", "grid"])
def test_tiling_check_scales_with_thousands_of_shards(layout):
    """Boxes split along one dimension are checked by numpy over the shard table (no
    per-shard line runs); a grid by the sweep, which grows like n log n, not n²: 4× the
    shards cost under 6× the work (counted in executed lines, not seconds). An overlap
    among 4096 shards is found either way."""
    small = _tiling_lines(*_boxes(layout, 1024))
    shape, boxes = _boxes(layout, 4096)
    big = _tiling_lines(shape, boxes)
    if layout == "grid":
        assert 0 < small and big < 6 * small, (small, big)
    else:
        assert small == big == 0
    boxes[-1], boxes[-2] = (boxes[-2][0], boxes[-1][1]), boxes[-2]  # last box onto its neighbour
    with pytest.raises(ManifestError, match="overlaps"):
        Manifest.decode(_tiled(shape, boxes).encode(), "big")


def test_decode_is_total_on_odd_bodies():
    for body in [b"", b"\xc0", b"\x05", msgpack.packb([1, 2]), msgpack.packb({"format": 1})]:
        with pytest.raises(CkptStoreError):
            Manifest.decode(reframe(body), WHERE)


def test_validate_names_fields_for_built_manifests():
    """validate() also checks manifests built in memory (a writer may call it before the
    commit): a ValueError naming the field."""
    m = _tiled([8, 8], [([0, 0], [4, 8])])
    with pytest.raises(ValueError, match=r"tensors\['w'\]\.shards: the boxes cover 32 of 64"):
        m.validate()
    m2 = copy.deepcopy(m)
    m2.tensors["w"].shape = [4, 8]
    m2.validate()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_tiling_check_agrees_with_counting_elements(data):
    """_check_tiling accepts exactly the box sets that cover every element once."""
    ndim = data.draw(st.integers(1, 3))
    shape = [data.draw(st.integers(1, 5)) for _ in range(ndim)]
    boxes = [([0] * ndim, list(shape))]
    for _ in range(data.draw(st.integers(0, 8))):  # a random guillotine tiling
        i = data.draw(st.integers(0, len(boxes) - 1))
        off, size = boxes[i]
        dim = data.draw(st.integers(0, ndim - 1))
        if size[dim] < 2:
            continue
        cut = data.draw(st.integers(1, size[dim] - 1))
        a, b = (off[:], size[:]), (off[:], size[:])
        a[1][dim] = cut
        b[0][dim] += cut
        b[1][dim] -= cut
        boxes[i : i + 1] = [a, b]
    for _ in range(data.draw(st.integers(0, 2))):  # then perhaps break it, inside the shape
        if not boxes:
            break
        i = data.draw(st.integers(0, len(boxes) - 1))
        off, size = boxes[i]
        dim = data.draw(st.integers(0, ndim - 1))
        op = data.draw(st.sampled_from(["move", "resize", "drop", "dup"]))
        if op == "move":
            off[dim] = data.draw(st.integers(0, shape[dim] - size[dim]))
        elif op == "resize":
            size[dim] = data.draw(st.integers(0, shape[dim] - off[dim]))
        elif op == "drop":
            del boxes[i]
        else:
            boxes.append((off[:], size[:]))
    counts: Counter[tuple[int, ...]] = Counter()
    for off, size in boxes:
        counts.update(itertools.product(*(range(o, o + s) for o, s in zip(off, size, strict=True))))
    exact = all(counts[c] == 1 for c in itertools.product(*(range(n) for n in shape)))
    shards = [Shard(off, size, None) for off, size in boxes]  # type: ignore[arg-type]
    try:
        _check_tiling("t", shape, shards, math.prod(shape))
        accepted = True
    except SchemaError:
        accepted = False
    assert accepted == exact, (shape, boxes)
