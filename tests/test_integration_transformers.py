"""CkptStoreCallback with a real Hugging Face Trainer (tiny BERT on CPU): checkpoint folders
move into the store, retention runs there, a restored folder resumes bit-exact, every file
comes back byte for byte; load_best_model_at_end; one rank storing under torch.distributed."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import struct
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import ckptstore  # noqa: E402
from ckptstore.errors import (  # noqa: E402
    AccessDeniedError,
    BucketNotFoundError,
    CheckpointNotFoundError,
    StoreNotFoundError,
)
from ckptstore.integrations.transformers import (  # noqa: E402
    INDEX_KEY,
    CkptStoreCallback,
    latest_step,
    restore_checkpoint,
)
from tests.helpers import assert_same  # noqa: E402

USED_TOKENS = 32  # the data uses only these of the 512-token vocabulary: the rest never change
SETTINGS = ckptstore.Settings(chunk_bytes=4096, inline_bytes=1024, threads=2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=512,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)  # dropout on: resume needs the RNG states


class Toy(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, USED_TOKENS, (n, 8), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def make_args(out: Path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        max_steps=10,  # 4 steps an epoch: resuming at 6 skips into the second epoch
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1000,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


class StopAt(TrainerCallback):
    """Ends training after step ``n`` (saved: n is a save step), as a crash would."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.n:
            control.should_training_stop = True


class Snapshot(TrainerCallback):
    """Copies each folder the Trainer wrote before CkptStoreCallback (added after it)
    moves it."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def on_save(self, args, state, control, **kwargs):
        name = f"checkpoint-{state.global_step}"
        shutil.copytree(Path(args.output_dir) / name, self.dest / name)


class OnDisk(TrainerCallback):
    def __init__(self) -> None:
        self.seen: dict[int, list[str]] = {}

    def on_save(self, args, state, control, **kwargs):
        self.seen[state.global_step] = folders(Path(args.output_dir))


def folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("checkpoint-*"))


def assert_same_files(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*"))
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*"))
    assert files_a == files_b
    for rel in files_a:
        pa, pb = a / rel, b / rel
        if pa.is_file():
            assert pa.read_bytes() == pb.read_bytes(), rel
            assert pa.stat().st_mode == pb.stat().st_mode, rel


def names(url: str) -> list[str]:
    return [c.name for c in ckptstore.Store(url).list()]


def test_folders_move_into_the_store_and_resume_is_bit_exact(tmp_path):
    url = str(tmp_path / "store")
    reference = Trainer(
        model=tiny_model(0),
        args=make_args(tmp_path / "ref", save_strategy="no"),
        train_dataset=Toy(),
    )
    reference.train()

    run = tmp_path / "run"
    snap = Snapshot(tmp_path / "snap")
    cb = CkptStoreCallback(url, keep_last=2, settings=SETTINGS)
    first = Trainer(
        model=tiny_model(0),
        args=make_args(run),
        train_dataset=Toy(),
        callbacks=[snap, cb, StopAt(6)],
    )
    first.train()
    assert first.state.global_step == 6

    # moved: nothing left on disk; retention in the store dropped checkpoint-2
    assert folders(run) == []
    assert names(url) == ["checkpoint-4", "checkpoint-6"]
    assert [c.step for c in ckptstore.Store(url).list()] == [4, 6]
    assert cb.last_gc is not None and cb.last_gc.dropped == ["checkpoint-2"]
    assert latest_step(url) == 6

    # the rows of tokens the data never uses stay the same: their chunks are shared
    s6 = ckptstore.Store(url).summary("checkpoint-6")
    assert 0 < s6.new_chunks < s6.chunks
    assert s6.new_bytes < s6.stored_bytes
    # tensors are stored with their dtype, the rest as raw bytes
    report = ckptstore.Store(url).inspect("checkpoint-6")
    dtypes = {t.fqn: t.dtype for t in report.tensors}
    word = "model.safetensors:bert.embeddings.word_embeddings.weight"
    assert dtypes[word] == "float32"
    assert any(k.startswith("optimizer.pt:") and v == "float32" for k, v in dtypes.items())
    assert dtypes["training_args.bin"] == "uint8"
    assert list(report.objects) == [INDEX_KEY]

    # every file comes back byte for byte (tensor files included)
    for step in (4, 6):
        path = restore_checkpoint(url, tmp_path / "restored", step=step)
        assert path == tmp_path / "restored" / f"checkpoint-{step}"
        assert_same_files(path, tmp_path / "snap" / f"checkpoint-{step}")

    # resume from the restored folder (a model initialised differently: weights must load)
    second_cb = CkptStoreCallback(url, keep_last=2, settings=SETTINGS)
    second = Trainer(
        model=tiny_model(1),
        args=make_args(run),
        train_dataset=Toy(),
        callbacks=[second_cb],
    )
    second.train(resume_from_checkpoint=str(tmp_path / "restored" / "checkpoint-6"))
    assert second.state.global_step == 10
    assert names(url) == ["checkpoint-8", "checkpoint-10"]
    assert folders(run) == []

    # bit-exact with the run that was never interrupted: weights and optimizer state
    assert_same(second.model.state_dict(), reference.model.state_dict())
    assert_same(second.optimizer.state_dict(), reference.optimizer.state_dict())
    assert_same(second.lr_scheduler.state_dict(), reference.lr_scheduler.state_dict())
    last = restore_checkpoint(url, tmp_path / "restored", step=10)
    stored = load_file(str(last / "model.safetensors"))
    ref_state = reference.model.state_dict()
    for key, value in stored.items():
        assert torch.equal(value, ref_state[key]), key


def test_an_s3_store_restores_and_resumes_bit_exact(tmp_path, s3_url, s3_options):
    """The same on a real S3 server (SeaweedFS): stored, retained, restored, resumed."""
    reference = Trainer(
        model=tiny_model(0),
        args=make_args(tmp_path / "ref", max_steps=8, save_strategy="no"),
        train_dataset=Toy(),
    )
    reference.train()

    run = tmp_path / "run"
    cb = CkptStoreCallback(s3_url, keep_last=1, storage_options=s3_options, settings=SETTINGS)
    first = Trainer(
        model=tiny_model(0),
        args=make_args(run, max_steps=8),
        train_dataset=Toy(),
        callbacks=[Snapshot(tmp_path / "snap"), cb, StopAt(6)],
    )
    first.train()
    assert folders(run) == [] and cb.last_gc is not None
    assert cb.last_gc.dropped == ["checkpoint-4"]
    store = ckptstore.Store(s3_url, storage_options=s3_options)
    assert [(c.name, c.step) for c in store.list()] == [("checkpoint-6", 6)]
    assert latest_step(s3_url, storage_options=s3_options) == 6

    path = restore_checkpoint(s3_url, tmp_path / "restored", storage_options=s3_options)
    assert_same_files(path, tmp_path / "snap" / "checkpoint-6")
    second = Trainer(
        model=tiny_model(1),
        args=make_args(run, max_steps=8),
        train_dataset=Toy(),
        callbacks=[
            CkptStoreCallback(s3_url, keep_last=1, storage_options=s3_options, settings=SETTINGS)
        ],
    )
    second.train(resume_from_checkpoint=str(path))
    assert_same(second.model.state_dict(), reference.model.state_dict())
    assert_same(second.optimizer.state_dict(), reference.optimizer.state_dict())
    assert [c.name for c in store.list()] == ["checkpoint-8"]

    # a wrong secret or a missing bucket is an error naming the bucket, never "no checkpoint
    # yet" (latest_step None would start a restarted job from scratch)
    bad = {**s3_options, "secret": "not-the-secret"}
    with pytest.raises(AccessDeniedError, match="bucket 'ckpt'"):
        latest_step(s3_url, storage_options=bad)
    with pytest.raises(AccessDeniedError, match="bucket 'ckpt'"):
        restore_checkpoint(s3_url, tmp_path / "denied", storage_options=bad)
    with pytest.raises(AccessDeniedError, match="bucket 'ckpt'"):
        CkptStoreCallback(s3_url, storage_options=bad).store_folder(path, 6)
    missing = "s3://no-such-bucket/run"
    with pytest.raises(BucketNotFoundError, match="'no-such-bucket'"):
        latest_step(missing, storage_options=s3_options)
    with pytest.raises(BucketNotFoundError, match="'no-such-bucket'"):
        restore_checkpoint(missing, tmp_path / "none", storage_options=s3_options)
    assert not (tmp_path / "denied").exists() and not (tmp_path / "none").exists()


def test_best_model_at_end_is_loaded_and_kept(tmp_path):
    url = str(tmp_path / "store")
    run = tmp_path / "run"
    scores = iter([1.0, 3.0, 2.0, 0.0])  # evaluations at steps 2, 4, 6, 8: best is step 4
    snap, on_disk = Snapshot(tmp_path / "snap"), OnDisk()
    trainer = Trainer(
        model=tiny_model(0),
        args=make_args(
            run,
            max_steps=8,
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
        ),
        train_dataset=Toy(),
        eval_dataset=Toy(4, seed=2),
        compute_metrics=lambda _: {"score": next(scores)},
        callbacks=[snap, CkptStoreCallback(url, keep_last=1, settings=SETTINGS), on_disk],
    )
    trainer.train()

    # only the best folder stays on disk while training, none after
    assert on_disk.seen == {
        2: ["checkpoint-2"],
        4: ["checkpoint-4"],
        6: ["checkpoint-4"],
        8: ["checkpoint-4"],
    }
    assert folders(run) == []
    # the Trainer loaded the best weights from that folder
    best = load_file(str(tmp_path / "snap" / "checkpoint-4" / "model.safetensors"))
    model_state = trainer.model.state_dict()
    for key, value in best.items():
        assert torch.equal(value, model_state[key]), key
    # retention keeps the latest and the best
    assert names(url) == ["checkpoint-4", "checkpoint-8"]

    # restoring into the run's folder brings the best back too, where trainer_state says
    path = restore_checkpoint(url, run, step=8)
    assert folders(run) == ["checkpoint-4", "checkpoint-8"]
    recorded = json.loads((path / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert Path(recorded) == run / "checkpoint-4"
    assert_same_files(run / "checkpoint-4", tmp_path / "snap" / "checkpoint-4")
    # elsewhere, only the checkpoint asked for (the Trainer would not find the best there)
    restore_checkpoint(url, tmp_path / "elsewhere", step=8)
    assert folders(tmp_path / "elsewhere") == ["checkpoint-8"]


def test_every_kind_of_file_comes_back_byte_for_byte(tmp_path):
    folder = tmp_path / "checkpoint-3"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "empty-dir").mkdir()
    (folder / "empty.txt").write_bytes(b"")
    (folder / "sub" / "deeper" / "notes.json").write_text('{"a": 1}')
    (folder / "broken.safetensors").write_bytes(b"\xff" * 5000)  # not one: plain bytes
    torch.manual_seed(0)
    save_file(
        {
            "odd_f16": torch.randn(1001, dtype=torch.float16),  # the next tensor is misaligned
            "w_bf16": torch.randn(64, 32).to(torch.bfloat16),
            "w_f32": torch.randn(40, 30),
            "mask": torch.rand(2000) > 0.5,  # BOOL: stored as bytes
            "scalar": torch.tensor(3.0),
            "nothing": torch.zeros(0, 4),
        },
        str(folder / "weights.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "weights.safetensors").chmod(0o600)
    base = torch.randn(600)
    torch.save(
        {
            "shared": base,
            "view": base[100:],  # one storage, two tensors
            "t": torch.randn(50, 40).t(),  # non-contiguous
            "ints": torch.arange(700, dtype=torch.int64),
            "rng": np.random.get_state(),  # numpy: not weights_only-loadable by torch alone
            "steps": [1, 2, 3],
        },
        folder / "state.pt",
    )
    torch.save({"w": torch.randn(500)}, folder / "legacy.bin", _use_new_zipfile_serialization=False)

    url = str(tmp_path / "store")
    info = CkptStoreCallback(url, settings=SETTINGS).store_folder(folder, 3)
    assert (info.name, info.step) == ("checkpoint-3", 3)
    assert folder.is_dir()  # store_folder alone does not delete

    sd = ckptstore.load_full(url, step=3)
    assert sd["weights.safetensors:w_bf16"].dtype == torch.bfloat16
    assert sd["weights.safetensors:w_bf16"].shape == (64, 32)
    assert sd["weights.safetensors:mask"].dtype == torch.uint8
    assert any(k.startswith("state.pt:") for k in sd)
    index = json.loads(sd[INDEX_KEY])
    assert index["folder"] == "checkpoint-3" and index["dirs"] == ["empty-dir", "sub", "sub/deeper"]

    path = restore_checkpoint(url, tmp_path / "out")
    assert_same_files(path, folder)
    assert (path / "empty-dir").is_dir()
    assert oct(os.stat(path / "weights.safetensors").st_mode & 0o777) == oct(0o600)
    loaded = torch.load(path / "state.pt", weights_only=False)
    assert (
        loaded["view"].untyped_storage().data_ptr() == loaded["shared"].untyped_storage().data_ptr()
    )

    # restoring over an existing folder needs overwrite=True
    with pytest.raises(FileExistsError, match="checkpoint-3"):
        restore_checkpoint(url, tmp_path / "out")
    (path / "empty.txt").write_text("changed")
    restore_checkpoint(url, tmp_path / "out", overwrite=True)
    assert_same_files(path, folder)

    # the same step saved again replaces it (a resumed run), as the Trainer's folder would be
    (folder / "sub" / "deeper" / "notes.json").write_text('{"a": 2}')
    CkptStoreCallback(url, settings=SETTINGS).store_folder(folder, 3)
    assert names(url) == ["checkpoint-3"]
    assert_same_files(restore_checkpoint(url, tmp_path / "again"), folder)
    with pytest.raises(ckptstore.CheckpointExistsError):
        CkptStoreCallback(url, overwrite=False, settings=SETTINGS).store_folder(folder, 3)


def _hostile_safetensors(kind: str) -> bytes:
    """A file named .safetensors whose header lies about its bytes."""
    data = bytes(range(256)) * 32  # 8 KiB, above MIN_PIECE_BYTES
    entry = {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}
    header = {
        "overlap": {"a": entry, "b": {**entry, "data_offsets": [2048, 6144]}},
        "out of range": {"a": {**entry, "data_offsets": [6144, 10240]}},
        "unknown dtype": {"a": {**entry, "dtype": "F128"}},
        "a JSON list": [entry],
    }.get(kind, {"a": entry})
    head = json.dumps(header).encode()
    if kind == "length beyond the file":
        return struct.pack("<Q", 1 << 40) + head + data
    return struct.pack("<Q", len(head)) + head + data


@pytest.mark.parametrize(
    "kind", ["overlap", "out of range", "unknown dtype", "a JSON list", "length beyond the file"]
)
def test_a_hostile_safetensors_file_is_kept_as_plain_bytes(tmp_path, kind):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    save_file({"w": torch.arange(2048, dtype=torch.float32)}, str(folder / "good.safetensors"))
    (folder / "bad.safetensors").write_bytes(_hostile_safetensors(kind))
    url = str(tmp_path / "store")
    CkptStoreCallback(url, settings=SETTINGS).store_folder(folder, 2)

    sd = ckptstore.load_full(url, step=2)
    assert sd["good.safetensors:w"].dtype == torch.float32  # a valid file is still cut
    assert not [k for k in sd if k.startswith("bad.safetensors:")]
    pieces = {f["path"]: f["pieces"] for f in json.loads(sd[INDEX_KEY])["files"]}
    assert pieces["bad.safetensors"] == []
    assert_same_files(restore_checkpoint(url, tmp_path / "out"), folder)


def test_restore_errors_name_the_store_and_step(tmp_path):
    url = str(tmp_path / "store")
    with pytest.raises(StoreNotFoundError):
        restore_checkpoint(url, tmp_path / "out")
    assert latest_step(url) is None

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    CkptStoreCallback(url, settings=SETTINGS).store_folder(folder, 2)
    with pytest.raises(CheckpointNotFoundError, match=r"store .*store has no step 7.*\[2\]"):
        restore_checkpoint(url, tmp_path / "out", step=7)
    assert not (tmp_path / "out").exists()

    ckptstore.save({"w": torch.zeros(3)}, url, name="plain")
    with pytest.raises(ValueError, match="not written by CkptStoreCallback"):
        restore_checkpoint(url, tmp_path / "out", name="plain")


def craft(url: str, name: str, step: int, files: dict[str, bytes], edit=None) -> None:
    """Saves, with ckptstore.save alone, checkpoint ``name`` as store_folder would store a
    folder of ``files`` (mode 0644, no pieces), its index changed by ``edit`` first: what a
    hostile or damaged store can hold."""
    state: dict = {rel: torch.tensor(list(data), dtype=torch.uint8) for rel, data in files.items()}
    index = {
        "format": 1,
        "folder": name,
        "dirs": [],
        "files": [
            {
                "path": rel,
                "size": len(data),
                "mode": 0o644,
                "sha256": hashlib.sha256(data).hexdigest(),
                "pieces": [],
            }
            for rel, data in files.items()
        ],
    }
    if edit is not None:
        edit(index, state)
    state[INDEX_KEY] = json.dumps(index)
    ckptstore.save(state, url, name=name, step=step, overwrite=True, settings=SETTINGS)


def tree(path: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(path.rglob("*"))
    }


@pytest.mark.parametrize(
    "folder", ["victim", "checkpoint-9", "../victim", "checkpoint-7/x", "", None, 7]
)
def test_a_checkpoint_is_restored_only_as_its_own_folder(tmp_path, folder):
    """The index's folder name is the store's data: restoring checkpoint-7 must never
    replace out/victim (or another checkpoint's folder) because the index says so."""
    url, out = str(tmp_path / "store"), tmp_path / "out"
    for name in ("victim", "checkpoint-9"):
        (out / name).mkdir(parents=True)
        (out / name / "keep.txt").write_text("mine")
    before = tree(tmp_path)

    def edit(index, state):
        index["folder"] = folder

    craft(url, "checkpoint-7", 7, {"a.txt": b"stored"}, edit)
    with pytest.raises(ValueError, match="names the folder"):
        restore_checkpoint(url, out, step=7, overwrite=True)
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("store")} == {
        k: v for k, v in before.items() if not k.startswith("store")
    }


def test_restoring_the_best_checkpoint_removes_nothing_else(tmp_path):
    url, out = str(tmp_path / "store"), tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "keep.txt").write_text("mine")

    # trainer_state.json names a missing checkpoint-7 whose index says "data"
    def best(path: Path) -> dict[str, bytes]:
        return {"trainer_state.json": json.dumps({"best_model_checkpoint": str(path)}).encode()}

    def to_data(index, state):
        index["folder"] = "data"

    craft(url, "checkpoint-8", 8, best(out / "checkpoint-7"))
    craft(url, "checkpoint-7", 7, {"a.txt": b"stored"}, to_data)
    with pytest.raises(ValueError, match="checkpoint-7 .*names the folder 'data'"):
        restore_checkpoint(url, out, step=8)  # overwrite=False
    assert (out / "data" / "keep.txt").read_text() == "mine"
    assert folders(out) == ["checkpoint-8"]

    # a recorded path that does not exist as written ("gone/..") but names a folder that
    # does: that folder is kept without overwrite=True, replaced with it
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "local.txt").write_text("mine")
    craft(url, "checkpoint-9", 9, best(out / "gone" / ".." / "checkpoint-4"))
    craft(url, "checkpoint-4", 4, {"a.txt": b"stored"})
    restore_checkpoint(url, out, step=9)
    assert tree(out / "checkpoint-4") == {"local.txt": b"mine"}
    restore_checkpoint(url, out, step=9, overwrite=True)
    assert tree(out / "checkpoint-4") == {"a.txt": b"stored"}
    assert (out / "data" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-4",
        "checkpoint-8",
        "checkpoint-9",
        "data",
    ]


def test_stored_modes_come_back_as_permission_bits_less_the_umask(tmp_path):
    url = str(tmp_path / "store")

    def modes(index, state):
        index["files"][0]["mode"] = 0o106777  # setuid, setgid, sticky, world-writable
        index["files"][1]["mode"] = 0o600

    craft(url, "checkpoint-5", 5, {"a.bin": b"a", "b.bin": b"b"}, modes)
    old = os.umask(0o022)
    try:
        path = restore_checkpoint(url, tmp_path / "out")
    finally:
        os.umask(old)
    assert oct(os.stat(path / "a.bin").st_mode & 0o7777) == oct(0o755)
    assert oct(os.stat(path / "b.bin").st_mode & 0o7777) == oct(0o600)

    for bad in ("0o777", True, None, 7.0):

        def edit(index, state, bad=bad):
            index["files"][0]["mode"] = bad

        craft(url, "checkpoint-6", 6, {"a.bin": b"a"}, edit)
        with pytest.raises(ValueError, match="entry of 'a.bin' is malformed"):
            restore_checkpoint(url, tmp_path / "bad", step=6)
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "bad",
    [
        "/ABSOLUTE/escape.txt",
        "../escape.txt",
        "sub/../../escape.txt",
        "a//b",
        "a/./b",
        "a/",
        ".",
        "",
        "a\0b",
        5,
        None,
    ],
)
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_index_paths_outside_the_folder_are_refused(tmp_path, bad, kind):
    url, out = str(tmp_path / "store"), tmp_path / "out"
    if isinstance(bad, str):
        bad = bad.replace("/ABSOLUTE", str(tmp_path))

    def edit(index, state):
        if kind == "dir":
            index["dirs"].append(bad)
            return
        data = b"outside"
        index["files"].append(
            {
                "path": bad,
                "size": len(data),
                "mode": 0o644,
                "sha256": hashlib.sha256(data).hexdigest(),
                "pieces": [],
            }
        )
        if isinstance(bad, str):
            state[bad] = torch.tensor(list(data), dtype=torch.uint8)

    craft(url, "checkpoint-7", 7, {"ok.txt": b"ok"}, edit)
    before = sorted(p for p in tmp_path.rglob("*") if "store" not in p.parts)
    with pytest.raises(ValueError, match=r"refusing the path .* not a plain relative path"):
        restore_checkpoint(url, out)
    assert sorted(p for p in tmp_path.rglob("*") if "store" not in p.parts) == before
    assert not out.exists()


@pytest.mark.parametrize(
    "edit",
    [
        lambda index, state: index.update(format="1"),
        lambda index, state: index.update(format=2),
        lambda index, state: index.update(files="ok.txt"),
        lambda index, state: index["files"][0].update(size="2"),
        lambda index, state: index["files"][0].update(pieces=[[0, 1, "missing"]]),
        lambda index, state: index["files"][0].update(pieces=[[-1, 1, "ok.txt"]]),
        lambda index, state: state.pop("ok.txt"),
    ],
    ids=[
        "format-str",
        "format-newer",
        "files-str",
        "size-str",
        "piece-key",
        "piece-neg",
        "no-bytes",
    ],
)
def test_a_malformed_index_is_refused_before_anything_is_written(tmp_path, edit):
    url, out = str(tmp_path / "store"), tmp_path / "out"
    craft(url, "checkpoint-7", 7, {"ok.txt": b"ok"}, edit)
    with pytest.raises(ValueError, match="checkpoint checkpoint-7 of store"):
        restore_checkpoint(url, out)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["dir-link", "file-link", "broken-link", "fifo"])
def test_links_and_special_files_are_refused_and_the_folder_kept(tmp_path, kind):
    """os.walk skips a linked folder (lost when the folder is deleted), follows a linked
    file (a file outside stored) and a FIFO blocks the read: refused before storing."""
    url, run = str(tmp_path / "store"), tmp_path / "run"
    folder = run / "checkpoint-2"
    (folder / "sub").mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the checkpoint's")
    odd = folder / "sub" / "odd"
    if kind == "dir-link":
        odd.symlink_to(outside, target_is_directory=True)
    elif kind == "file-link":
        odd.symlink_to(outside / "secret.txt")
    elif kind == "broken-link":
        odd.symlink_to(tmp_path / "nothing")
    else:
        os.mkfifo(odd)
    cb = CkptStoreCallback(url, settings=SETTINGS)
    with pytest.raises(ValueError, match=re.escape(str(odd))):
        cb.store_folder(folder, 2)
    args = types.SimpleNamespace(
        output_dir=str(run), save_total_limit=None, load_best_model_at_end=False
    )
    state = types.SimpleNamespace(
        global_step=2, is_world_process_zero=True, best_model_checkpoint=None
    )
    with pytest.raises(ValueError, match="nothing was stored, nothing deleted"):
        cb.on_save(args, state, None)
    assert (folder / "trainer_state.json").read_text() == "{}"
    assert os.path.lexists(odd) and (outside / "secret.txt").exists()
    assert cb.last_save is None and not os.path.exists(url)

    # the folder itself a link, a folder not named checkpoint-N, no folder: refused too
    (tmp_path / "checkpoint-3").symlink_to(folder, target_is_directory=True)
    with pytest.raises(ValueError, match="a symbolic link"):
        cb.store_folder(tmp_path / "checkpoint-3", 3)
    (tmp_path / "best-model").mkdir()
    with pytest.raises(ValueError, match="named checkpoint-N"):
        cb.store_folder(tmp_path / "best-model", 3)
    with pytest.raises(FileNotFoundError):
        cb.store_folder(tmp_path / "checkpoint-4", 4)
    assert not os.path.exists(url)


def test_save_total_limit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="save_total_limit=None"):
        Trainer(
            model=tiny_model(0),
            args=make_args(tmp_path / "run", save_total_limit=2),
            train_dataset=Toy(),
            callbacks=[CkptStoreCallback(str(tmp_path / "store"))],
        )
    with pytest.raises(ValueError, match="keep_last must be a positive int"):
        CkptStoreCallback(str(tmp_path / "store"), keep_last=0)
    # the Hub upload of each checkpoint folder runs in the background: it needs the folder
    hub = types.SimpleNamespace(save_total_limit=None, push_to_hub=True, hub_strategy="checkpoint")
    with pytest.raises(ValueError, match="hub_strategy='checkpoint'"):
        CkptStoreCallback(str(tmp_path / "store")).on_init_end(hub, None, None)
    CkptStoreCallback(str(tmp_path / "store"), keep_local=True).on_init_end(hub, None, None)


def test_without_transformers_the_import_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "ckptstore.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'ckptstore\[transformers\]'"):
        importlib.import_module("ckptstore.integrations.transformers")


def _one_rank_stores(rank: int, world: int, port: int, url: str, run: str, out: str) -> None:
    from tests import dist_workers as w

    w._init(rank, world, port)
    cb = CkptStoreCallback(url, settings=SETTINGS)
    args = types.SimpleNamespace(
        output_dir=run, save_total_limit=None, load_best_model_at_end=False
    )
    state = types.SimpleNamespace(
        global_step=2, is_world_process_zero=rank == 0, best_model_checkpoint=None
    )
    Path(run, "checkpoint-2", f"rng_state_{rank}.pth").write_bytes(bytes([rank]) * 10)
    cb.on_save(args, state, None)
    Path(out, f"done-{rank}").write_text("ok")
    w._finish()


@pytest.mark.slow
def test_under_torch_distributed_only_rank_zero_stores(tmp_path):
    from tests import dist_workers as w

    url, run = str(tmp_path / "store"), tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    w.spawn(_one_rank_stores, 2, url, str(run), str(tmp_path))
    assert (tmp_path / "done-0").exists() and (tmp_path / "done-1").exists()
    assert names(url) == ["checkpoint-2"]
    assert folders(run) == []
    path = restore_checkpoint(url, tmp_path / "out")
    assert sorted(p.name for p in path.iterdir()) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
        "trainer_state.json",
    ]
