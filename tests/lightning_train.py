"""A tiny Lightning training run for tests/test_integration_lightning.py.

Imported by the tests (``fit``), and run as a script for the DDP test, because Lightning's
``strategy="ddp"`` launcher starts the other rank by running ``sys.argv`` again:

    python tests/lightning_train.py OUT PHASE [PHASE ...]

Each phase (``straight``: 12 steps; ``part``: 8 steps, and ``trainer.save_checkpoint`` at
step 4; ``resume``: from ``last`` to 12 steps, saving through AsyncCheckpointIO) trains with
2 CPU processes and writes every rank's final model and optimizer state to
``OUT/<phase>-<rank>.pt``, and rank 0 the ModelCheckpoint's view to ``OUT/<phase>-ckpt.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ckptstore from this checkout

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO  # noqa: E402

from ckptstore.integrations.lightning import CkptStoreIO  # noqa: E402

BATCH = 8
SAMPLES = 64  # 8 steps per epoch in one process, 4 per rank with 2 ranks


class Model(L.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).sin() + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


class Recorder(Callback):
    """Keeps the model weights each checkpoint held when Lightning handed it to the
    CheckpointIO, by global step (to compare with what the store holds)."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, torch.Tensor]] = {}

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        self.saved[checkpoint["global_step"]] = {
            k: v.detach().clone() for k, v in checkpoint["state_dict"].items()
        }


class SaveAt(Callback):
    """``trainer.save_checkpoint(path)`` after the batch that reaches ``step``: a checkpoint
    at a named path, taken where a resume continues bit-exactly (an epoch boundary; a
    mid-epoch resume restarts the epoch's data, and one after ``fit`` returned, too)."""

    def __init__(self, step: int, path: str | os.PathLike[str]) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def checkpoint_callback(dirpath: str | os.PathLike[str]) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=dirpath,
        monitor="train_loss",
        mode="min",
        save_top_k=2,
        every_n_train_steps=2,
        save_last=True,
    )


def fit(
    root: str | os.PathLike[str],
    io: Any,
    max_steps: int,
    *,
    ckpt_path: str | None = None,
    seed: int = 0,
    callbacks: list[Any] | None = None,
    **trainer_kwargs: Any,
) -> tuple[Any, Model, ModelCheckpoint]:
    """Train ``max_steps`` (in total, counting a resumed checkpoint's) with ``io``."""
    cb = checkpoint_callback(Path(root) / "ckpts")
    plugins = [] if io is None else [io]
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[cb, *(callbacks or [])],
        plugins=plugins,
        deterministic=True,
        **trainer_kwargs,
    )
    model = Model(seed=seed)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, model, cb


def final_state(trainer: Any, model: Model) -> dict[str, Any]:
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
    }


def _ddp(out: Path, phase: str) -> None:
    io = CkptStoreIO(out / "store")
    if phase == "straight":
        trainer, model, cb = fit(out / "straight", None, 12, strategy="ddp", devices=2)
    elif phase == "part":
        manual = SaveAt(4, out / "run" / "ckpts" / "manual.ckpt")
        trainer, model, cb = fit(out / "run", io, 8, callbacks=[manual], strategy="ddp", devices=2)
    else:  # rank 0 saves on AsyncCheckpointIO's thread
        trainer, model, cb = fit(
            out / "run",
            AsyncCheckpointIO(io),
            12,
            ckpt_path="last",
            seed=99,
            strategy="ddp",
            devices=2,
        )
        io.teardown()  # (AsyncCheckpointIO does not pass its teardown on)
    rank = trainer.global_rank
    torch.save(final_state(trainer, model), out / f"{phase}-{rank}.pt")
    if rank == 0:
        view = {"best_k": sorted(cb.best_k_models), "last": cb.last_model_path}
        (out / f"{phase}-ckpt.json").write_text(json.dumps(view))
    trainer.strategy.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    for arg in sys.argv[2:]:
        _ddp(Path(sys.argv[1]), arg)
