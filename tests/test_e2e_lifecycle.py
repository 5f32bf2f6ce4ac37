"""The real server across its life: SIGTERM under load drains and exits 0 (RELIABILITY row 29), and a
restart over adapters on disk rebuilds and re-validates the registry, ignoring partial files (row 33)."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from adapters_store.format import loads
from adapters_store.store import AdapterStore
from adapters_store.synth import random_adapter
from tests.util_apply import apply_adapter, hf_greedy
from tests.util_server import LiveServer, compiled_bytes, multipart, sse_events


def stream_all(url: str, body: dict, out: list, first: threading.Event) -> None:
    try:
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            text = ""
            for chunk in r.iter_text():
                text += chunk
                first.set()
            out.append((r.status_code, text))
    except httpx.HTTPError as e:  # expected only when the drain timeout cuts a stream
        out.append((None, repr(e)))


def test_sigterm_drains_in_flight_then_exits_0(tmp_path, tiny_llama):  # row 29
    store = tmp_path / "store"
    srv = LiveServer(tmp_path, "tiny-llama", "--drain-timeout", "20", store=store).start()
    try:
        c = srv.client()
        keep = compiled_bytes(tiny_llama, "dora", 4, seed=1)
        assert c.post("/v1/adapters", **multipart("keep", {"k.safetensors": keep})).status_code == 201
        body = {"model": "keep", "prompt": "abc", "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        results: list = []
        firsts = [threading.Event() for _ in range(8)]
        threads = [threading.Thread(target=stream_all, args=(srv.url, body, results, f)) for f in firsts]
        for t in threads:
            t.start()
        assert all(f.wait(30) for f in firsts)  # every stream is producing tokens
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "draining"  # at once
        r = c.post("/v1/completions", json={"model": "keep", "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert srv.proc.poll() is None  # still serving the in-flight streams
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - sent < 20
        for t in threads:
            t.join(10)
        assert len(results) == 8
        for status, text in results:  # every in-flight request finished whole
            events = sse_events(text)
            assert status == 200 and events[-1] == "[DONE]"
            assert events[-3]["choices"][0]["finish_reason"] == "length"
            assert events[-2]["usage"]["completion_tokens"] == 300
        msgs = [e["msg"] for e in srv.log_events()]
        assert "drain started" in msgs and "drain finished" in msgs
    finally:
        srv.stop()


def test_restart_rebuilds_and_revalidates_the_registry_ignoring_partial_files(tmp_path, tiny_llama):  # row 33
    store = tmp_path / "store"
    keep = compiled_bytes(tiny_llama, "dora", 4, seed=1)
    AdapterStore(store).put("keep", keep, base=tiny_llama)  # what an earlier run stored
    # What a crash or an operator could leave in the store while the server was down.
    partial = store / "tmp" / "deadbeef.d"
    partial.mkdir(parents=True)
    (partial / "adapter.safetensors").write_bytes(keep[: len(keep) // 2])
    hand = store / "adapters" / "hand-placed"
    hand.mkdir()
    (hand / "adapter.safetensors").write_bytes(compiled_bytes(tiny_llama, "lora", 4, seed=2))
    foreign = random_adapter(tiny_llama, "lora", 4, seed=3)
    foreign.meta.base_fingerprint = "f" * 32  # trained against other base weights
    (store / "adapters" / "other-base").mkdir()
    foreign.save(store / "adapters" / "other-base" / "adapter.safetensors")
    (store / "adapters" / "garbage").mkdir()
    (store / "adapters" / "garbage" / "adapter.safetensors").write_bytes(b"\x00" * 64)

    srv = LiveServer(tmp_path, "tiny-llama", "--drain-timeout", "0.2", store=store).start()
    try:
        c = srv.client()
        models = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert models == {"tiny-llama", "keep", "hand-placed"}
        assert not partial.exists()
        r = c.post("/v1/completions", json={"model": "keep", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0,
                                            "ignore_eos": True})
        want = hf_greedy(apply_adapter(tiny_llama.model, loads(keep)), [5, 6, 7], 6)
        assert r.json()["choices"][0]["text"] == tiny_llama.tokenizer.decode(want, skip_special_tokens=True)
        assert c.post("/v1/completions", json={"model": "hand-placed", "prompt": "abc"}).status_code == 200
        r = c.post("/v1/completions", json={"model": "other-base", "prompt": "abc"})
        assert r.status_code == 424 and "fingerprint" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "garbage", "prompt": "abc"})
        assert r.status_code == 422 and "unreadable" in r.json()["error"]["message"]
        warnings = [e for e in srv.log_events() if e["level"] == "warning"]
        assert any("other-base" in str(e.get("adapters")) for e in warnings)
        # a drain timeout shorter than the work still exits 0, on time
        long = {"model": "keep", "prompt": [5, 6], "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}
        results, first = [], threading.Event()
        threads = [threading.Thread(target=stream_all, args=(srv.url, long, results, first)) for _ in range(24)]
        for t in threads:
            t.start()
        assert first.wait(30)
        sent = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(20) == 0
        assert time.monotonic() - sent < 1 + 10  # drain timeout + uvicorn's 1 s grace + process exit on a busy box
        assert "drain timed out; exiting with requests in flight" in [e["msg"] for e in srv.log_events()]
        for t in threads:
            t.join(10)
    finally:
        srv.stop()
