"""The real server: `python -m server.cli serve` (uvicorn) on a loopback port, on tiny-llama and tiny-bert,
configured from flags and RANKSERVE_* env vars. Uploads of compiled and PEFT adapters, generate and
classify concurrently, streaming, delete and re-upload; and, over real sockets, RELIABILITY rows 1, 11, 24,
31 and 32."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapters_store.synth import random_adapter
from tests.util_server import LiveServer, compiled_bytes, metric, multipart, peft_files, sse_events, wait_for

ADMIN, INFER, INFER_A = "sk-e2e-admin", "sk-e2e-infer", "sk-e2e-tenant-a"
CAP = 200_000


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    env = {"RANKSERVE_API_KEYS": f"{INFER},{INFER_A}:tenantA", "RANKSERVE_ADMIN_KEY": ADMIN,
           "RANKSERVE_MAX_UPLOAD_BYTES": str(CAP)}
    with LiveServer(tmp, "tiny-llama", "--demo-adapters", "--max-queue", "16", "--max-running", "4",
                    "--max-model-len", "256", env=env) as srv:
        yield srv


def leftovers(srv) -> list[str]:
    """Spools of uploads and removed adapters alike live in the store's tmp/."""
    return [p.name for p in (srv.store / "tmp").iterdir()]


def gen_body(model, n=6, **kw):
    return {"model": model, "prompt": "The meaning of", "max_tokens": n, "temperature": 0, "ignore_eos": True, **kw}


def test_upload_generate_classify_concurrently_then_delete_and_reupload(llama, tiny_llama):
    admin, user = llama.client(ADMIN), llama.client(INFER)
    uploads = {
        "e-lora": {"a.safetensors": compiled_bytes(tiny_llama, "lora", 4, seed=1)},
        "e-mor": {"a.safetensors": compiled_bytes(tiny_llama, "mor", 4, seed=2)},
        "e-edora": {"a.safetensors": compiled_bytes(tiny_llama, "edora", 4, seed=3)},
        "e-peft-lora": peft_files(tiny_llama.model, seed=4),
        "e-peft-dora": peft_files(tiny_llama.model, seed=5, use_dora=True),
        "e-cls": {"c.safetensors": compiled_bytes(tiny_llama, "aroma", 4, seed=6, task="classify", variable_rank=True)},
    }
    for adapter_id, files in uploads.items():
        r = admin.post("/v1/adapters", **multipart(adapter_id, files))
        assert r.status_code == 201, r.text
    r = admin.post("/v1/adapters", **multipart("e-peft-cls", peft_files(tiny_llama.model, seed=7, num_labels=3),
                                                labels='["a", "b", "c"]'))
    assert r.status_code == 201 and r.json()["task"] == "classify" and r.json()["labels"] == ["a", "b", "c"]
    models = [m["id"] for m in user.get("/v1/models").json()["data"]]
    assert models[0] == "tiny-llama" and set(uploads) | {"demo-lora", "demo-classify", "e-peft-cls"} <= set(models)

    generators = ["tiny-llama", "demo-lora", "e-lora", "e-mor", "e-edora", "e-peft-lora", "e-peft-dora"]
    alone = {m: user.post("/v1/completions", json=gen_body(m)).json()["choices"][0]["text"] for m in generators}
    assert len(set(alone.values())) >= len(generators) - 1  # adapters change the output

    def generate(m):
        r = user.post("/v1/completions", json=gen_body(m))
        assert r.status_code == 200, r.text
        return m, r.json()["choices"][0]["text"]

    def classify(m):
        return m, user.post("/v1/classify", json={"model": m, "input": ["fine", "awful", "ok"]}).json()["data"]

    with ThreadPoolExecutor(12) as pool:
        gens = [pool.submit(generate, m) for m in generators * 2]  # 14: within the queue bound
        clss = [pool.submit(classify, m) for m in ("e-cls", "demo-classify", "e-peft-cls") * 2]
        for f in gens:
            m, text = f.result(60)
            assert text == alone[m], m  # batched with other adapters == alone
        for f in clss:
            m, data = f.result(60)
            labels = {"e-peft-cls": {"a", "b", "c"}}.get(m, {"negative", "positive"})
            assert len(data) == 3 and all(set(d["scores"]) == labels for d in data), m

    with user.stream("POST", "/v1/chat/completions", json={"model": "e-peft-dora", "max_tokens": 5, "stream": True,
                                                            "messages": [{"role": "user", "content": "hi"}]}) as s:
        events = sse_events(s.read().decode())
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")

    assert admin.delete("/v1/adapters/e-lora").status_code == 200
    assert user.post("/v1/completions", json=gen_body("e-lora")).status_code == 404
    new = {"a.safetensors": compiled_bytes(tiny_llama, "dora", 4, seed=99)}
    assert admin.post("/v1/adapters", **multipart("e-lora", new)).status_code == 201
    again = user.post("/v1/completions", json=gen_body("e-lora")).json()["choices"][0]["text"]
    assert again != alone["e-lora"]
    assert leftovers(llama) == []


def test_cold_lora_adapters_load_in_the_loader_process(llama, tiny_llama):
    """The server's default (--loader-processes 1): once its worker has started (it imports torch while the
    server already serves; loads before that run on the loader threads), cold LoRA adapters are read,
    checked and packed there and serve. (Equality with the thread path: tests/test_load_process.py.)"""
    admin, user = llama.client(ADMIN), llama.client(INFER)
    base_text = user.post("/v1/completions", json=gen_body("tiny-llama", n=8)).json()["choices"][0]["text"]
    deadline, changed = time.monotonic() + 60, 0
    for i in range(1000):  # a new adapter (new bytes, so never in any tier) until one went through the worker
        data = random_adapter(tiny_llama, "lora", 4, seed=400 + i, std=0.1).to_bytes()
        assert admin.post("/v1/adapters", **multipart(f"late-{i}", {"a.safetensors": data})).status_code == 201
        r = user.post("/v1/completions", json=gen_body(f"late-{i}", n=8))
        assert r.status_code == 200, r.text
        changed += r.json()["choices"][0]["text"] != base_text
        assert admin.delete(f"/v1/adapters/late-{i}").status_code == 200
        if "adapter loader processes serve cold loads" in llama.logs() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "adapter loader processes serve cold loads" in llama.logs(), "no load went through the loader process"
    assert changed >= 1


def test_stream_arrives_incrementally(llama):
    user = llama.client(INFER)
    start = time.monotonic()
    arrivals = []
    with user.stream("POST", "/v1/completions", json=gen_body("demo-lora", n=40, stream=True)) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - start, line[6:]))
    assert arrivals[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in arrivals[:-1]]
    assert len(chunks) >= 10 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert arrivals[0][0] < arrivals[-1][0] * 0.8  # the first token is not held back until the end


def test_keys_from_env_guard_every_route_and_never_reach_the_logs(llama, tiny_llama):  # row 32
    anon = llama.client()
    assert anon.post("/v1/completions", json=gen_body("tiny-llama")).status_code == 401
    assert anon.get("/v1/models").status_code == 401
    assert anon.get("/health").status_code == 200 and anon.get("/metrics").status_code == 200
    r = llama.client(INFER).post("/v1/adapters", **multipart("nope", {"a.safetensors": compiled_bytes(tiny_llama)}))
    assert r.status_code == 403
    r = llama.client(INFER_A).post("/v1/completions", json=gen_body("tiny-llama"), headers={"x-request-id": "trace-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-123"
    wait_for(lambda: any(e.get("request_id") == "trace-123" for e in llama.log_events()), 5, "the access log line")
    line = next(e for e in llama.log_events() if e.get("request_id") == "trace-123")
    assert line["endpoint"] == "/v1/completions" and line["status"] == 200 and line["key_id"].startswith("key-")
    logs = llama.logs()
    assert all(k not in logs for k in (ADMIN, INFER, INFER_A))


def test_chunked_upload_over_the_cap_is_413(llama, tiny_llama):  # row 1
    admin = llama.client(ADMIN)
    blob = compiled_bytes(tiny_llama, "lora", 32, seed=8)
    assert len(blob) > CAP

    def body():
        yield b"--xx\r\nContent-Disposition: form-data; name=\"adapter_id\"\r\n\r\nhuge\r\n"
        yield b"--xx\r\nContent-Disposition: form-data; name=\"files\"; filename=\"h.safetensors\"\r\n\r\n"
        for i in range(0, len(blob), 16384):
            yield blob[i:i + 16384]
        yield b"\r\n--xx--\r\n"

    r = admin.post("/v1/adapters", content=body(), headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 413 and "max-upload-bytes" in r.json()["error"]["message"]
    assert admin.get("/v1/adapters/huge").status_code == 404
    assert leftovers(llama) == []


def test_client_gone_mid_upload_leaves_nothing(llama, tiny_llama):  # row 11
    blob = compiled_bytes(tiny_llama, "lora", 8, seed=9)
    body = (b"--xx\r\nContent-Disposition: form-data; name=\"adapter_id\"\r\n\r\nhalf\r\n"
            b"--xx\r\nContent-Disposition: form-data; name=\"files\"; filename=\"h.safetensors\"\r\n\r\n")
    head = (f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Type: multipart/form-data; boundary=xx\r\nContent-Length: {len(body) + len(blob) + 10}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", llama.port)) as s:
        s.sendall(head.encode() + body + blob[: len(blob) // 2])
        time.sleep(0.3)  # the server is now streaming this upload to its spool
    wait_for(lambda: leftovers(llama) == [], 5, "spool cleanup")
    assert llama.client(ADMIN).get("/v1/adapters/half").status_code == 404
    assert llama.client().get("/health").status_code == 200


def test_client_gone_mid_stream_frees_the_request(llama):  # row 24
    user = llama.client(INFER)
    with user.stream("POST", "/v1/completions", json=gen_body("demo-lora", n=200, stream=True)) as s:
        lines = s.iter_lines()
        assert next(lines).startswith("data: ")
    # leaving the block closed the connection with ~200 tokens still to go
    wait_for(lambda: metric(user.get("/metrics").text, "rankserve_num_requests_running") == 0, 5, "running == 0")
    assert metric(user.get("/metrics").text, "rankserve_requests_cancelled_total") >= 1


def test_probes_stay_fast_while_saturated(llama):  # rows 19, 31
    user = llama.client(INFER, timeout=120)

    def long_request(_):
        return user.post("/v1/completions", json=gen_body("demo-lora", n=40)).status_code

    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(long_request, i) for i in range(24)]  # more than running (4) + queue (16)
        probe = llama.client()
        wait_for(lambda: metric(probe.get("/metrics").text, "rankserve_num_requests_running") >= 4, 10, "saturation")
        for path in ("/health", "/ready", "/metrics"):
            start = time.perf_counter()
            assert probe.get(path).status_code == 200
            assert time.perf_counter() - start < 0.5, path
        statuses = [f.result(120) for f in futures]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 16
    text = probe.get("/metrics").text
    assert metric(text, "rankserve_requests_rejected_total", reason="queue_full") == statuses.count(429)
    assert metric(text, "rankserve_num_requests_running") == 0


def test_tiny_bert_classifies_and_refuses_generation(tmp_path, tiny_bert):
    with LiveServer(tmp_path, "tiny-bert", "--served-model-name", "bert-base") as srv:
        c = srv.client()
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["bert-base"]
        for i, method in enumerate(("lora", "dora", "mor")):
            blob = compiled_bytes(tiny_bert, method, 4, seed=i, task="classify", labels=["x", "y", "z"])
            assert c.post("/v1/adapters", **multipart(f"b-{method}", {"b.safetensors": blob})).status_code == 201
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda m: c.post("/v1/classify", json={"model": m, "input": ["a b", "c"]}),
                                    ["b-lora", "b-dora", "b-mor"] * 2))
        assert all(r.status_code == 200 and len(r.json()["data"]) == 2 for r in results)
        # the same call twice: the same labels, scores equal up to the last bits (the batch it shares with
        # other calls may change the op's formulation, and with it fp32 accumulation order)
        first, again = results[0].json()["data"], results[3].json()["data"]
        assert [d["label"] for d in first] == [d["label"] for d in again]
        for a, b in zip(first, again, strict=True):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
        r = c.post("/v1/completions", json={"model": "bert-base", "prompt": "hi"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        generate_only = compiled_bytes(tiny_bert, "lora", 4, seed=5)
        assert c.post("/v1/adapters", **multipart("b-gen", {"g.safetensors": generate_only})).status_code == 422
        r = c.post("/v1/adapters", **multipart("b-peft", peft_files(tiny_bert.model, target_modules=["query", "value"])))
        assert r.status_code == 422  # a PEFT encoder adapter without a head cannot classify, nor generate
