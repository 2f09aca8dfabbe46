"""The safetensors header codec: what it writes is what the safetensors package reads, what it
reads of the package's files points at each tensor's bytes, and hostile bytes raise a
CkptStoreError that names the file."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ckptstore.codecs.safetensors_header import (
    MAX_HEADER_BYTES,
    decode_header,
    encode_header,
    read_header,
)
from ckptstore.errors import CkptStoreError, CodecError


def _file(tmp_path, header, data=b"", name="x.safetensors", raw=None):
    """A file of the given header (a JSON-able value, or ``raw`` bytes) and data."""
    head = raw if raw is not None else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def test_written_headers_are_read_by_the_safetensors_package(tmp_path):
    tensors = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "ids": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 7), dtype=np.float16),
        "flag": np.array([True, False, True]),
    }
    dtypes = {"w": "float32", "ids": "int64", "empty": "float16", "flag": "bool"}
    head, nbytes = encode_header(
        [(k, dtypes[k], v.shape) for k, v in tensors.items()], {"format": "pt"}
    )
    assert len(head) % 8 == 0  # the data starts aligned
    path = tmp_path / "m.safetensors"
    path.write_bytes(head + b"".join(v.tobytes() for v in tensors.values()))
    assert nbytes == sum(v.nbytes for v in tensors.values())

    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(loaded[k], v)
    header = read_header(str(path))
    assert header.metadata == {"format": "pt"}
    assert [e.name for e in header.tensors] == list(tensors)  # file order


def test_read_offsets_point_at_each_tensors_bytes(tmp_path):
    tensors = {
        "a": np.random.default_rng(0).standard_normal(1001).astype(np.float16),
        "b": np.arange(30, dtype=np.int32).reshape(5, 6),
        "c": np.arange(7, dtype=np.uint8),
    }
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    data = path.read_bytes()
    header = decode_header(data, len(data), str(path))
    assert header.metadata == {"k": "v"}
    by_name = {e.name: e for e in header.tensors}
    for k, v in tensors.items():
        e = by_name[k]
        assert e.shape == v.shape and e.nbytes == v.nbytes
        assert data[e.begin : e.end] == v.tobytes()
    assert by_name["a"].dtype == "float16" and by_name["a"].code == "F16"


def test_reading_a_header_reads_no_tensor_bytes(tmp_path):
    head, nbytes = encode_header([("big", "float32", [1 << 20])])
    blob = head + bytes(nbytes)

    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, n=-1):
            out = super().read(n)
            Counting.read_bytes += len(out)
            return out

    header = read_header("big.safetensors", Counting(blob))
    assert header.tensors[0].nbytes == nbytes
    assert Counting.read_bytes == len(head)


HOSTILE = {
    "length beyond the file": (None, b"", "beyond the file"),
    "length beyond the limit": (None, b"", "exceeds"),
    "a JSON list": (b"[1, 2]", b"", "not an object"),
    "not JSON": (b"{nope", b"", "not UTF-8 JSON"),
    "not UTF-8": (b'{"\xff": 1}', b"", "not UTF-8 JSON"),
    "a repeated name": (
        b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
        b' "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}',
        b"xx",
        "appears twice",
    ),
    "an unknown dtype": (
        {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
        16,
        "F128",
    ),
    "offsets out of range": (
        {"a": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}},
        8,
        "outside",
    ),
    "offsets reversed": (
        {"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 2]}},
        8,
        "outside",
    ),
    "overlapping tensors": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        12,
        "overlap",
    ),
    "a shape that is not the offsets' size": (
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        8,
        "is not the 8 bytes",
    ),
    "a negative dimension": (
        {"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}},
        0,
        "shape",
    ),
    "offsets that are not ints": (
        {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1.0]}},
        1,
        "data_offsets",
    ),
    "metadata that is not strings": ({"__metadata__": {"step": 3}}, 0, "__metadata__"),
    "an entry that is not an object": ({"a": [1, 2]}, 0, "not a JSON object"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_headers_raise_an_error_naming_the_file(tmp_path, case):
    header, data, words = HOSTILE[case]
    path = tmp_path / "hostile.safetensors"
    if case == "length beyond the file":
        path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    elif case == "length beyond the limit":
        with open(path, "wb") as f:  # a sparse file: nothing of its size is written
            f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
            f.truncate(8 + MAX_HEADER_BYTES + 1)
    else:
        raw = header if isinstance(header, bytes) else None
        data = data if isinstance(data, bytes) else bytes(data)
        path = _file(tmp_path, header, data, name=path.name, raw=raw)
    with pytest.raises(CodecError, match=words) as err:
        read_header(str(path))
    assert isinstance(err.value, CkptStoreError) and isinstance(err.value, ValueError)
    assert str(path) in str(err.value)
    with open(path, "rb") as f:
        blob = f.read(1 << 16)  # the start is enough: the rest is never read
    with pytest.raises(CodecError, match=words):
        decode_header(blob, path.stat().st_size, str(path))


def test_a_file_shorter_than_the_length_is_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CodecError, match="short.safetensors"):
        read_header(str(path))


@pytest.mark.parametrize(
    "tensors, words",
    [
        ([("z", "complex128", [2])], "no dtype"),
        ([("__metadata__", "float32", [2])], "cannot be written"),
        ([("a", "float32", [2]), ("a", "float32", [2])], "cannot be written"),
    ],
)
def test_headers_safetensors_cannot_hold_are_refused(tensors, words):
    with pytest.raises(ValueError, match=words):
        encode_header(tensors)


def test_import_of_a_file_with_a_hostile_header_names_the_file(tmp_path) -> None:
    from ckptstore.errors import CkptStoreError
    from ckptstore.transfer import read_weights

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")  # a header length past the file
    with pytest.raises(CkptStoreError, match="model.safetensors"):
        read_weights(str(bad))
