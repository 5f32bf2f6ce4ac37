"""Two `rankserve serve --store s3://...` processes on one bucket of a real SeaweedFS: an upload through one
is served by the other at once, with PEFT's greedy output; and the store stopped mid-run (RELIABILITY row 46)."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.util_apply import hf_greedy
from tests.util_server import LiveServer, compiled_bytes, multipart, peft_files

pytestmark = pytest.mark.slow
PROMPT = [11, 23, 35, 47, 59, 71]


def peft_greedy(base, files: dict[str, bytes], n: int) -> str:
    import peft

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base.model), d).eval()
        return base.tokenizer.decode(hf_greedy(model, PROMPT, n), skip_special_tokens=True)


def complete(c: httpx.Client, model: str, n: int = 6) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0,
                                           "ignore_eos": True})


def test_two_servers_share_one_bucket_and_survive_a_store_outage(seaweed, tmp_path, tiny_llama):
    url = f"s3://{seaweed.bucket()}/e2e"
    servers = [LiveServer(tmp_path, "tiny-llama", "--store-cache", str(tmp_path / f"cache{i}"), store=url)
               for i in range(2)]
    try:
        a, b = (s.start() for s in servers)
        ca, cb = a.client(timeout=30), b.client(timeout=30)
        files = peft_files(tiny_llama.model, seed=5)
        r = ca.post("/v1/adapters", **multipart("shared", files))
        assert r.status_code == 201, r.text
        want = peft_greedy(tiny_llama, files, 6)
        r = complete(cb, "shared")  # b never saw the upload: it asks the store before answering 404
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        assert complete(ca, "shared").json()["choices"][0]["text"] == want
        assert "shared" in {m["id"] for m in cb.get("/v1/models").json()["data"]}
        r = cb.post("/v1/adapters", **multipart("shared", {"x.safetensors": compiled_bytes(tiny_llama, seed=2)}))
        assert r.status_code == 409 and r.json()["error"]["code"]
        assert ca.post("/v1/adapters", **multipart("gone", files)).status_code == 201
        assert cb.delete("/v1/adapters/gone").status_code in (200, 204)
        deadline = time.monotonic() + 10  # a replica sees a delete elsewhere once its record is 2 s old
        while complete(ca, "gone").status_code != 404:
            assert time.monotonic() < deadline, "a deleted adapter kept serving on the other replica"
            time.sleep(0.5)
        assert ca.post("/v1/adapters", **multipart("cold", files)).status_code == 201  # b never loads it

        seaweed.stop()
        try:
            for c in (ca, cb):  # resident adapters keep serving
                r = complete(c, "shared")
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
            started = time.monotonic()
            answers = [cb.post("/v1/adapters", **multipart("new", files)),  # an upload
                       complete(cb, "cold"),  # an adapter b has never read: a cold load
                       complete(cb, "never-uploaded")]  # an id b must ask the store about
            for r in answers:
                assert r.status_code == 503, r.text
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["message"]
            assert time.monotonic() - started < 30  # no hang
            assert cb.get("/health").status_code == 200
        finally:
            seaweed.start()
        deadline = time.monotonic() + 60  # recovers by itself
        while (r := complete(cb, "cold")).status_code != 200:
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(1)
        assert r.json()["choices"][0]["text"] == want
        assert cb.post("/v1/adapters", **multipart("new", files)).status_code == 201
        for s in servers:
            assert "Traceback" not in s.logs()
    finally:
        for s in servers:
            s.stop()
