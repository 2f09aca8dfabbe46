"""Whole-checkpoint compression on real weights stays within 2% of the codec's ratio."""

from __future__ import annotations

import torch

import ckptstore
from tests.test_codecs import _codec_ratio


def test_checkpoint_ratio_close_to_codec_on_minilm(minilm, tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        state = {k: v.to(dtype) for k, v in minilm.items()}
        url = str(tmp_path / str(dtype))
        info = ckptstore.save(state, url, step=1)
        stored_ratio = info.logical_bytes / info.stored_bytes
        codec = _codec_ratio(minilm, dtype)
        assert stored_ratio >= 0.98 * codec, (dtype, stored_ratio, codec)
        loaded = ckptstore.load_full(url)
        for k, v in state.items():
            assert torch.equal(loaded[k], v), k
