"""vLLM's dynamic adapter routes over HTTP, then the loaded adapter through the real `openai` client: PEFT
directories and compiled files under --adapter-root load (and answer exactly as the same files uploaded);
anything outside the root (absolute paths, `..`, symlinks) is 403; admin keys only; no root, no route."""

from __future__ import annotations

import openai
import pytest

from tests.util_server import app_client, compiled_bytes, multipart, peft_files

ADMIN, INFER = "adm-key", "inf-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("vllm")
    root = tmp / "root"
    (root / "peft").mkdir(parents=True)
    for name, blob in peft_files(tiny_llama.model, seed=5).items():
        (root / "peft" / name).write_bytes(blob)
    (root / "compiled").mkdir()
    (root / "compiled" / "adapter.safetensors").write_bytes(compiled_bytes(tiny_llama, "dora", 4, seed=6))
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(compiled_bytes(tiny_llama, "lora", 4, seed=7))
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "mixed").mkdir()
    (root / "mixed" / "adapter_config.json").write_bytes((root / "peft" / "adapter_config.json").read_bytes())
    (root / "mixed" / "adapter_model.safetensors").symlink_to(outside / "secret.safetensors")
    with app_client("tiny-llama", tmp / "store", adapter_root=str(root), admin_keys=(ADMIN,),
                    api_keys=(INFER,)) as (client, state):
        client.root, client.outside = root, outside
        yield client, state


def load(client, name, path, key=ADMIN):
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                       headers={"Authorization": f"Bearer {key}"})


def greedy(client, model, key=INFER) -> str:
    oc = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)
    r = oc.completions.create(model=model, prompt="The adapter says", max_tokens=8, temperature=0,
                              extra_body={"ignore_eos": True})
    return r.choices[0].text


def test_a_peft_directory_loads_and_answers_as_the_same_upload(srv):
    client, _ = srv
    r = load(client, "from-path", client.root / "peft")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'from-path' added successfully.", r.text
    files = {p.name: p.read_bytes() for p in (client.root / "peft").iterdir()}
    assert client.post("/v1/adapters", headers=AUTH, **multipart("uploaded", files)).status_code == 201
    assert greedy(client, "from-path") == greedy(client, "uploaded")
    assert greedy(client, "from-path") != greedy(client, "tiny-llama")  # the adapter does act
    ids = [m.id for m in openai.OpenAI(base_url="http://testserver/v1", api_key=INFER, http_client=client).models.list()]
    assert "from-path" in ids


def test_a_compiled_file_loads_by_a_path_relative_to_the_root(srv):
    client, _ = srv
    assert load(client, "compiled-rel", "compiled/adapter.safetensors").status_code == 200
    assert load(client, "compiled-dir", client.root / "compiled").status_code == 200
    assert greedy(client, "compiled-rel") == greedy(client, "compiled-dir")


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside/secret.safetensors", "link-out/secret.safetensors",
                                  "link-out", "mixed", "peft/../../outside"])
def test_paths_outside_the_root_are_403(srv, path):
    client, _ = srv
    r = load(client, "escape", path)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["param"] == "lora_path"
    assert client.get("/v1/adapters/escape", headers=AUTH).status_code == 404


def test_bad_requests(srv):
    client, _ = srv
    assert load(client, "nothing", "no/such/dir").status_code == 400
    assert load(client, "from-path", client.root / "peft").status_code == 409  # the name is taken
    assert load(client, "tiny-llama", client.root / "peft").status_code == 400
    assert load(client, "by-inference-key", client.root / "peft", key=INFER).status_code == 403
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "peft"}).status_code == 401
    r = client.post("/v1/load_lora_adapter", headers=AUTH, json={"lora_name": "x", "lora_path": "peft", "load_inplace": True})
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]


def test_unload_then_the_adapter_is_gone(srv):
    client, _ = srv
    assert load(client, "temp", client.root / "compiled").status_code == 200
    assert greedy(client, "temp")
    r = client.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "temp", "lora_int_id": 3})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'temp' removed successfully."
    oc = openai.OpenAI(base_url="http://testserver/v1", api_key=INFER, http_client=client, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="temp", prompt="x", max_tokens=2)
    assert client.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "temp"}).status_code == 404
    assert client.post("/v1/unload_lora_adapter", headers={"Authorization": f"Bearer {INFER}"},
                       json={"lora_name": "from-path"}).status_code == 403


def test_without_an_adapter_root_the_route_is_refused(tmp_path, tiny_llama):
    d = tmp_path / "peft"
    d.mkdir()
    (d / "adapter.safetensors").write_bytes(compiled_bytes(tiny_llama, "lora", 4, seed=1))
    with app_client("tiny-llama", tmp_path / "store") as (client, _):
        r = load(client, "x", d)
        assert r.status_code == 403 and "--adapter-root" in r.json()["error"]["message"]
