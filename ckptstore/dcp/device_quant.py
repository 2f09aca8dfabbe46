"""The lossy first stages in torch, so a GPU tensor is quantized on its device and only the
quantized bytes (half or a quarter of them) cross to the host.

Each function returns exactly the bytes the numpy codec in ``ckptstore.codecs.quantize``
produces for the same input (tests compare them byte for byte on CPU), so keys, dedup and
decoding do not depend on where a chunk was quantized. Error sums are computed on the device
(same definition, float32 accumulation order may differ in the last bits).
"""

from __future__ import annotations

import torch

from ckptstore.codecs.quantize import (
    CAST_AS_BF16,
    CAST_AS_FP16,
    CAST_HEADER,
    CAST_PATCH_COUNT,
    CAST_PATCHED,
    FP16_MIN_NORMAL,
    INT8_FP16_SCALES,
    INT8_FP32_SCALES,
    INT8_HEADER,
    INT8_RAW,
    MAX_PATCHED_FRACTION,
    Cast,
    Int8Block,
    LossyCodec,
    QuantStats,
)


def supports(codec: LossyCodec) -> bool:
    """Whether ``codec`` has a device implementation byte-identical to its numpy one."""
    if isinstance(codec, Cast):
        return codec.source == "float32"
    if isinstance(codec, Int8Block):
        return codec.source in ("float32", "bfloat16", "float16")
    return False


def quantize(codec: LossyCodec, x: torch.Tensor) -> tuple[bytes, QuantStats]:
    """Run ``codec``'s lossy stage on the 1-D tensor ``x`` where it lives."""
    if isinstance(codec, Cast):
        return _cast(codec, x)
    if isinstance(codec, Int8Block):
        return _int8(codec, x)
    raise TypeError(f"no device implementation for {codec!r}")


def _host(t: torch.Tensor) -> bytes:
    return t.contiguous().cpu().numpy().tobytes()


def _stats(x: torch.Tensor, approx: torch.Tensor, fallback: int) -> QuantStats:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        x, approx = x[finite], approx[finite]
    if x.numel() == 0:
        return QuantStats(fallback=fallback, chunks=1)
    diff = x - approx
    return QuantStats(
        sq_err=float(torch.dot(diff, diff)),
        sq_ref=float(torch.dot(x, x)),
        max_abs=float(diff.abs().max()),
        fallback=fallback,
        chunks=1,
    )


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 → bfloat16 bit patterns as int16, round to nearest even, NaN kept quiet."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    r = torch.where(torch.isnan(x), ((u >> 16) | 0x0040) & 0xFFFF, r)
    return torch.where(r >= 0x8000, r - 0x10000, r).to(torch.int16)


def _widen_bf16(bits: torch.Tensor) -> torch.Tensor:
    return ((bits.to(torch.int32) & 0xFFFF) << 16).view(torch.float32)


def _cast(codec: Cast, x: torch.Tensor) -> tuple[bytes, QuantStats]:
    x = x.to(torch.float32)
    fallback, kind = 0, CAST_AS_BF16
    if codec.target == "float16":
        body = x.to(torch.float16)
        tiny = (x != 0) & (x.abs() < FP16_MIN_NORMAL)
        bad = (torch.isfinite(x) & ~torch.isfinite(body)) | tiny
        if int(bad.sum()) * MAX_PATCHED_FRACTION <= x.numel():
            kind, approx = CAST_AS_FP16, body.to(torch.float32)
        else:
            fallback = 1
    if kind == CAST_AS_BF16:
        body = _bf16_bits(x)
        approx = _widen_bf16(body)
        bad = (torch.isfinite(x) & ~torch.isfinite(approx)) | ((x != 0) & (approx == 0))
    idx = torch.nonzero(bad).flatten()
    if idx.numel() == 0:
        return CAST_HEADER.pack(kind, 0) + _host(body), _stats(x, approx, fallback)
    values = x[idx]
    approx = approx.clone()
    approx[idx] = values
    out = b"".join(
        [
            CAST_HEADER.pack(kind | CAST_PATCHED, 0),
            _host(body),
            _host(idx.to(torch.int32)),  # < 2**31: the same bytes as numpy's uint32
            _host(values),
            CAST_PATCH_COUNT.pack(idx.numel()),
        ]
    )
    return out, _stats(x, approx, 1)


def _int8(codec: Int8Block, x: torch.Tensor) -> tuple[bytes, QuantStats]:
    n = x.numel()
    if not bool(torch.isfinite(x).all()):  # kept exact, as the numpy codec does
        xf = x.to(torch.float32)
        raw = _host(x.contiguous().view(torch.uint8))  # the source bytes (bf16 included)
        return INT8_HEADER.pack(INT8_RAW, n) + raw, _stats(xf, xf, 1)
    xf = x.to(torch.float32)
    blocks = -(-n // codec.block)
    padded = torch.zeros(blocks * codec.block, dtype=torch.float32, device=x.device)
    padded[:n] = xf
    b = padded.view(blocks, codec.block)
    scale = b.abs().amax(dim=1) / 127.0
    s16 = scale.to(torch.float16)
    low = s16.to(torch.float32) < scale  # rounded down: step up one ulp (positive values)
    s16 = (s16.view(torch.int16) + low.to(torch.int16)).view(torch.float16)
    fits = torch.isfinite(s16) & ((scale == 0) | (s16.to(torch.float32) >= FP16_MIN_NORMAL))
    if bool(fits.all()):
        kind, stored, s = INT8_FP16_SCALES, s16, s16.to(torch.float32)
    else:
        kind, stored, s = INT8_FP32_SCALES, scale, scale
    safe = torch.where(s == 0, torch.ones_like(s), s)[:, None]
    q = torch.clamp(torch.round(b / safe), -127, 127).to(torch.int8)
    approx = (q.to(torch.float32) * s[:, None]).reshape(-1)[:n]
    out = INT8_HEADER.pack(kind, n) + _host(q) + _host(stored)
    return out, _stats(xf, approx, 0)


__all__ = ["quantize", "supports"]
