"""`rankserve cluster` in a subprocess for the slow tests: its own session, so that everything it started (Ray's
GCS, raylet, workers, replicas) is found by session id and stopped even when a test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.util_server import ROOT, free_port


def session_pids(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session ``sid``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    return found


class ClusterProcess:
    def __init__(self, tmp: Path, model: str, store: str, replicas: int = 2, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.replicas = replicas
        self.log_path = tmp / f"cluster-{self.port}.log"
        self.cmd = [sys.executable, "-m", "server.cli", "cluster", "--replicas", str(replicas), "--model", model,
                    "--store", store, "--host", "127.0.0.1", "--port", str(self.port),
                    "--store-cache", str(tmp / f"cluster-cache-{self.port}"), *args]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> ClusterProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_replicas(self.replicas, timeout)
        return self

    def engine_pids(self) -> list[int]:
        return sorted(p for p, cmd in session_pids(self.proc.pid).items()
                      if "ServeReplica:rankserve:Engine" in cmd and "initialize" not in cmd)

    def wait_replicas(self, n: int, timeout: float) -> None:
        """n engine replicas up and the API answering /ready."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                if len(self.engine_pids()) >= n and httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"cluster not ready within {timeout} s:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (the CLI deletes the app and stops its Ray); whatever of its session is left is killed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while session_pids(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()
