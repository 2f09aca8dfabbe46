"""The Lightning CheckpointIO plug-in with a real Trainer on the CPU: what the store and the
checkpoint folder hold after ModelCheckpoint's top-k/last saves and removals, bit-exact
resumes (``ckpt_path="last"`` and a path), AsyncCheckpointIO, and DDP with 2 processes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import torch  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO  # noqa: E402

import ckptstore  # noqa: E402
from ckptstore.integrations import lightning as ckl  # noqa: E402
from ckptstore.integrations.lightning import (  # noqa: E402
    CkptStoreIO,
    checkpoint_name,
    file_name,
    read_pointer,
)
from ckptstore.store import layout  # noqa: E402
from tests import lightning_train as lt  # noqa: E402
from tests.helpers import assert_same  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """12 steps in one go with Lightning's own checkpoint files: the reference."""
    trainer, model, _ = lt.fit(tmp_path_factory.mktemp("straight"), None, 12)
    return lt.final_state(trainer, model)


def store_names(url, storage_options=None) -> dict[str, int | None]:
    return {s.name: s.step for s in ckptstore.Store(url, storage_options).list()}


def expected_names(cb) -> set[str]:
    return {checkpoint_name(p) for p in cb.best_k_models} | {"last.ckpt"}


def assert_folder_is_pointers(cb, url) -> None:
    """The checkpoint folder holds a pointer for exactly each checkpoint Lightning keeps."""
    folder = Path(cb.dirpath)
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted({Path(p).name for p in cb.best_k_models} | {"last.ckpt"})
    for f in files:
        pointer = read_pointer(folder / f)
        assert pointer is not None and (folder / f).stat().st_size < 300
        assert pointer["name"] == checkpoint_name(f)
        assert pointer["store"] == (url if "://" in str(url) else os.path.abspath(url))


def test_without_lightning_the_import_error_names_the_extra(monkeypatch):
    import importlib

    for mod in ("lightning.fabric.plugins", "lightning_fabric.plugins"):
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.delitem(sys.modules, "ckptstore.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'ckptstore\[lightning\]'"):
        importlib.import_module("ckptstore.integrations.lightning")


# -- names -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fname",
    [
        "last.ckpt",
        "epoch=0-step=10.ckpt",
        "epoch=3-step=400-val_loss=0.1234.ckpt",
        "last-v1.ckpt",
        "model_ü 1+2.ckpt",
        "a__b_5f.ckpt",
    ],
)
def test_file_names_map_to_store_names_and_back(fname):
    name = checkpoint_name(f"/some/dir/{fname}")
    ckptstore.store.layout.check_name(name)
    assert file_name(name) == fname


def test_name_mapping_examples_and_refusals():
    assert checkpoint_name("d/epoch=0-step=10.ckpt") == "epoch_3d0-step_3d10.ckpt"
    assert checkpoint_name("val_loss.ckpt") == "val__loss.ckpt"
    for bad in (".hidden.ckpt", "_x.ckpt", "x" * 201):
        with pytest.raises(ValueError, match="cannot name a store checkpoint"):
            checkpoint_name(bad)
    with pytest.raises(ValueError, match="not an escaped"):
        file_name("a_zz")


# -- a real Trainer ----------------------------------------------------------------------------
def test_topk_last_and_bit_exact_resume_from_last(tmp_path, straight):
    url = str(tmp_path / "store")
    rec = lt.Recorder()
    trainer, _, cb = lt.fit(tmp_path / "run", CkptStoreIO(url), 8, callbacks=[rec])

    # last.ckpt every 2 steps; train_loss is lowest at steps 2 and 4, so top-2 saves those two
    # and never replaces one (removals through a Trainer: the S3 test below)
    assert sorted(rec.saved) == [2, 4, 6, 8]
    names = store_names(url)
    assert set(names) == expected_names(cb) and len(names) == 3
    assert names["last.ckpt"] == 8
    for path in cb.best_k_models:  # each holds the step and the weights of its save
        step = names[checkpoint_name(path)]
        assert Path(path).name.endswith(f"step={step}.ckpt")
        loaded = trainer.strategy.checkpoint_io.load_checkpoint(path)
        assert loaded["global_step"] == step
        assert_same(rec.saved[step], dict(loaded["state_dict"]))
    assert_folder_is_pointers(cb, url)

    # a new Trainer, another initialization: resumes from the store to step 12
    trainer2, model2, cb2 = lt.fit(tmp_path / "run", CkptStoreIO(url), 12, ckpt_path="last", seed=9)
    assert_same(straight, lt.final_state(trainer2, model2))
    names = store_names(url)
    assert set(names) == expected_names(cb2) and names["last.ckpt"] == 12
    assert_folder_is_pointers(cb2, url)


def test_an_s3_store_keeps_top_k_and_last_and_resumes_bit_exact(
    tmp_path, straight, s3_url, s3_options, monkeypatch
):
    """``CkptStoreIO("s3://bucket/run")`` on a real S3 server (SeaweedFS), with a top-k that
    replaces checkpoints (the latest 2 by step), so that removals reach the bucket."""
    import s3fs
    from lightning.pytorch.callbacks import ModelCheckpoint

    def latest_two(dirpath) -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=dirpath,
            monitor="step",
            mode="max",
            save_top_k=2,
            every_n_train_steps=2,
            save_last=True,
        )

    monkeypatch.setattr(lt, "checkpoint_callback", latest_two)
    rec = lt.Recorder()
    io = CkptStoreIO(s3_url, storage_options=s3_options)
    trainer, _, cb = lt.fit(tmp_path / "run", io, 8, callbacks=[rec])
    assert sorted(rec.saved) == [2, 4, 6, 8]
    names = store_names(s3_url, s3_options)
    assert names == {"epoch_3d0-step_3d6.ckpt": 6, "epoch_3d0-step_3d8.ckpt": 8, "last.ckpt": 8}
    assert set(names) == expected_names(cb)
    for path in cb.best_k_models:
        loaded = io.load_checkpoint(path)
        assert_same(rec.saved[loaded["global_step"]], dict(loaded["state_dict"]))
    assert_folder_is_pointers(cb, s3_url)
    # steps 2 and 4, which top-k let go, are deleted from the bucket, not only from a listing
    fs = s3fs.S3FileSystem(**s3_options, skip_instance_cache=True)
    keys = fs.ls(f"{s3_url.removeprefix('s3://')}/{layout.CHECKPOINTS}", refresh=True)
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == sorted(
        layout.manifest_key(n).rsplit("/", 1)[1] for n in names
    )
    assert io._gc_future is not None
    io._gc_future.result(timeout=60)  # the gc after a removal ran on S3 without an error

    # a new Trainer, another initialization: resumes from the bucket to step 12, and its
    # top-k goes on removing the checkpoints the first Trainer saved
    io2 = CkptStoreIO(s3_url, storage_options=s3_options)
    trainer2, model2, cb2 = lt.fit(tmp_path / "run", io2, 12, ckpt_path="last", seed=9)
    assert_same(straight, lt.final_state(trainer2, model2))
    names = store_names(s3_url, s3_options)
    assert names == {
        "epoch_3d1-step_3d10.ckpt": 10,
        "epoch_3d1-step_3d12.ckpt": 12,
        "last.ckpt": 12,
    }
    assert_folder_is_pointers(cb2, s3_url)
    assert io2._gc_future is not None
    io2._gc_future.result(timeout=60)  # done before the server stops at the session's end

    # a wrong secret, a missing bucket: errors naming the bucket, and no pointer left behind
    bad = CkptStoreIO(s3_url, storage_options={**s3_options, "secret": "not-the-secret"})
    with pytest.raises(ckptstore.AccessDeniedError, match="bucket 'ckpt'"):
        bad.load_checkpoint(cb2.last_model_path)
    with pytest.raises(ckptstore.AccessDeniedError, match="bucket 'ckpt'"):
        lt.fit(tmp_path / "denied", bad, 2)
    missing = CkptStoreIO("s3://no-such-bucket/run", storage_options=s3_options)
    with pytest.raises(ckptstore.BucketNotFoundError, match="'no-such-bucket'"):
        missing.save_checkpoint({"global_step": 1, "w": torch.ones(2)}, tmp_path / "m.ckpt")
    assert not (tmp_path / "m.ckpt").exists() and not list((tmp_path / "denied").rglob("*.ckpt"))


def test_resume_from_a_path_with_and_without_its_pointer(tmp_path, straight):
    url = str(tmp_path / "store")
    manual = tmp_path / "run" / "ckpts" / "manual=8.ckpt"
    lt.fit(tmp_path / "run", CkptStoreIO(url), 10, callbacks=[lt.SaveAt(8, manual)])
    assert store_names(url)["manual_3d8.ckpt"] == 8 and read_pointer(manual) is not None

    trainer2, model2, _ = lt.fit(tmp_path / "a", CkptStoreIO(url), 12, ckpt_path=str(manual))
    assert_same(straight, lt.final_state(trainer2, model2))

    # on another machine only the store is there: the path's file name names the checkpoint
    manual.unlink()
    elsewhere = str(tmp_path / "elsewhere" / "ckpts" / "manual=8.ckpt")
    trainer3, model3, _ = lt.fit(tmp_path / "b", CkptStoreIO(url), 12, ckpt_path=elsewhere)
    assert_same(straight, lt.final_state(trainer3, model3))


def test_a_checkpoint_replaced_by_another_run_is_refused(tmp_path):
    url = str(tmp_path / "store")
    io = CkptStoreIO(url)
    io.save_checkpoint({"global_step": 8, "w": torch.ones(2)}, tmp_path / "one" / "last.ckpt")
    io.save_checkpoint({"global_step": 3, "w": torch.ones(2)}, tmp_path / "two" / "last.ckpt")
    assert io.load_checkpoint(tmp_path / "two" / "last.ckpt")["global_step"] == 3
    with pytest.raises(ckptstore.CkptStoreError, match="is for step 8 but .* is now step 3"):
        io.load_checkpoint(tmp_path / "one" / "last.ckpt")


def test_restore_pointers_then_resume_last_on_a_new_machine(tmp_path, straight):
    url = str(tmp_path / "store")
    lt.fit(tmp_path / "old", CkptStoreIO(url), 8)
    io = CkptStoreIO(url)
    written = io.restore_pointers(tmp_path / "new" / "ckpts")
    assert sorted(Path(p).name for p in written) == sorted(file_name(n) for n in store_names(url))
    assert io.restore_pointers(tmp_path / "new" / "ckpts") == []  # nothing missing now
    trainer, model, _ = lt.fit(tmp_path / "new", io, 12, ckpt_path="last", seed=5)
    assert_same(straight, lt.final_state(trainer, model))


def test_unknown_checkpoint_path_names_store_and_checkpoint(tmp_path):
    url = str(tmp_path / "store")
    lt.fit(tmp_path / "run", CkptStoreIO(url), 2)
    missing = tmp_path / "run" / "ckpts" / "epoch=7-step=99.ckpt"
    with pytest.raises(ckptstore.CheckpointNotFoundError) as err:
        lt.fit(tmp_path / "run2", CkptStoreIO(url), 4, ckpt_path=str(missing))
    msg = str(err.value)
    assert "'epoch_3d7-step_3d99.ckpt'" in msg and os.path.abspath(url) in msg
    assert str(missing) in msg
    assert isinstance(err.value, FileNotFoundError)


def test_async_checkpoint_io_saves_the_values_of_the_call(tmp_path, straight):
    url = str(tmp_path / "store")
    rec = lt.Recorder()
    inner = CkptStoreIO(url)
    trainer, _, cb = lt.fit(tmp_path / "run", AsyncCheckpointIO(inner), 8, callbacks=[rec])
    # fit's teardown waited for the saves; AsyncCheckpointIO does not pass it on to the
    # plug-in, whose deletions would finish before exit: wait for them here
    inner.teardown()
    names = store_names(url)
    assert set(names) == expected_names(cb) and names["last.ckpt"] == 8
    io = CkptStoreIO(url)
    for path in [*cb.best_k_models, cb.last_model_path]:
        loaded = io.load_checkpoint(path)
        assert_same(rec.saved[loaded["global_step"]], dict(loaded["state_dict"]))
    assert_folder_is_pointers(cb, url)

    trainer2, model2, _ = lt.fit(
        tmp_path / "run", AsyncCheckpointIO(CkptStoreIO(url)), 12, ckpt_path="last", seed=3
    )
    assert_same(straight, lt.final_state(trainer2, model2))


def test_save_last_link_resumes_through_the_link(tmp_path):
    url = str(tmp_path / "store")
    cb = lt.checkpoint_callback(tmp_path / "ckpts")
    cb.save_last = "link"
    import lightning as L

    trainer = L.Trainer(
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[cb],
        plugins=[CkptStoreIO(url)],
        default_root_dir=tmp_path,
    )
    trainer.fit(lt.Model(), lt.loader())
    last = tmp_path / "ckpts" / "last.ckpt"
    assert last.is_symlink() and "last.ckpt" not in store_names(url)
    target = Path(os.readlink(last)).name  # the newest top-k checkpoint
    assert target in {Path(p).name for p in cb.best_k_models}
    loaded = CkptStoreIO(url).load_checkpoint(last)
    assert target.endswith(f"step={loaded['global_step']}.ckpt")


def test_save_last_link_with_a_changing_last_name_keeps_the_top_k(tmp_path, monkeypatch):
    """With ``CHECKPOINT_NAME_LAST = "{epoch}-last"`` Lightning removes the old link through
    the plug-in at each new epoch; the top-k checkpoint it points at stays."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def linked(dirpath) -> ModelCheckpoint:
        cb = ModelCheckpoint(
            dirpath=dirpath,
            monitor="step",
            mode="max",
            save_top_k=2,
            every_n_train_steps=2,
            save_last="link",
        )
        cb.CHECKPOINT_NAME_LAST = "{epoch}-last"
        return cb

    monkeypatch.setattr(lt, "checkpoint_callback", linked)
    url = str(tmp_path / "store")
    # 8 steps per epoch: at step 10 the link epoch=0-last.ckpt -> step 8 is removed
    _, _, cb = lt.fit(tmp_path / "run", CkptStoreIO(url), 10)
    assert store_names(url) == {"epoch_3d0-step_3d8.ckpt": 8, "epoch_3d1-step_3d10.ckpt": 10}
    assert set(store_names(url)) == {checkpoint_name(p) for p in cb.best_k_models}
    io = CkptStoreIO(url)
    for path in cb.best_k_models:
        assert Path(path).name.endswith(f"step={io.load_checkpoint(path)['global_step']}.ckpt")
    folder = tmp_path / "run" / "ckpts"
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch=0-step=8.ckpt",
        "epoch=1-last.ckpt",
        "epoch=1-step=10.ckpt",
    ]
    last = Path(cb.last_model_path)
    assert last.name == "epoch=1-last.ckpt" and last.is_symlink()
    assert io.load_checkpoint(last)["global_step"] == 10


def test_standalone_pytorch_lightning_and_a_pickled_plugin(tmp_path):
    """The plug-in is a CheckpointIO of both packages, and survives pickling (ddp_spawn)."""
    pl = pytest.importorskip("pytorch_lightning")
    import pickle

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    io = pickle.loads(pickle.dumps(CkptStoreIO(tmp_path / "store")))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=2)
    trainer = pl.Trainer(
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
        plugins=[io],
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), lt.loader())
    assert store_names(tmp_path / "store") == {"epoch_3d0-step_3d4.ckpt": 4}


# -- the CheckpointIO calls on their own --------------------------------------------------------
def lightning_dump(tmp_path) -> dict:
    trainer, _, _ = lt.fit(tmp_path / "dump", None, 3)
    return trainer._checkpoint_connector.dump_checkpoint()


def test_load_returns_what_was_saved_empty_dicts_included(tmp_path):
    ckpt = lightning_dump(tmp_path)
    assert ckpt["loops"]["fit_loop"]["state_dict"] == {}  # what DCP's flattening drops
    ckpt["extra"] = {"nested": [{}, {"x": {}}], "empty_list": [], 3: {}}
    io = CkptStoreIO(tmp_path / "store")
    path = tmp_path / "c" / "x.ckpt"
    io.save_checkpoint(ckpt, path)
    back = io.load_checkpoint(path)  # allow_pickle is off: nothing needs it
    assert_same(ckpt, back)
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)

    meta = io.load_checkpoint(path, map_location="meta")
    assert meta["state_dict"]["net.0.weight"].is_meta
    same = io.load_checkpoint(path, map_location=lambda storage, loc: storage)
    assert_same(ckpt["state_dict"], same["state_dict"])
    by_dict = io.load_checkpoint(path, map_location={"cpu": "meta"})
    assert by_dict["state_dict"]["net.0.weight"].is_meta


def test_storage_options_of_a_save(tmp_path):
    io = CkptStoreIO(tmp_path / "store")
    state = {"global_step": 1, "state_dict": {"w": torch.arange(4.0)}}
    io.save_checkpoint(state, tmp_path / "a.ckpt", storage_options={"threads": 1})
    assert store_names(tmp_path / "store") == {"a.ckpt": 1}
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(state, tmp_path / "b.ckpt", storage_options={"anon": True})


def test_a_regular_lightning_file_still_loads(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, path)
    loaded = CkptStoreIO(tmp_path / "store").load_checkpoint(path)
    assert loaded["global_step"] == 3


def test_a_pointer_of_another_store_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    CkptStoreIO(a).save_checkpoint({"global_step": 1, "w": torch.ones(1)}, tmp_path / "x.ckpt")
    with pytest.raises(ckptstore.CkptStoreError, match="names checkpoint 'x.ckpt' of store"):
        CkptStoreIO(b).load_checkpoint(tmp_path / "x.ckpt")


def test_remove_while_the_save_is_in_flight_wins(tmp_path, monkeypatch):
    """AsyncCheckpointIO runs saves on a thread and removals on the caller's: a checkpoint
    removed while it is being saved is deleted once its commit is done, pointer included."""
    io = CkptStoreIO(tmp_path / "store")
    path = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    started, release = threading.Event(), threading.Event()
    real_save = ckl.save

    def slow_save(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckl, "save", slow_save)
    saver = threading.Thread(
        target=io.save_checkpoint, args=({"global_step": 2, "w": torch.ones(3)}, path)
    )
    saver.start()
    assert started.wait(30)
    io.remove_checkpoint(path)  # returns at once: the save is not done
    release.set()
    saver.join(30)
    io.teardown()
    assert store_names(tmp_path / "store") == {} and not path.exists()

    io.save_checkpoint({"global_step": 4, "w": torch.ones(3)}, path)  # later saves stay
    assert store_names(tmp_path / "store") == {"epoch_3d0-step_3d2.ckpt": 4}


def test_removal_collects_the_chunks_nothing_needs(tmp_path):
    settings = ckptstore.Settings(inline_bytes=0, chunk_bytes=4096, gc_grace=0)
    url = tmp_path / "store"
    io = CkptStoreIO(url, settings=settings)
    for step in (1, 2):
        w = torch.randn(4096, generator=torch.Generator().manual_seed(step))
        io.save_checkpoint({"global_step": step, "w": w}, tmp_path / f"s{step}.ckpt")
    assert ckptstore.Store(url, settings=settings).du().garbage_chunks == 0
    io.remove_checkpoint(tmp_path / "s1.ckpt")
    io.teardown()
    assert io._gc_future is not None
    io._gc_future.result(timeout=60)
    du = ckptstore.Store(url, settings=settings).du()
    assert du.garbage_chunks == 0 and [c.name for c in du.checkpoints] == ["s2.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s2.ckpt", "store"]


@pytest.mark.parametrize("how", ["symlink", "copy"])
def test_removing_a_link_or_a_copied_pointer_keeps_its_checkpoint(tmp_path, how):
    """A ``save_last="link"`` link (a symlink, or Lightning's copy of the target where it
    cannot make one) names a top-k checkpoint Lightning keeps: removing the link removes
    only the link. The checkpoint's own pointer still deletes it."""
    url = tmp_path / "store"
    io = CkptStoreIO(url)
    target = tmp_path / "ckpts" / "epoch=1-step=3.ckpt"
    link = tmp_path / "ckpts" / "epoch=1-last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.ones(3)}, target)
    if how == "symlink":
        link.symlink_to(target.name)
    else:
        shutil.copy(target, link)
    assert io.load_checkpoint(link)["global_step"] == 3
    io.remove_checkpoint(link)
    io.teardown()
    assert not os.path.lexists(link)
    assert store_names(url) == {"epoch_3d1-step_3d3.ckpt": 3} and read_pointer(target)
    assert io.load_checkpoint(target)["global_step"] == 3

    io.remove_checkpoint(target)  # the checkpoint's own pointer: deleted from the store
    io.teardown()
    assert store_names(url) == {} and not target.exists()
    if how == "symlink":  # a link left dangling is only unlinked too
        link.symlink_to(target.name)
        io.remove_checkpoint(link)
        io.teardown()
        assert not os.path.lexists(link)


def test_removing_a_pointer_of_the_same_file_name_elsewhere_deletes(tmp_path):
    """A pointer names the checkpoint of its file name wherever it lies (a run's folder
    moved or copied): removing it deletes the checkpoint, as before."""
    url = tmp_path / "store"
    io = CkptStoreIO(url)
    io.save_checkpoint({"global_step": 2, "w": torch.ones(3)}, tmp_path / "a" / "x.ckpt")
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "x.ckpt", tmp_path / "b" / "x.ckpt")
    io.remove_checkpoint(tmp_path / "b" / "x.ckpt")
    io.teardown()
    assert store_names(url) == {} and not (tmp_path / "b" / "x.ckpt").exists()


@pytest.mark.parametrize(
    ("paths", "match"),
    [
        (((("extra", False), (10**12, True)),), "list index 1000000000000 for a list of 0"),
        (((("extra", False), (-1, True)),), "list index -1"),
        (((("state_dict", False), (0, True)),), "indexes dict as a list"),
        (((("global_step", False), ("x", False)),), "takes key 'x' of a int"),
        (("not a path",), "not a non-empty tuple"),
    ],
)
def test_a_damaged_record_of_empty_mappings_is_refused(tmp_path, monkeypatch, paths, match):
    """The paths of the empty mappings come from the store: a huge list index is refused
    with an error naming the checkpoint, before it allocates a huge list."""
    io = CkptStoreIO(tmp_path / "store")
    path = tmp_path / "x.ckpt"
    real_save = ckl.save

    def damaging_save(state, *args, **kwargs):
        return real_save({**state, ckl._META_KEY: (1, paths)}, *args, **kwargs)

    monkeypatch.setattr(ckl, "save", damaging_save)
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(ckptstore.CkptStoreError, match="checkpoint 'x.ckpt' of store") as err:
        io.load_checkpoint(path)
    assert "damaged record" in str(err.value) and match in str(err.value)


class Opaque:
    """A class on no allow-list: only full unpickling loads it."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_weights_only_reaches_regular_files_but_not_store_checkpoints(tmp_path):
    """A regular Lightning file loads as Lightning would load it (``weights_only`` passed on:
    full unpickling when it is False); a store checkpoint uses the allow-list regardless."""
    state = {"global_step": 3, "w": torch.ones(2), "obj": Opaque(7)}
    plain = tmp_path / "plain.ckpt"
    torch.save(state, plain)
    io = CkptStoreIO(tmp_path / "store")
    assert io.load_checkpoint(plain, weights_only=False)["obj"].value == 7
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        io.load_checkpoint(plain, weights_only=True)

    io.save_checkpoint(state, tmp_path / "stored.ckpt")
    with pytest.raises(ckptstore.UnsafeObjectError, match="Opaque"):
        io.load_checkpoint(tmp_path / "stored.ckpt", weights_only=False)


# -- DDP ---------------------------------------------------------------------------------------
@pytest.mark.slow  # ~25 s: three 2-process runs
def test_ddp_two_cpu_processes_save_once_and_resume_bit_exact(tmp_path):
    """Rank 0 alone saves (sync, then through AsyncCheckpointIO), every rank loads. Lightning's
    ddp launcher runs the script again for rank 1, so the run is a script."""
    script = Path(__file__).with_name("lightning_train.py")
    env = {**os.environ, "CKPTSTORE_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "straight", "part", "resume"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    load = lambda n: torch.load(tmp_path / n, weights_only=False)  # noqa: E731
    straight = load("straight-0.pt")
    assert_same(straight, load("straight-1.pt"))  # DDP keeps the ranks equal
    assert straight["global_step"] == 12
    for rank in (0, 1):
        assert_same(straight, load(f"resume-{rank}.pt"))

    part = json.loads((tmp_path / "part-ckpt.json").read_text())
    resumed = json.loads((tmp_path / "resume-ckpt.json").read_text())
    names = store_names(tmp_path / "store")
    # 4 steps per epoch per rank, a save every 2; the manual save of step 4 is not top-k's
    assert names.pop("manual.ckpt") == 4
    assert set(names) == {checkpoint_name(p) for p in resumed["best_k"]} | {"last.ckpt"}
    assert names["last.ckpt"] == 12
    assert len(part["best_k"]) == 2 and part["last"].endswith("last.ckpt")
    folder = tmp_path / "run" / "ckpts"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        {Path(p).name for p in resumed["best_k"]} | {"last.ckpt", "manual.ckpt"}
    )
