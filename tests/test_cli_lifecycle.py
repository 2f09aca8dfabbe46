"""gc, rm, du, diff, export and import run as a user runs them: subprocesses, --json parsed,
exit codes checked."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckptstore
from ckptstore.store import Repository, layout, leases
from tests.helpers import run_cli

run = run_cli


def js(*args: str) -> dict:
    return json.loads(run(*args, "--json").stdout)


@pytest.fixture
def store(local_url):
    frozen = torch.randn(512, 256)
    for i in range(5):
        state = {"frozen": frozen, "head": torch.randn(256, 256), "b": torch.ones(4) * i}
        ckptstore.save(state, local_url, step=10 * i, chunk_bytes=1 << 18)
    return local_url


def _objects(url: str) -> list[str]:
    return Repository.open(url).backend.list("")


def test_gc_dry_run_then_run(store):
    before = _objects(store)
    out = js("gc", store, "--keep-last", "2", "--keep", "10", "--grace", "0s", "--dry-run")
    assert out["dry_run"] and out["result"] is None
    plan = out["plan"]
    assert plan["dropped"] == [layout.step_name(0), layout.step_name(20)]
    assert plan["kept"] == [layout.step_name(s) for s in (10, 30, 40)]
    assert plan["chunks_freed"] == 2 and plan["bytes_freed"] > 0
    assert _objects(store) == before  # dry run: nothing changed
    table = run("gc", store, "--keep-last", "2", "--dry-run").stdout
    assert "dry run" in table and "drop" in table and "last 2" in table
    out = js("gc", store, "--keep-last", "2", "--keep", "10", "--grace", "0s")
    res = out["result"]
    assert res["dropped"] == plan["dropped"] and res["chunks_deleted"] == plan["chunks_freed"]
    assert res["bytes_deleted"] == plan["bytes_freed"]
    assert [r["step"] for r in js("ls", store)] == [10, 30, 40]
    assert js("verify", store)["ok"]


def test_gc_table_shows_progressless_summary(store):
    out = run("gc", store, "--keep-last", "1", "--grace", "0s").stdout
    assert "gc done" in out and "deleted 4 chunk(s)" in out


def test_rm_du_diff(store):
    out = js("rm", store, "--step", "20", "--name", layout.step_name(30))
    assert out["removed"] == [layout.step_name(20), layout.step_name(30)]
    du = js("du", store)
    assert [c["name"] for c in du["checkpoints"]] == [layout.step_name(s) for s in (0, 10, 40)]
    assert du["garbage_chunks"] == 2 and du["trash_entries"] == 2
    assert du["dedup_factor"] > 1.5 and du["total_factor"] > du["compression_factor"]
    assert "only here" in run("du", store).stdout
    diff = js("diff", store, "--from", "0", "--to", "40")
    assert diff["counts"] == {"added": 0, "removed": 0, "changed": 2, "unchanged": 1}
    assert diff["unchanged"] == ["frozen"] and diff["shared_bytes"] > diff["new_bytes"] > 0
    text = run("diff", store, "--from", "0", "--to", layout.step_name(40)).stdout
    assert "head" in text and "shared with" in text
    assert js("gc", store, "--grace", "0s")["result"]["chunks_deleted"] == 2


def test_export_import_roundtrip(store, tmp_path):
    out = str(tmp_path / "m.safetensors")
    ex = js("export", store, out, "--step", "40")
    assert ex["tensors"] == 3 and ex["format"] == "safetensors" and os.path.exists(out)
    other = str(tmp_path / "imported")
    im = js("import", out, other, "--step", "7")
    assert im["name"] == layout.step_name(7)
    original = ckptstore.load_full(store, step=40)
    got = ckptstore.load_full(other, step=7)
    for k in ("frozen", "head", "b"):
        assert torch.equal(original[k], got[k])
    pt = str(tmp_path / "m.pt")
    js("export", store, pt, "--dtype", "bf16")  # the latest: step 40
    assert torch.equal(torch.load(pt)["head"], original["head"].to(torch.bfloat16))
    im = js("import", pt, other, "--name", "q", "--quantize", "int8", "--prefix", "model.")
    assert im["name"] == "q" and im["quantize"] == "int8"
    rep = js("inspect", other, "--name", "q")
    assert {t["fqn"] for t in rep["tensors"]} == {"model.frozen", "model.head", "model.b"}
    assert js("verify", other)["ok"]


def test_exit_codes(store, tmp_path):
    proc = run("gc", store, "--keep", "nosuch", check=False)
    assert proc.returncode == 3 and "nosuch" in proc.stderr
    proc = run("gc", store, "--grace", "soon", check=False)
    assert proc.returncode == 2 and "grace" in proc.stderr
    proc = run("gc", store, "--keep-last", "0", check=False)
    assert proc.returncode == 2
    proc = run("rm", store, check=False)
    assert proc.returncode == 2
    proc = run("rm", store, "--step", "99", check=False)
    assert proc.returncode == 3
    proc = run("diff", store, "--from", "0", check=False)
    assert proc.returncode == 2
    proc = run("export", store, str(tmp_path / "x.npz"), check=False)
    assert proc.returncode == 2
    evil = str(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(2), "f": os.getcwd, "x": EvilThing()}, evil)
    proc = run("import", evil, str(tmp_path / "s"), "--step", "1", check=False)
    assert proc.returncode == 5 and "UnsafeObjectError" in proc.stderr
    proc = run("import", evil, str(tmp_path / "s"), check=False)
    assert proc.returncode == 2
    # another gc holds the lock: exit 5, one line
    lock = leases.acquire_gc(Repository.open(store).backend)
    try:
        proc = run("gc", store, "--keep-last", "1", check=False)
        assert proc.returncode == 5 and "GcBusyError" in proc.stderr
        assert proc.stderr.strip().count("\n") == 0
    finally:
        lock.release()
    # an unreadable manifest: gc says so (exit 4) and deletes no chunk (tests/test_gc_full.py)
    mpath = Repository.open(store).backend.path(layout.manifest_key(layout.step_name(10)))
    with open(mpath, "r+b") as f:
        f.truncate(30)
    before = [k for k in _objects(store) if k.startswith("chunks/")]
    proc = run("gc", store, "--keep-last", "1", "--grace", "0s", check=False)
    assert proc.returncode == 4 and "ManifestError" in proc.stderr
    assert "unreadable" in proc.stderr and "deleted no chunk" in proc.stdout
    assert [k for k in _objects(store) if k.startswith("chunks/")] == before


def test_export_errors_leave_nothing(store, tmp_path):
    """OUT inside a file: one line naming it, exit 2 (docs/cli.md), nothing written."""
    afile = tmp_path / "afile.txt"
    afile.write_text("text")
    before = sorted(os.listdir(tmp_path))
    for out in (f"{afile}/out.pt", f"{afile}/sub/out.safetensors"):
        proc = run("export", store, out, check=False)
        assert proc.returncode == 2, proc.stderr
        assert (
            proc.stderr.strip()
            == f"ckptstore: error: cannot write {out}: {afile} is a file, not a folder"
        )
    proc = run("export", store, str(tmp_path / "missing" / "out.pt"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    proc = run("export", store, str(tmp_path), "--format", "pt", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(f"{tmp_path}: it is a folder")
    assert sorted(os.listdir(tmp_path)) == before


def test_interrupted_export_leaves_nothing(store, tmp_path, monkeypatch):
    """Ctrl-C during ``ckptstore export`` (a KeyboardInterrupt between tensors): "Aborted!",
    exit 1, and no file at all in OUT's folder."""
    from click.testing import CliRunner

    import ckptstore.tensors
    from ckptstore.cli.main import cli

    real = ckptstore.tensors.iter_full_tensors

    def interrupted(session, fqns, pool=None):
        for i, item in enumerate(real(session, fqns, pool)):
            if i == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(ckptstore.tensors, "iter_full_tensors", interrupted)
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("m.safetensors", "m.pt"):
        res = CliRunner().invoke(cli, ["export", store, str(folder / name)])
        assert res.exit_code == 1 and "Aborted!" in res.output, res.output
        assert os.listdir(folder) == []


class EvilThing:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_gc_executes_the_plan_it_shows(store, monkeypatch):
    """In process, so that a checkpoint can be committed between the plan and the run: the
    run gets the very plan object shown, drops only what it lists, and says what it left."""
    from click.testing import CliRunner

    from ckptstore.cli.main import cli
    from ckptstore.store import gc_plan, gc_run

    real_plan, real_execute = gc_plan.plan, gc_run.execute
    seen: dict = {"step": 40}

    def plan_then_commit(*args, **kwargs):
        seen["plan"] = p = real_plan(*args, **kwargs)
        seen["step"] += 10
        ckptstore.save({"late": torch.ones(4)}, store, step=seen["step"])
        return p

    def execute(repo, plan, **kwargs):
        assert plan is seen["plan"]
        return real_execute(repo, plan, **kwargs)

    monkeypatch.setattr(gc_plan, "plan", plan_then_commit)
    monkeypatch.setattr(gc_run, "execute", execute)
    args = ["gc", store, "--keep-last", "2", "--grace", "0s"]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert "plan" not in out["result"]  # the plan once, beside the result
    assert out["result"]["dropped"] == out["plan"]["dropped"]  # not step 30 (kept by the plan)
    assert out["result"]["new_checkpoints"] == [layout.step_name(50)]
    assert out["result"]["chunks_deleted"] <= out["plan"]["chunks_freed"]
    assert [r["step"] for r in js("ls", store)] == [30, 40, 50]
    res = CliRunner().invoke(cli, args)  # shown as text: what it left alone
    assert res.exit_code == 0 and "left alone 1 checkpoint(s)" in res.stdout
    assert layout.step_name(60) in res.stdout
    assert [r["step"] for r in js("ls", store)] == [40, 50, 60]
