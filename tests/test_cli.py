"""The CLI run as a user runs it: a subprocess, JSON parsed, exit codes checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ckptstore
from ckptstore.store import Repository, layout
from tests.helpers import run_cli

run = run_cli


@pytest.fixture
def store(local_url):
    ckptstore.save({"w": torch.randn(2048, 512), "b": torch.zeros(8)}, local_url, step=10)
    ckptstore.save({"w": torch.randn(2048, 512), "b": torch.ones(8)}, local_url, step=20)
    return local_url


def test_ls_json(store):
    rows = json.loads(run("ls", store, "--json").stdout)
    assert [r["name"] for r in rows] == ["step-000000000010", "step-000000000020"]
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["logical_bytes"] == 2048 * 512 * 4 + 32
    assert 1.0 < rows[0]["ratio"] < 1.3  # random normal floats: only the exponent compresses


def test_ls_table(store):
    out = run("ls", store).stdout
    assert "step-000000000020" in out and "ratio" in out


def test_inspect_json_and_table(store):
    rep = json.loads(run("inspect", store, "--step", "10", "--json").stdout)
    assert rep["checkpoint"]["name"] == "step-000000000010"
    w = next(t for t in rep["tensors"] if t["fqn"] == "w")
    assert w["shape"] == [2048, 512] and w["dtype"] == "float32"
    assert w["codec"] == "group4+rot>zstd-entropy"
    assert w["chunks"] == 1 and w["shared_bytes"] == 0
    assert run("inspect", store).stdout.count("step-000000000020") == 1


def test_verify_ok_and_damaged(store):
    out = json.loads(run("verify", store, "--json").stdout)
    assert out["ok"] and out["chunks_checked"] == 2
    repo = Repository.open(store)
    key = repo.backend.list(layout.CHUNKS)[0]
    path = repo.backend.path(key)
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    proc = run("verify", store, check=False)
    assert proc.returncode == 1
    assert key in proc.stderr and "'w'" in proc.stderr and "step-0000000000" in proc.stderr
    proc = run("verify", store, "--json", check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["problems"][0]["chunk"] == key


def test_exit_codes_and_one_line_errors(tmp_path, store):
    proc = run("ls", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0 and "StoreNotFoundError" in proc.stderr
    proc = run("inspect", store, "--step", "99", check=False)
    assert proc.returncode == 3 and "step 99" in proc.stderr
    proc = run("ls", "nosuch://bucket", check=False)
    assert proc.returncode == 2 and "nosuch" in proc.stderr
    repo = Repository.open(store)
    mpath = repo.backend.path(layout.manifest_key("step-000000000010"))
    head = open(mpath, "rb").read()[:50]
    open(mpath, "wb").write(head)
    # ls reads no manifest that has a catalog entry; verify finds the damage
    listed = json.loads(run("ls", store, "--json").stdout)
    assert [r["name"] for r in listed] == ["step-000000000010", "step-000000000020"]
    assert run("verify", store, check=False).returncode == 1
    from ckptstore.store import catalog

    for key in repo.backend.list(catalog.entry_prefix("step-000000000010")):
        repo.backend.delete(key)  # as if the save had died between commit and entry
    proc = run("ls", store, "--json", check=False)  # the readable ones are still listed
    assert proc.returncode == 4 and "'step-000000000010' unreadable" in proc.stderr
    assert "truncated or corrupt" in proc.stderr
    assert [r["name"] for r in json.loads(proc.stdout)] == ["step-000000000020"]


def test_storage_options_flag(tmp_path):
    url = f"file://{tmp_path}/s"
    ckptstore.save({"a": torch.ones(3)}, url, step=1)
    rows = json.loads(run("ls", url, "-o", "auto_mkdir=true", "--json").stdout)
    assert rows[0]["name"] == "step-000000000001"


def test_demo_runs_end_to_end(tmp_path):
    url = str(tmp_path / "demo")
    proc = run("demo", "--url", url, "--checkpoints", "3", "--steps", "2")
    assert "bit-exact: OK" in proc.stdout
    rows = json.loads(run("ls", url, "--json").stdout)
    assert len(rows) == 3
    # after the first checkpoint only the head trains: later ones write far less
    assert rows[1]["new_bytes"] < 0.5 * rows[0]["new_bytes"]
    proc = run("demo", "--url", url, "--checkpoints", "1", "--steps", "2")  # resumes
    assert "resumed from step-000000000006" in proc.stdout
    assert len(json.loads(run("ls", url, "--json").stdout)) == 4


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "ckptstore")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and ckptstore.__version__ in proc.stdout


def test_inspect_shows_quantization_error(local_url):
    ckptstore.save(
        {"w": torch.randn(1024, 256), "b": torch.randn(16)},
        local_url,
        step=1,
        quantize={"w": "int8", "*": None},
    )
    out = run("inspect", local_url).stdout
    assert "rel. L2 err" in out and "int8/64" in out and "exact" in out
    rep = json.loads(run("inspect", local_url, "--json").stdout)
    w = next(t for t in rep["tensors"] if t["fqn"] == "w")
    assert 0 < w["rel_l2_error"] < 1e-2 and w["max_abs_error"] > 0
    b = next(t for t in rep["tensors"] if t["fqn"] == "b")
    assert b["rel_l2_error"] is None


def test_stdout_closed_early_exits_quietly(store):
    """``ckptstore ls URL --json | head -c 10``: the reader went away; no traceback, no
    error line, exit 141 (128 + SIGPIPE, as for a tool killed by SIGPIPE)."""
    for args in (("ls", store, "--json"), ("inspect", store, "--json"), ("ls", store)):
        r, w = os.pipe()
        os.close(r)  # the reader is gone before the first byte
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "ckptstore.cli.main", *args],
                stdout=w,
                stderr=subprocess.PIPE,
                text=True,
                timeout=300,
            )
        finally:
            os.close(w)
        assert proc.returncode == 141, (args, proc.stderr)
        assert proc.stderr == "", (args, proc.stderr)
    proc = subprocess.run(  # as typed in a shell
        f"{sys.executable} -m ckptstore.cli.main ls {store} --json | head -c 10; "
        'echo " ${PIPESTATUS[0]}"',
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.startswith("[") and proc.stdout.split()[-1] in ("0", "141")
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("option", [("--checkpoints", "0"), ("--steps", "0")])
def test_demo_rejects_bad_options_before_anything(tmp_path, option):
    url = str(tmp_path / "demo")
    proc = run("demo", "--url", url, *option, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "new store" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and option[0] in proc.stderr
    assert not os.path.exists(url)


def test_retention_of_the_last_save_runs_at_interpreter_exit(tmp_path):
    """The README's snippet: ``save(..., keep_last=N)`` as the last call of a script."""
    url = str(tmp_path / "ckpts")
    script = (
        "import torch, ckptstore\n"
        "for step in range(1, 6):\n"
        "    state = {'w': torch.randn(256, 64), 'step': step}\n"
        f"    ckptstore.save(state, {url!r}, step=step, keep_last=2)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "failed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    rows = json.loads(run("ls", url, "--json").stdout)
    assert [r["step"] for r in rows] == [4, 5]


@pytest.mark.parametrize(
    ("url", "code", "error"),
    [
        ("ftp:///x", 2, "InvalidURLError"),  # no host: fsspec's __init__ fails half-way
        ("nosuchproto://x", 2, "UnknownSchemeError"),
        ("ftp://127.0.0.1:1/x", 5, "StorageUnavailableError"),  # refused, no network needed
    ],
)
def test_a_url_whose_filesystem_cannot_be_built_is_one_line_naming_it(url, code, error):
    proc = run("ls", url, check=False)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # no "Exception ignored in ... __del__"
    assert proc.stderr.startswith(f"ckptstore: error: {error}: ") and url in proc.stderr


def test_dash_o_is_the_storage_option_in_every_command():
    from ckptstore.cli.main import cli

    for name, command in cli.commands.items():
        flags = {opt: p.name for p in command.params for opt in getattr(p, "opts", [])}
        if "--endpoint-url" in flags or "-o" in flags:
            assert flags.get("-o") == "storage_options", name
            assert flags.get("--storage-option") == "storage_options", name
    report = {opt for p in cli.commands["report"].params for opt in p.opts}
    assert {"-o", "--output"} <= report  # report among them: its page is --output PATH


def test_verify_export_and_gc_write_nothing_on_stderr_off_a_terminal(store, tmp_path):
    """A progress bar shows only on a terminal; off one (a pipe, a CI log) it used to leave
    a blank line on stderr."""
    proc = run("verify", store)
    assert proc.stderr == "" and proc.stdout.startswith("OK:")
    proc = run("export", store, str(tmp_path / "w.safetensors"))
    assert proc.stderr == "" and proc.stdout.startswith("wrote ")
    proc = run("gc", store, "--keep-last", "1", "--grace", "0s")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_cli_modules_keep_no_old_name_shims():
    """Output helpers live in ckptstore.render, options and exit codes in
    ckptstore.cli.common; ckptstore.cli.main defines the commands and re-exports nothing."""
    import importlib.util

    from ckptstore.cli import main

    assert importlib.util.find_spec("ckptstore.cli.render") is None
    for old in ("_exit_code", "_repo", "EXIT_USAGE", "EXIT_NOT_FOUND", "EXIT_OTHER"):
        assert not hasattr(main, old), old
