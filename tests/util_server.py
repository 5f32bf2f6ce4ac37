"""Harnesses for the HTTP tests: the app in-process over the real engine and store (TestClient), and the
real `rankserve serve` (uvicorn) in a subprocess on a free loopback port."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_client(model: str, store_dir: Path, engine_opts: dict | None = None, **settings):
    """(TestClient, ServerState) for an app over a fresh base (the engine installs its pool into the
    model, so it never shares the session fixtures' models)."""
    from fastapi.testclient import TestClient

    from adapters_store.basemodels import load_base
    from adapters_store.store import AdapterStore
    from adapters_store.validate import Limits
    from server.api.app import create_app
    from server.common.config import Settings
    from server.common.metrics import Metrics
    from server.engine import Engine, EngineConfig
    from server.state import Runtime

    s = Settings(model=model, store=str(store_dir), **settings)
    base = load_base(model)
    store = AdapterStore(store_dir, Limits(max_file_bytes=s.max_upload_bytes, max_rank=s.max_rank))
    metrics = Metrics(model=model)
    opts = dict(max_batch_tokens=128, max_running=16, max_queue=32, max_model_len=256, kv_block_size=8,
                max_slots=8, max_rank=32, request_timeout_s=s.request_timeout)
    opts.update(engine_opts or {})
    engine = Engine(base, store, EngineConfig(**opts), metrics)
    engine.start()
    app = create_app(s, Runtime(base, store, engine), metrics)
    try:
        with TestClient(app) as client:
            yield client, app.state.rankserve
    finally:
        engine.shutdown()


class LiveServer:
    """`python -m server.cli serve ...` on a free port; JSON logs go to a file the tests can read."""

    def __init__(self, tmp: Path, model: str, *args: str, env: dict[str, str] | None = None, store: Path | None = None,
                 module: str = "server.cli"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = store or tmp / "store"
        self.log_path = tmp / f"server-{self.port}.log"
        self.cmd = [sys.executable, "-m", module, "serve", "--model", model, "--store", str(self.store),
                    "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0, wait_ready: bool = True) -> LiveServer:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready:
            try:
                self.wait_ready(timeout)
            except BaseException:  # never leave a server behind: ``with`` calls no __exit__ when start fails
                self.stop(signal.SIGKILL, timeout=5)
                raise
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready within {timeout} s:\n{self.logs()}")

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> LiveServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def compiled_bytes(base, method: str = "lora", rank: int = 4, seed: int = 0, task: str = "generate", **kw) -> bytes:
    from adapters_store.synth import random_adapter

    return random_adapter(base, method, rank, seed=seed, task=task, std=0.1, **kw).to_bytes()


def peft_files(base_model: torch.nn.Module, seed: int = 0, num_labels: int = 0, **lora) -> dict[str, bytes]:
    """A PEFT LoRA/DoRA upload ({filename: bytes}) saved by peft itself, with random non-zero factors (B is
    zero at PEFT's init, which would make the adapter a no-op). ``num_labels`` > 0: a decoder SEQ_CLS
    adapter with a ``score`` head over the same base weights."""
    import peft

    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora})
    model = copy.deepcopy(base_model)
    if num_labels:
        from transformers import LlamaForSequenceClassification

        config = copy.deepcopy(base_model.config)
        config.num_labels = num_labels
        model = LlamaForSequenceClassification(config)
        model.model.load_state_dict(base_model.model.state_dict())
        cfg.task_type = "SEQ_CLS"
    pm = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        return {name: (Path(d) / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def multipart(adapter_id: str | None, files: dict[str, bytes], **fields: str) -> dict:
    """httpx/TestClient keyword arguments for an upload."""
    data = dict(fields)
    if adapter_id is not None:
        data["adapter_id"] = adapter_id
    return {"data": data, "files": [("files", (name, blob, "application/octet-stream")) for name, blob in files.items()]}


class Gate:
    """Holds the engine's model forward until opened, so requests pile up deterministically."""

    def __init__(self, engine):
        import threading

        self.open = threading.Event()
        self.entered = threading.Event()
        self.runner = engine.runner
        self.inner = engine.runner.forward

        def forward(chunks, **kw):
            self.entered.set()
            self.open.wait(30)
            return self.inner(chunks, **kw)

        self.runner.forward = forward

    def release(self) -> None:
        self.open.set()
        self.runner.forward = self.inner


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what} not reached within {timeout} s")


def sse_events(text: str) -> list:
    """The JSON payloads of an SSE body, with the final [DONE] as the string "[DONE]"."""
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0
