"""``ckptstore demo``: train a small model, checkpoint it, show sizes, load it back.

A tiny next-token model learns a synthetic sequence task for a few steps with AdamW; after
the first checkpoint it is fine-tuned with the embedding and body frozen (as when adapting a
base model), so later checkpoints share most of their chunks with the first. Running the
demo again on the same store resumes from its latest checkpoint, and saves after the store's
last step. A store whose latest checkpoint the demo cannot resume from (other keys or shapes:
not written by the demo) is refused before anything is loaded or written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from rich.table import Table

from ckptstore.api import load, save
from ckptstore.errors import CheckpointNotFoundError, StoreNotFoundError
from ckptstore.render import console, human_bytes, ratio
from ckptstore.store import Store


class TinyLM(torch.nn.Module):
    """Embedding → two residual MLP blocks with LayerNorm → output head."""

    def __init__(self, vocab: int = 4096, dim: int = 256, hidden: int = 1024) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.LayerNorm(dim),
                torch.nn.Linear(dim, hidden),
                torch.nn.GELU(),
                torch.nn.Linear(hidden, dim),
            )
            for _ in range(2)
        )
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _batch(gen: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, vocab, (16, 1), generator=gen)
    seq = (start + 7 * torch.arange(33)) % vocab  # an arithmetic progression to learn
    return seq[:, :-1], seq[:, 1:]


def _train(model: TinyLM, opt: torch.optim.Optimizer, steps: int, gen: torch.Generator) -> float:
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x, y = _batch(gen, model.head.out_features)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def _state(model: TinyLM, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "meta": {"step": step}}


def _fresh() -> tuple[TinyLM, torch.optim.Optimizer]:
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _freeze_body(model: TinyLM, opt: torch.optim.Optimizer) -> None:
    """Fine-tune only the head from now on (its param group keeps its AdamW state)."""
    for p in [*model.embed.parameters(), *model.blocks.parameters()]:
        p.requires_grad_(False)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _not_resumable(store: Store, name: str, state: dict[str, Any]) -> str | None:
    """Why the demo cannot resume from checkpoint ``name`` (a key of its state missing, or a
    tensor of another shape: a checkpoint the demo did not write), or None if it can. Reads
    the manifest only."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    manifest = store.repo.manifest(name)
    flat, _ = flatten_state_dict(state)
    missing = [k for k in flat if k not in manifest.tensors and k not in manifest.objects]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:3]) + (" …" if len(missing) > 3 else "")
        return f"{len(missing)} of the demo's {len(flat)} keys are not in it ({shown})"
    for key, value in flat.items():
        entry = manifest.tensors.get(key)
        if isinstance(value, torch.Tensor) and (
            entry is None or list(entry.shape) != list(value.shape)
        ):
            held = "a value" if entry is None else f"shape {list(entry.shape)}"
            return f"{key!r} is {held} there, the demo's is of shape {list(value.shape)}"
    return None


def run_demo(
    url: str,
    *,
    checkpoints: int = 4,
    steps: int = 10,
    storage_options: Mapping[str, Any] | None = None,
) -> bool:
    """Run the demo against the store at ``url``; True if the reloaded state matched."""
    # options first: nothing is printed or written for a bad one
    for option, value in (("checkpoints", checkpoints), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{option} must be a whole number of at least 1, got {value!r}")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model, opt = _fresh()
    _train(model, opt, 1, gen)  # creates the AdamW state so the template is complete
    start = 0
    try:
        store = Store(url, storage_options)
        latest = store.repo.resolve()
    except (StoreNotFoundError, CheckpointNotFoundError):
        console.print(f"new store at {url}")
    else:
        problem = _not_resumable(store, latest, _state(model, opt, 0))
        if problem is not None:  # checked before anything is loaded or written
            raise ValueError(
                f"--url {url} holds checkpoints the demo did not write: it cannot resume from "
                f"the latest, {latest!r}: {problem}. Give the demo a fresh --url (nothing "
                "was written)"
            )
        info = load(_state(model, opt, 0), url, name=latest, storage_options=storage_options)
        # after the store's last step, so no step of the demo meets a checkpoint's name
        start = max((c.step for c in store.list() if c.step is not None), default=0)
        console.print(f"resumed from {info.name} in {url} (read {human_bytes(info.bytes_read)})")
        _freeze_body(model, opt)

    for i in range(checkpoints):
        step = start + (i + 1) * steps
        loss = _train(model, opt, steps, gen)
        state = _state(model, opt, step)
        info = save(state, url, step=step, storage_options=storage_options)
        saved = info.name
        console.print(
            f"step {step:>5}: loss {loss:.3f}, saved {info.name}: "
            f"{human_bytes(info.logical_bytes)} → {human_bytes(info.stored_bytes)}, "
            f"wrote {human_bytes(info.new_bytes)} in {info.seconds:.2f}s"
        )
        if i == 0:
            _freeze_body(model, opt)

    table = Table(title=f"checkpoints in {url}")
    for col in ("checkpoint", "logical", "stored", "ratio", "written", "written/logical"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for c in Store(url, storage_options).list():
        table.add_row(
            c.name,
            human_bytes(c.logical_bytes),
            human_bytes(c.stored_bytes),
            ratio(c.logical_bytes, c.stored_bytes),
            human_bytes(c.new_bytes),
            f"{100 * c.new_bytes / c.logical_bytes:.1f}%" if c.logical_bytes else "-",
        )
    console.print(table)

    expected = state
    model2, opt2 = _fresh()
    _train(model2, opt2, 1, torch.Generator().manual_seed(1))
    loaded = _state(model2, opt2, -1)
    info = load(loaded, url, name=saved, storage_options=storage_options)
    ok = _equal(expected["model"], model2.state_dict()) and _equal(
        expected["optim"]["state"], opt2.state_dict()["state"]
    )
    ok = ok and loaded["meta"] == expected["meta"]
    verdict = "[green]OK[/green]" if ok else "[red]MISMATCH[/red]"
    console.print(
        f"loaded {info.name} into a fresh model: read {human_bytes(info.bytes_read)} in "
        f"{info.objects_read} objects, {info.seconds:.2f}s — bit-exact: {verdict}"
    )
    return ok
