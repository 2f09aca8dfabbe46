"""docker/train_job.py end to end: 2 ranks (torchrun, gloo) train, save to SeaweedFS, get
stopped, resume from the bucket, and end bit-identical to a run that was never stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ckptstore
from tests.conftest import S3_BUCKET

JOB = Path(__file__).resolve().parent.parent / "docker" / "train_job.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(server, tmp_path: Path, tag: str, *args: str) -> dict:
    report = tmp_path / f"{tag}.json"
    env = {
        **os.environ,
        **server.env(),
        "GLOO_SOCKET_IFNAME": "lo",  # keep gloo on loopback
        "OMP_NUM_THREADS": "1",
        "CKPTSTORE_THREADS": "2",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(JOB),
        "--report",
        str(report),
        "--width",
        "128",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{tag}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {**json.loads(report.read_text()), "events": events}


@pytest.mark.slow
def test_train_job_saves_and_resumes_from_bucket(s3_server, tmp_path):
    straight = f"s3://{S3_BUCKET}/job-straight-{tmp_path.name}"
    stopped = f"s3://{S3_BUCKET}/job-resumed-{tmp_path.name}"
    common = ["--steps", "6", "--save-every", "3"]

    a = torchrun(s3_server, tmp_path, "straight", "--url", straight, *common)
    assert a["world_size"] == 2 and a["resumed_from"] is None and a["saves"] == [3, 6]

    b1 = torchrun(s3_server, tmp_path, "first", "--url", stopped, *common, "--stop-after", "4")
    assert b1["saves"] == [3] and b1["final_step"] == 4  # step 4 was never saved
    b2 = torchrun(s3_server, tmp_path, "resume", "--url", stopped, *common)
    assert b2["resumed_from"] == 3 and b2["saves"] == [6]
    assert b2["digest"] == a["digest"]  # same weights as the run that never stopped

    opts = s3_server.storage_options()
    store = ckptstore.Store(stopped, storage_options=opts)
    assert [c.step for c in store.list()] == [3, 6]
    assert store.verify().ok
    # a 2-rank checkpoint loads whole in one process (DDP replicas were written once)
    full = ckptstore.load_full(stopped, step=6, storage_options=opts)
    assert full["step"] == 6 and "inp.weight" in full["model"]
