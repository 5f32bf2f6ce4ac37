"""RELIABILITY row 40: adapter ids are namespaced per tenant, another tenant's adapter answers exactly like a
missing one on every route, and tenants are held to quotas on adapter count and bytes."""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from contextlib import nullcontext

import pytest

from adapters_store import cli
from adapters_store.store import AdapterStore
from tests.util_server import app_client, compiled_bytes, metric, multipart

INFER_A, INFER_B, INFER_PLAIN = "sk-t-infer-a", "sk-t-infer-b", "sk-t-infer-plain"
ADMIN, ADMIN_A, ADMIN_B = "sk-t-admin", "sk-t-admin-a", "sk-t-admin-b"
KEYS = dict(api_keys=(f"{INFER_A}:tenantA", f"{INFER_B}:tenantB", INFER_PLAIN),
            admin_keys=(ADMIN, f"{ADMIN_A}:tenantA", f"{ADMIN_B}:tenantB"), bad_key_burst=100_000)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def upload(client, key: str, adapter_id: str, blob: bytes):
    return client.post("/v1/adapters", headers=auth(key), **multipart(adapter_id, {"a.safetensors": blob}))


def classifier(base, seed: int, labels: list[str]) -> bytes:
    return compiled_bytes(base, "lora", 4, seed=seed, task="classify", labels=labels)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with app_client("tiny-llama", tmp_path_factory.mktemp("store"), **KEYS) as (client, state):
        yield client, state


# ---- 1. ids namespaced per tenant -------------------------------------------------------------------------

def test_each_tenant_has_its_own_namespace(srv, tiny_llama):
    client, state = srv
    for seed, (key, labels) in enumerate(((ADMIN, ["p0", "p1"]), (ADMIN_A, ["a0", "a1"]), (ADMIN_B, ["b0", "b1"]))):
        r = upload(client, key, "shared", classifier(tiny_llama, seed, labels))
        assert r.status_code == 201, r.text  # another tenant's "shared" neither blocks nor is revealed
        assert r.json()["id"] == "shared"
    # Each caller is served its own version: loaded by its storage key, not by the plain id.
    for key, prefix in ((INFER_A, "a"), (INFER_B, "b"), (INFER_PLAIN, "p"), (ADMIN, "p")):
        r = client.post("/v1/classify", headers=auth(key), json={"model": "shared", "input": ["hello"]})
        assert r.status_code == 200, r.text
        assert set(r.json()["data"][0]["scores"]) == {f"{prefix}0", f"{prefix}1"}
    models = [m for m in client.get("/v1/models", headers=auth(INFER_A)).json()["data"] if m["id"] == "shared"]
    assert [m["owned_by"] for m in models] == ["tenantA"]  # once: its own shadows the public one
    models = [m for m in client.get("/v1/models", headers=auth(INFER_PLAIN)).json()["data"] if m["id"] == "shared"]
    assert [m["owned_by"] for m in models] == ["rankserve"]
    assert client.get("/v1/adapters/shared", headers=auth(INFER_A)).json()["owner"] == "tenantA"
    assert client.get("/v1/adapters/shared", headers=auth(ADMIN)).json()["owner"] is None
    listed = client.get("/v1/adapters", headers=auth(ADMIN)).json()["data"]
    assert sorted(str(a["owner"]) for a in listed if a["id"] == "shared") == ["None", "tenantA", "tenantB"]
    # On disk the public adapter keeps its plain directory; tenants' names never appear in a path.
    names = sorted(p.name for p in (state.runtime.store.root / "adapters").iterdir() if p.name.endswith("shared"))
    assert "shared" in names and len(names) == 3 and not any("tenant" in n for n in names)


def test_a_global_admin_addresses_a_tenants_adapter_with_owner(srv, tiny_llama):
    client, state = srv
    b_blob = compiled_bytes(tiny_llama, seed=21)
    assert upload(client, ADMIN_A, "owned", compiled_bytes(tiny_llama, seed=20)).status_code == 201
    assert upload(client, ADMIN_B, "owned", b_blob).status_code == 201
    r = client.get("/v1/adapters/owned?owner=tenantB", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["owner"] == "tenantB"
    assert r.json()["digest"] == hashlib.sha256(b_blob).hexdigest()
    assert client.get("/v1/adapters/owned", headers=auth(ADMIN)).status_code == 404  # no public "owned"
    for key in (ADMIN_A, INFER_A, INFER_PLAIN):  # owner= is for global admins only, whatever the id
        for method, path in (("GET", "/v1/adapters/owned?owner=tenantB"), ("DELETE", "/v1/adapters/nope?owner=x")):
            r = client.request(method, path, headers=auth(key))
            assert r.status_code == 403 and r.json()["error"]["param"] in ("owner", None), r.text
    r = client.delete("/v1/adapters/owned?owner=tenantB", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json() == {"id": "owned", "object": "adapter", "deleted": True}
    assert client.get("/v1/adapters/owned", headers=auth(INFER_B)).status_code == 404
    assert client.get("/v1/adapters/owned", headers=auth(INFER_A)).json()["owner"] == "tenantA"  # untouched
    assert client.delete("/v1/adapters/owned", headers=auth(ADMIN_A)).status_code == 200  # a tenant admin: its own


def test_generate_loads_exactly_the_callers_version(srv, tiny_llama):
    """A's "gen" and the public "gen" differ; A's bytes are also public as "gen-copy". A request must load A's
    version by its storage key (a load by the plain id would find another digest and fail)."""
    client, _ = srv
    mine = compiled_bytes(tiny_llama, seed=31)
    assert upload(client, ADMIN_A, "gen", mine).status_code == 201
    assert upload(client, ADMIN, "gen", compiled_bytes(tiny_llama, seed=32)).status_code == 201
    body = {"model": "gen", "prompt": "hello there", "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/completions", headers=auth(INFER_A), json=body)
    assert r.status_code == 200, r.text
    assert upload(client, ADMIN, "gen-copy", mine).status_code == 201
    copy = client.post("/v1/completions", headers=auth(INFER_PLAIN), json=body | {"model": "gen-copy"})
    assert copy.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
    assert client.post("/v1/completions", headers=auth(INFER_B), json=body).status_code == 200  # the public one


def test_the_cli_addresses_a_tenants_adapter_with_owner(tmp_path, capsys, tiny_llama, srv, monkeypatch):
    store, path = str(tmp_path / "store"), tmp_path / "a.safetensors"
    path.write_bytes(compiled_bytes(tiny_llama, seed=41))
    for extra in ([], ["--owner", "t1"]):
        assert cli.main(["push", "x", str(path), "--store", store, *extra]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["inspect", "x", "--store", store, "--owner", "t1"]) == 0
    assert json.loads(capsys.readouterr().out)["owner"] == "t1"
    assert cli.main(["rm", "x", "--store", store, "--owner", "t1"]) == 0
    assert [(r.id, r.owner) for r in AdapterStore(store).list()] == [("x", None)]
    # Against a server: ?owner=TENANT, with a global admin key.
    client, _ = srv
    assert upload(client, ADMIN_B, "cli-x", compiled_bytes(tiny_llama, seed=42)).status_code == 201

    class Keyed:
        def __init__(self, key: str):
            self.key = key

        def request(self, method: str, url: str, **kw):
            return client.request(method, url, headers=auth(self.key), **kw)

    monkeypatch.setattr(cli, "_client", lambda args: nullcontext(Keyed(args.api_key)))
    server = ["--server", "http://rankserve.test", "--api-key", ADMIN]
    capsys.readouterr()
    assert cli.main(["inspect", "cli-x", *server, "--owner", "tenantB"]) == 0
    assert json.loads(capsys.readouterr().out)["owner"] == "tenantB"
    assert cli.main(["rm", "cli-x", *server, "--owner", "tenantB"]) == 0
    assert client.get("/v1/adapters/cli-x", headers=auth(INFER_B)).status_code == 404


def test_tenant_adapters_of_an_older_store_move_into_their_namespace(tmp_path, tiny_llama):
    """Before namespaces a tenant's adapter sat under its plain id; opening the store moves it (one rename)."""
    old = AdapterStore(tmp_path)
    rec = old.put("legacy", compiled_bytes(tiny_llama, seed=51))
    record = tmp_path / "adapters" / "legacy" / "record.json"
    record.write_text(json.dumps(rec.to_dict() | {"owner": "alice"}))
    store = AdapterStore(tmp_path)
    assert "legacy" not in store  # the public namespace is free again
    assert store.get("legacy", owner="alice").digest == rec.digest
    assert store.resolve("legacy", "alice").owner == "alice"
    with pytest.raises(LookupError):
        store.resolve("legacy", "bob")


# ---- 2. another tenant's adapter answers exactly like a missing one ---------------------------------------

def answers(client, adapter_id: str) -> dict:
    """Every route's answer (status and full body) for ``adapter_id``, to callers that are not tenant A."""
    routes = {
        "get": ("GET", f"/v1/adapters/{adapter_id}", None),
        "delete": ("DELETE", f"/v1/adapters/{adapter_id}", None),
        "completions": ("POST", "/v1/completions", {"model": adapter_id, "prompt": "hi", "max_tokens": 2}),
        "chat": ("POST", "/v1/chat/completions", {"model": adapter_id, "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}]}),
        "classify": ("POST", "/v1/classify", {"model": adapter_id, "input": ["hi"]}),
    }
    out: dict = {}
    for key in (INFER_B, ADMIN_B, INFER_PLAIN, ADMIN):
        for name, (method, path, body) in routes.items():
            r = client.request(method, path, json=body, headers=auth(key))
            out[key, name] = (r.status_code, r.json())
        out[key, "models"] = [m for m in client.get("/v1/models", headers=auth(key)).json()["data"]
                              if m["id"] == adapter_id]
        if key != ADMIN:  # a global admin lists every namespace, owners shown
            out[key, "list"] = [a for a in client.get("/v1/adapters", headers=auth(key)).json()["data"]
                                if a["id"] == adapter_id]
    return out


def test_another_tenants_adapter_answers_exactly_like_a_missing_one(srv, tiny_llama):
    client, state = srv
    before = {i: answers(client, i) for i in ("probe", "probe-cls", "probe-broken")}
    assert before["probe"][INFER_B, "get"][0] == 404 and before["probe"][INFER_B, "completions"][0] == 404
    assert upload(client, ADMIN_A, "probe", compiled_bytes(tiny_llama, seed=61)).status_code == 201
    assert upload(client, ADMIN_A, "probe-cls", classifier(tiny_llama, 62, ["x", "y"])).status_code == 201
    assert upload(client, ADMIN_A, "probe-broken", compiled_bytes(tiny_llama, seed=63)).status_code == 201
    assert client.post("/v1/completions", headers=auth(INFER_A),
                       json={"model": "probe", "prompt": "hi", "max_tokens": 2}).status_code == 200
    # A's damaged adapter (unreadable file and record) must not show through either (no 422 to others).
    for d in (state.runtime.store.root / "adapters").iterdir():
        if d.name.endswith("probe-broken"):
            (d / "adapter.safetensors").write_bytes(b"junk" * 10)
            (d / "record.json").write_text("{")
    for adapter_id, then in before.items():
        now = answers(client, adapter_id)
        diff = {k: (then[k], now[k]) for k in then if then[k] != now[k]}
        assert not diff, f"{adapter_id}: {diff}"
    # ...and an upload of that id by another tenant simply succeeds, in the uploader's own namespace.
    r = upload(client, ADMIN_B, "probe", compiled_bytes(tiny_llama, seed=64))
    assert r.status_code == 201 and r.json()["owner"] == "tenantB"
    assert client.get("/v1/adapters/probe", headers=auth(INFER_A)).json()["owner"] == "tenantA"


# ---- 3. per-tenant quotas on count and bytes --------------------------------------------------------------

def test_a_tenant_over_its_adapter_count_gets_403_before_any_file_byte(tmp_path, tiny_llama):
    with app_client("tiny-llama", tmp_path, tenant_max_adapters=2, **KEYS) as (client, state):
        blob = compiled_bytes(tiny_llama, seed=71)
        for i in range(2):
            assert upload(client, ADMIN_A, f"a{i}", blob).status_code == 201
        store = state.runtime.store
        spools = []
        real_spool = store.spool
        store.spool = lambda: spools.append(1) or real_spool()
        r = upload(client, ADMIN_A, "a2", blob)
        store.spool = real_spool
        err = r.json()["error"]
        assert r.status_code == 403 and err["code"] == "tenant_quota_exceeded", r.text
        assert "--tenant-max-adapters=2" in err["message"] and "has 2 adapters" in err["message"]
        assert spools == [] and not store.exists("a2", owner="tenantA")  # refused at the id, before the file
        assert upload(client, ADMIN_B, "a2", blob).status_code == 201  # other tenants are unaffected
        for i in range(3):  # public uploads by a global admin have no quota
            assert upload(client, ADMIN, f"pub{i}", blob).status_code == 201
        text = client.get("/metrics").text
        assert metric(text, "rankserve_adapter_quota_rejections_total", kind="count") == 1
        assert metric(text, "rankserve_adapter_quota_rejections_total", kind="bytes") == 0
        assert "tenantA" not in text  # never labelled by tenant
        assert client.delete("/v1/adapters/a0", headers=auth(ADMIN_A)).status_code == 200
        assert upload(client, ADMIN_A, "a2", blob).status_code == 201  # room again


def test_a_tenant_over_its_bytes_gets_507_before_anything_is_published(tmp_path, tiny_llama):
    blob = compiled_bytes(tiny_llama, seed=81)
    size = len(blob)
    limit = size + size // 2
    with app_client("tiny-llama", tmp_path, tenant_max_bytes=limit, **KEYS) as (client, state):
        assert upload(client, ADMIN_A, "b0", blob).status_code == 201
        store = state.runtime.store
        written = []
        real_write = store.write_spool

        def counted(staged, chunks):
            chunks = list(chunks)
            written.extend(len(c) for c in chunks)
            real_write(staged, chunks)

        store.write_spool = counted
        r = upload(client, ADMIN_A, "b1", compiled_bytes(tiny_llama, seed=82))
        store.write_spool = real_write
        err = r.json()["error"]
        assert r.status_code == 507 and err["code"] == "tenant_quota_exceeded", r.text
        assert f"--tenant-max-bytes={limit}" in err["message"] and f"uses {size} bytes" in err["message"]
        assert sum(written) <= limit - size  # refused while streaming: bytes over the quota never hit the disk
        assert not store.exists("b1", owner="tenantA") and list((store.root / "tmp").iterdir()) == []
        assert upload(client, ADMIN_B, "b1", blob).status_code == 201
        assert upload(client, ADMIN, "b1", blob).status_code == 201 and upload(client, ADMIN, "b2", blob).status_code == 201
        text = client.get("/metrics").text
        assert metric(text, "rankserve_adapter_quota_rejections_total", kind="bytes") == 1
        assert metric(text, "rankserve_adapter_uploads_total", result="quota") == 1


def test_the_store_checks_quotas_just_before_publishing(tmp_path, tiny_llama):
    """Two uploads racing for a tenant's last slot: exactly one is published. A PEFT upload's stored size is
    known only after conversion; it is checked then, before the rename."""
    from adapters_store.store import BytesQuotaExceeded, CountQuotaExceeded, Quota

    store = AdapterStore(tmp_path)
    blobs = [compiled_bytes(tiny_llama, seed=s) for s in (91, 92)]
    staged = []
    for b in blobs:
        staged.append(store.spool())
        store.write_spool(staged[-1], [b])
    results: list = []
    barrier = threading.Barrier(2)

    def put(i: int) -> None:
        barrier.wait()
        try:
            results.append(store.put_staged(f"r{i}", staged[i], owner="t", quota=Quota(max_adapters=1)))
        except CountQuotaExceeded as e:
            results.append(e)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(type(r).__name__ for r in results) == ["AdapterRecord", "CountQuotaExceeded"]
    assert store.usage("t").count == 1 and list((tmp_path / "tmp").iterdir()) == []
    peft = pytest.importorskip("peft")
    import copy

    pm = peft.get_peft_model(copy.deepcopy(tiny_llama.model), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    with pytest.raises(BytesQuotaExceeded, match="tenant-max-bytes") as e:
        store.put_peft("p", tmp_path / "peft", tiny_llama, owner="u", quota=Quota(max_bytes=100))
    assert e.value.http_status == 507 and not store.exists("p", owner="u")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_quota_settings_have_flags_and_env_twins():
    from server.common.config import Settings, add_arguments, check, settings_from

    env = {"RANKSERVE_TENANT_MAX_ADAPTERS": "5", "RANKSERVE_TENANT_MAX_BYTES": "1000"}
    s = settings_from(None, env=env)
    assert (s.tenant_max_adapters, s.tenant_max_bytes) == (5, 1000)
    p = argparse.ArgumentParser()
    add_arguments(p)
    s = settings_from(p.parse_args(["--tenant-max-adapters", "3"]), env=env)  # flags win
    assert (s.tenant_max_adapters, s.tenant_max_bytes) == (3, 1000)
    assert (Settings().tenant_max_adapters, Settings().tenant_max_bytes) == (0, 0)  # unlimited
    with pytest.raises(ValueError, match="--tenant-max-bytes"):
        check(Settings(tenant_max_bytes=-1))
