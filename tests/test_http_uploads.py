"""Adapter uploads over HTTP (in-process, real store and engine on tiny-llama): compiled files of every method
and PEFT directories serve exactly the reference forward; caps, refusals and races leave the registry and
the disk intact (RELIABILITY rows 1, 3, 7, 8, 9, 11)."""

from __future__ import annotations

import asyncio
import pickle
import threading
import zipfile
from io import BytesIO

import pytest
import torch

from adapters_store.format import loads
from adapters_store.peft_import import import_peft
from tests.util_apply import apply_adapter, hf_greedy
from tests.util_server import app_client, compiled_bytes, metric, multipart, peft_files

CAP = 160 << 10
PROMPT = [11, 23, 35, 47, 59, 71]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    with app_client("tiny-llama", store, max_upload_bytes=CAP) as (client, state):
        yield client, state


def generate(client, model, n=5):
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0,
                                             "ignore_eos": True})
    return r


def reference_text(tiny_llama, adapter, n=5):
    return tiny_llama.tokenizer.decode(hf_greedy(apply_adapter(tiny_llama.model, adapter), PROMPT, n), skip_special_tokens=True)


def leftovers(state) -> list[str]:
    """Anything an upload could leave behind: the store's staging directory holds the spools too."""
    return sorted(p.name for p in (state.runtime.store.root / "tmp").iterdir())


def test_every_method_and_peft_serves_the_reference_forward(srv, tiny_llama):
    client, state = srv
    uploads = {f"c-{m}": ({f"{m}.safetensors": compiled_bytes(tiny_llama, m, 4, seed=i, variable_rank=m in ("adalora", "aroma"))}, None)
               for i, m in enumerate(["lora", "dora", "adalora", "aroma", "mor", "edora"])}
    uploads["p-lora"] = (peft_files(tiny_llama.model, seed=1), None)
    uploads["p-rslora"] = (peft_files(tiny_llama.model, seed=2, use_rslora=True, target_modules=["k_proj", "down_proj"]), None)
    uploads["p-dora"] = (peft_files(tiny_llama.model, seed=3, use_dora=True), None)
    expected = {}
    for adapter_id, (files, _) in uploads.items():
        r = client.post("/v1/adapters", **multipart(adapter_id, files))
        assert r.status_code == 201, r.text
        rec = r.json()
        assert rec["id"] == adapter_id and rec["owner"] is None and "path" not in rec
        if len(files) == 1:
            adapter = loads(next(iter(files.values())))
            assert rec["method"] == adapter.meta.method
        else:
            adapter = import_peft(files, tiny_llama)
            assert rec["method"] == ("dora" if "dora" in adapter_id else "lora")
        expected[adapter_id] = reference_text(tiny_llama, adapter)
    results: dict[str, str] = {}

    def run(adapter_id):  # all adapters at once: they share engine steps
        results[adapter_id] = generate(client, adapter_id).json()["choices"][0]["text"]

    threads = [threading.Thread(target=run, args=(a,)) for a in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected
    base = reference_text(tiny_llama, loads(compiled_bytes(tiny_llama, "lora", 1, seed=0, modules=[])))
    assert sum(text != base for text in results.values()) >= len(results) - 1  # adapters really apply
    assert leftovers(state) == []
    assert metric(state.metrics.render().decode(), "rankserve_adapter_uploads_total", result="ok") >= len(uploads)


def test_upload_over_the_cap_is_413_while_streaming(srv, tiny_llama):  # row 1
    client, state = srv
    big = compiled_bytes(tiny_llama, "lora", 32, seed=5)
    assert len(big) > CAP
    before = {r.id for r in state.runtime.store.list()}
    r = client.post("/v1/adapters", **multipart("too-big", {"big.safetensors": big}))
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"

    def chunked():  # no Content-Length: only the running count can stop it
        yield b"--b\r\nContent-Disposition: form-data; name=\"adapter_id\"\r\n\r\ntoo-big\r\n"
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.safetensors\"\r\n\r\n"
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]
        yield b"\r\n--b--\r\n"

    r = client.post("/v1/adapters", content=chunked(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert {r.id for r in state.runtime.store.list()} == before
    assert leftovers(state) == []
    assert metric(state.metrics.render().decode(), "rankserve_adapter_uploads_total", result="too_large") == 2


def _zip_bytes() -> bytes:
    buf = BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    return buf.getvalue()


@pytest.mark.parametrize("files", [
    {"adapter.bin": pickle.dumps({"x": 1})},
    {"adapter.pt": b"anything"},
    {"weights.zip": _zip_bytes()},
    {"adapter.safetensors": _zip_bytes()},
    {"adapter.safetensors": pickle.dumps({"x": torch.zeros(2)})},
    {"adapter_config.json": b"{}", "adapter_model.safetensors": pickle.dumps([1, 2, 3])},
])
def test_pickles_and_archives_are_refused_unopened(srv, monkeypatch, files):  # row 3
    client, state = srv

    def never(*a, **k):
        raise AssertionError("a refused upload was deserialised")

    monkeypatch.setattr(pickle, "loads", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(torch, "load", never)
    r = client.post("/v1/adapters", **multipart("pickled", files))
    assert r.status_code == 415, r.text
    assert "pickled" not in state.runtime.store and leftovers(state) == []


@pytest.mark.parametrize("adapter_id", ["../evil", "a/b", "/abs/path", "x\x00y", "z" * 300, ".hidden", "sp ace"])
def test_bad_adapter_ids_are_400_and_nothing_is_written(srv, tiny_llama, adapter_id, tmp_path):  # row 7
    client, state = srv
    root = state.runtime.store.root
    before = sorted(p.relative_to(root.parent) for p in root.parent.rglob("*"))
    r = client.post("/v1/adapters", **multipart(adapter_id, {"a.safetensors": compiled_bytes(tiny_llama, seed=9)}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "adapter_id"
    assert sorted(p.relative_to(root.parent) for p in root.parent.rglob("*")) == before
    assert leftovers(state) == []


def test_path_tricks_in_the_url_are_refused(srv):
    client, _ = srv
    assert client.get("/v1/adapters/%2e%2e").status_code in (400, 404)
    assert client.delete("/v1/adapters/bad%00id").status_code == 400
    assert client.get("/v1/adapters/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_duplicate_id_is_409_and_the_old_version_keeps_serving(srv, tiny_llama):  # row 8
    client, state = srv
    first = compiled_bytes(tiny_llama, "lora", 4, seed=21)
    assert client.post("/v1/adapters", **multipart("dup", {"d.safetensors": first})).status_code == 201
    served = generate(client, "dup").json()["choices"][0]["text"]
    r = client.post("/v1/adapters", **multipart("dup", {"d.safetensors": compiled_bytes(tiny_llama, "dora", 4, seed=22)}))
    assert r.status_code == 409 and r.json()["error"]["param"] == "adapter_id"
    assert generate(client, "dup").json()["choices"][0]["text"] == served
    assert state.runtime.store.read_bytes("dup") == first


def test_concurrent_uploads_of_one_id_one_wins_whole(srv, tiny_llama):  # row 9
    client, state = srv
    blobs = [compiled_bytes(tiny_llama, "lora", 8, seed=31 + i) for i in range(4)]
    statuses = []

    def up(blob):
        statuses.append(client.post("/v1/adapters", **multipart("race", {"r.safetensors": blob})).status_code)

    threads = [threading.Thread(target=up, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [201, 409, 409, 409]
    assert state.runtime.store.read_bytes("race") in blobs  # one upload, whole, never a mix
    assert generate(client, "race").status_code == 200
    assert leftovers(state) == []


def test_client_gone_mid_upload_registers_nothing(srv, tiny_llama):  # row 11
    client, state = srv
    blob = compiled_bytes(tiny_llama, "lora", 4, seed=41)
    head = (b"--b\r\nContent-Disposition: form-data; name=\"adapter_id\"\r\n\r\ngone\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"g.safetensors\"\r\n\r\n") + blob[:20000]
    messages = [{"type": "http.request", "body": head, "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/adapters", "raw_path": b"/v1/adapters",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"multipart/form-data; boundary=b"),
                         (b"content-length", str(len(head) + 50000).encode())]}
    asyncio.run(client.app(scope, receive, send))
    assert "gone" not in state.runtime.store and leftovers(state) == []
    assert metric(state.metrics.render().decode(), "rankserve_adapter_uploads_total", result="aborted") == 1


def test_peft_config_problems_are_422_naming_the_field(srv, tiny_llama):  # row 2
    client, state = srv
    files = peft_files(tiny_llama.model, seed=7)
    bad = dict(files, **{"adapter_config.json": b"not json"})
    r = client.post("/v1/adapters", **multipart("badcfg", bad))
    assert r.status_code == 422 and "adapter_config.json" in r.json()["error"]["message"]
    only_weights = {"adapter_model.safetensors": files["adapter_model.safetensors"]}
    r = client.post("/v1/adapters", **multipart("badcfg", only_weights))
    assert r.status_code == 422
    assert "badcfg" not in state.runtime.store and leftovers(state) == []


def test_missing_parts_are_400(srv, tiny_llama):
    client, _ = srv
    r = client.post("/v1/adapters", **multipart(None, {"a.safetensors": compiled_bytes(tiny_llama, seed=1)}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapter_id"
    r = client.post("/v1/adapters", data={"adapter_id": "nofiles"}, files=[("other", ("x.txt", b"hi"))])
    assert r.status_code == 415
    r = client.post("/v1/adapters", json={"adapter_id": "x"})
    assert r.status_code == 415


def test_delete_then_reupload_serves_the_new_version(srv, tiny_llama):
    client, _ = srv
    old, new = (compiled_bytes(tiny_llama, "lora", 4, seed=s) for s in (51, 52))
    assert client.post("/v1/adapters", **multipart("cycle", {"c.safetensors": old})).status_code == 201
    assert generate(client, "cycle").json()["choices"][0]["text"] == reference_text(tiny_llama, loads(old))
    assert client.delete("/v1/adapters/cycle").json()["deleted"] is True
    assert generate(client, "cycle").status_code == 404
    assert client.delete("/v1/adapters/cycle").status_code == 404
    assert client.post("/v1/adapters", **multipart("cycle", {"c.safetensors": new})).status_code == 201
    assert generate(client, "cycle").json()["choices"][0]["text"] == reference_text(tiny_llama, loads(new))


def test_a_compact_mor_upload_serves_as_its_expanded_twin(srv, tiny_llama):
    """MoR's compact file (lora_b [d_out, r] + expert_out_scale) and the expanded file it reads as: the same
    tokens and logprobs through the engine, the file's own reference forward; a bad compact tensor is a 422
    naming it, and registers nothing."""
    from adapters_store.synth import random_adapter

    client, state = srv
    compact = random_adapter(tiny_llama, "mor", 4, seed=61, num_experts=3, std=0.1, compact=True)
    data = compact.to_bytes()
    wide = loads(data).to_bytes()
    assert len(data) < len(wide)
    for adapter_id, blob in (("mor-compact", data), ("mor-wide", wide)):
        r = client.post("/v1/adapters", **multipart(adapter_id, {"m.safetensors": blob}))
        assert r.status_code == 201 and r.json()["size"] == len(blob), r.text
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    out = {m: client.post("/v1/completions", json={**body, "model": m}).json()["choices"][0] for m in ("mor-compact", "mor-wide")}
    assert out["mor-compact"]["text"] == out["mor-wide"]["text"] == reference_text(tiny_llama, loads(data))
    assert out["mor-compact"]["logprobs"] == out["mor-wide"]["logprobs"] and len(out["mor-wide"]["logprobs"]["token_logprobs"]) == 5
    q = "model.layers.0.self_attn.q_proj"
    compact.modules[q].expert_out_scale = torch.ones(4, 64)  # N is 3
    compact.modules["model.layers.1.mlp.up_proj"].expert_out_scale[0, 0] = float("nan")
    r = client.post("/v1/adapters", **multipart("mor-bad", {"m.safetensors": compact.to_bytes()}))
    assert r.status_code == 422, r.text
    assert f"{q}.expert_out_scale: shape [4, 64], expected [3, 64]" in r.json()["error"]["message"]
    del compact.modules[q]
    r = client.post("/v1/adapters", **multipart("mor-bad", {"m.safetensors": compact.to_bytes()}))
    assert r.status_code == 422 and "model.layers.1.mlp.up_proj.expert_out_scale: 1 of 384" in r.json()["error"]["message"]
    assert "mor-bad" not in state.runtime.store and leftovers(state) == []
