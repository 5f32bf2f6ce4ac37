"""``rankserve adapters ...``: every subcommand against a local store, and against a server (an in-process
stand-in that speaks the /v1/adapters contract, so the multipart field names are checked here)."""

from __future__ import annotations

import copy
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from adapters_store import cli
from adapters_store.store import AdapterStore
from adapters_store.synth import random_adapter

Q = "model.layers.0.self_attn.q_proj"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def adapter_file(tmp_path, tiny_llama):
    path = tmp_path / "a.safetensors"
    random_adapter(tiny_llama, "adalora", rank=4, seed=3, variable_rank=True).save(path)
    return path


def test_local_push_list_inspect_rm(tmp_path, capsys, adapter_file, tiny_llama):
    store = str(tmp_path / "store")
    code, out, _ = run(capsys, "push", "my-ada", str(adapter_file), "--store", store, "--base", "tiny-llama",
                       "--owner", "t1")
    assert code == 0
    rec = json.loads(out)
    assert rec["id"] == "my-ada" and rec["method"] == "adalora" and rec["owner"] == "t1"
    code, out, _ = run(capsys, "list", "--store", store, "--json")
    assert code == 0 and [r["id"] for r in json.loads(out)] == ["my-ada"]
    code, out, _ = run(capsys, "list", "--store", store)
    assert code == 0 and "my-ada" in out and "adalora" in out
    code, out, _ = run(capsys, "inspect", "my-ada", "--store", store, "--base", "tiny-llama", "--owner", "t1")
    assert code == 0 and json.loads(out)["digest"] == rec["digest"] and json.loads(out)["valid_for"] == "tiny-llama"
    code, out, _ = run(capsys, "inspect", str(adapter_file))
    info = json.loads(out)
    assert code == 0 and info["digest"] == rec["digest"] and info["metadata"]["method"] == "adalora"
    assert info["ranks"] == rec["ranks"] and all(r > 0 for r in info["ranks"].values())
    assert info["tensors"][next(iter(info["ranks"]))]["lora_a"]["dtype"] == "F32"
    code, _, err = run(capsys, "rm", "my-ada", "--store", store)  # the public namespace has no my-ada
    assert code == 1 and "does not exist" in err
    code, out, _ = run(capsys, "rm", "my-ada", "--store", store, "--owner", "t1")
    assert code == 0 and json.loads(out)["deleted"] is True
    assert AdapterStore(store).list() == []


def test_local_errors_are_clear(tmp_path, capsys, adapter_file, tiny_llama):
    store = str(tmp_path / "store")
    assert run(capsys, "push", "x", str(adapter_file), "--store", store)[0] == 0
    code, _, err = run(capsys, "push", "x", str(adapter_file), "--store", store)
    assert code == 1 and "already exists" in err
    code, _, err = run(capsys, "push", "../evil", str(adapter_file), "--store", store)
    assert code == 1 and "is invalid" in err
    bad = random_adapter(tiny_llama, rank=2, modules=[Q])
    bad.modules[Q].lora_b[0, 0] = float("nan")
    bad.meta.base_fingerprint = "0" * 32
    bad.save(tmp_path / "bad.safetensors")
    code, _, err = run(capsys, "push", "y", str(tmp_path / "bad.safetensors"), "--store", store, "--base", "tiny-llama")
    assert code == 1 and "2 problem(s)" in err and "NaN or Inf" in err and "base_fingerprint" in err
    code, _, err = run(capsys, "inspect", str(tmp_path / "bad.safetensors"), "--base", "tiny-llama")
    assert code == 1 and "NaN or Inf" in err
    code, _, err = run(capsys, "rm", "nope", "--store", store)
    assert code == 1 and "does not exist" in err
    code, _, err = run(capsys, "list")
    assert code == 1 and "--store" in err
    assert [r.id for r in AdapterStore(store).list()] == ["x"]


def test_local_import_peft(tmp_path, capsys, tiny_llama):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(tiny_llama.model), peft.LoraConfig(r=2, use_dora=True,
                                                                               target_modules=["v_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    store = str(tmp_path / "store")
    code, out, _ = run(capsys, "import-peft", "imp", str(tmp_path / "peft"), "--store", store, "--model", "tiny-llama")
    assert code == 0 and json.loads(out)["method"] == "dora"
    code, _, err = run(capsys, "import-peft", "imp2", str(tmp_path / "peft"), "--store", store)
    assert code == 1 and "--model" in err


def fake_server(store: AdapterStore, base, seen: dict):
    """The /v1/adapters contract: multipart field adapter_id + file parts named files; OpenAI errors."""
    app = FastAPI()

    def error(e: Exception):
        return JSONResponse({"error": {"message": str(e), "type": "x", "param": None, "code": None}},
                            status_code=getattr(e, "http_status", 500))

    @app.post("/v1/adapters")
    async def upload(request: Request):
        seen["auth"] = request.headers.get("authorization")
        form = await request.form()
        files = {f.filename: await f.read() for f in form.getlist("files")}
        seen["files"], seen["fields"] = sorted(files), {k: v for k, v in form.items() if k != "files"}
        try:
            if len(files) == 1:
                rec = store.put(form["adapter_id"], next(iter(files.values())), base=base)
            else:
                rec = store.put_peft(form["adapter_id"], files, base)
        except Exception as e:
            return error(e)
        return JSONResponse(rec.to_dict(), status_code=201)

    @app.get("/v1/adapters")
    def listing():
        return {"object": "list", "data": [r.to_dict() for r in store.list()]}

    @app.get("/v1/adapters/{adapter_id}")
    def get(adapter_id: str):
        try:
            return store.get(adapter_id).to_dict()
        except Exception as e:
            return error(e)

    @app.delete("/v1/adapters/{adapter_id}")
    def delete(adapter_id: str):
        try:
            store.delete(adapter_id)
        except Exception as e:
            return error(e)
        return {"id": adapter_id, "object": "adapter", "deleted": True}

    return app


@pytest.fixture
def server(tmp_path, tiny_llama, monkeypatch):
    from starlette.testclient import TestClient

    store, seen = AdapterStore(tmp_path / "srv"), {}
    app = fake_server(store, tiny_llama, seen)

    def client(args):
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        assert args.server == "http://rankserve.test"
        return TestClient(app, base_url=args.server, headers=headers)

    monkeypatch.setattr(cli, "_client", client)
    return store, seen


def test_server_push_list_inspect_rm(capsys, server, adapter_file):
    store, seen = server
    srv = ["--server", "http://rankserve.test", "--api-key", "k1"]
    code, out, _ = run(capsys, "push", "remote", str(adapter_file), *srv)
    assert code == 0 and json.loads(out)["id"] == "remote"
    assert seen["auth"] == "Bearer k1" and seen["files"] == ["a.safetensors"] and seen["fields"] == {"adapter_id": "remote"}
    code, out, _ = run(capsys, "list", "--json", *srv)
    assert [r["id"] for r in json.loads(out)] == ["remote"]
    code, out, _ = run(capsys, "inspect", "remote", *srv)
    assert json.loads(out)["digest"] == store.get("remote").digest
    code, _, err = run(capsys, "push", "remote", str(adapter_file), *srv)
    assert code == 1 and "HTTP 409" in err and "already exists" in err
    assert run(capsys, "rm", "remote", *srv)[0] == 0 and store.list() == []
    code, _, err = run(capsys, "rm", "remote", *srv)
    assert code == 1 and "HTTP 404" in err
    assert run(capsys, "list", "--store", "/x", *srv)[0] == 2  # one place or the other


def test_server_import_peft_uploads_the_pair(tmp_path, capsys, server, tiny_llama):
    peft = pytest.importorskip("peft")
    store, seen = server
    pm = peft.get_peft_model(copy.deepcopy(tiny_llama.model), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    (tmp_path / "peft" / "training_args.bin").write_bytes(b"\x80\x04never sent")
    code, out, err = run(capsys, "import-peft", "from-peft", str(tmp_path / "peft"), "--server", "http://rankserve.test")
    assert code == 0, err
    assert seen["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(out)["method"] == "lora" and store.get("from-peft").ranks[Q] == 2
