"""Probes across the server's life, in-process: /ready is 503 while loading, a failed load or a dead
engine turns /health 503, and draining refuses new work while probes keep answering."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from server import state as state_mod
from server.api.app import create_app
from server.common.config import Settings
from tests.util_server import app_client, wait_for


def test_ready_is_503_while_loading_then_200(tmp_path, monkeypatch):
    release = threading.Event()
    real = state_mod.load_runtime

    def slow_load(settings, metrics):
        assert release.wait(30)
        return real(settings, metrics)

    monkeypatch.setattr(state_mod, "load_runtime", slow_load)
    app = create_app(Settings(model="tiny-llama", store=str(tmp_path / "store"), demo_adapters=True))
    with TestClient(app) as client:
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert client.get("/health").status_code == 200  # alive, just not ready
        r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        wait_for(lambda: client.get("/ready").status_code == 200, 60, "ready")
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert models == ["tiny-llama", "demo-classify", "demo-lora"]
        assert client.post("/v1/completions", json={"model": "demo-lora", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_failed_load_is_unhealthy_and_reported(tmp_path):
    failed = threading.Event()
    app = create_app(Settings(model="no-such-model", store=str(tmp_path)), on_load_failure=failed.set)
    with TestClient(app) as client:
        assert failed.wait(30)
        r = client.get("/health")
        assert r.status_code == 503 and "no-such-model" in r.json()["detail"]
        assert client.get("/ready").status_code == 503
        r = client.get("/v1/models")
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def test_dead_engine_fails_health_and_requests(tmp_path):
    with app_client("tiny-llama", tmp_path) as (client, state):
        engine = state.runtime.engine

        def crash(*a, **k):
            raise RuntimeError("CUDA error: simulated device fault")  # device-fatal, not one request's

        engine.runner.forward = crash
        r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "device fault" in r.json()["error"]["message"]
        wait_for(lambda: not engine.healthy)
        assert client.get("/health").status_code == 503 and client.get("/ready").status_code == 503
        assert client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x"}).status_code == 503


def test_draining_refuses_new_work_but_answers_probes(tmp_path):
    with app_client("tiny-llama", tmp_path) as (client, state):
        state.begin_drain()
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
        r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert client.get("/v1/models").status_code == 503
        assert state.wait_drained(1.0)
