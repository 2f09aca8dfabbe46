"""Shared helpers for tests: exact comparison of nested states, small models."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import torch


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Nested equality; tensors bit-exact (NaN payloads included), dtype and shape too."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b)} is not a tensor"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        if a.numel():
            av = a.detach().contiguous().reshape(-1).view(torch.uint8)
            bv = b.detach().contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(av, bv), f"{path}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a)} != {set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def template_like(state: Any) -> Any:
    """A load template with the same structure, every tensor byte set to 0xA5 — so a part
    the load skipped shows up even where the saved values are zeros."""
    if isinstance(state, torch.Tensor):
        out = torch.empty_like(state.contiguous())
        out.reshape(-1).view(torch.uint8).fill_(0xA5) if out.numel() else None
        return out
    if isinstance(state, dict):
        return {k: template_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [template_like(v) for v in state]
    return state


def model_and_optimizer(seed: int = 0, width: int = 256):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(1000, width),
        torch.nn.Linear(width, 4 * width),
        torch.nn.GELU(),
        torch.nn.Linear(4 * width, width),
        torch.nn.LayerNorm(width),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        x = torch.randint(0, 1000, (8, 16))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def run_cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``ckptstore ARGS`` as a subprocess, as a user runs it (``env``: variables added to
    this process's); raises on failure if ``check``."""
    proc = subprocess.run(
        [sys.executable, "-m", "ckptstore.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc
